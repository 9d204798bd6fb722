"""refresh="lazy" (Q-GaLore's per-matrix gap) against the fixed gap: SVDs taken and final validation loss.

The quality benchmark's setting (benchmarks/quality.py: a small byte-level LLaMA on the Python standard
library's source, warm-up then cosine, GaLore's recipe lr 0.01, scale 0.25, rank 32 on every Linear of the
decoder blocks), with a refresh gap small enough for the lazy rule to act within the run. The two
optimizers train two copies of the same initial model in lockstep on the same batches, for each seed. An
SVD is one call of the projector's ``compute_basis`` for one matrix.

    python benchmarks/lazy_refresh.py --threads 1 --seeds 0 1 2 --table /tmp/lazy.md

Besides the fixed gap T and the lazy rule started from T, fixed gaps given by ``--control-gaps`` (default 20,
about as many SVDs as the lazy rule takes here) separate the effect of fewer refreshes from that of choosing
per matrix which ones to skip.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import gradproj  # noqa: E402
from common import cpu_name, machine, stdlib_bytes  # noqa: E402
from gradproj.projectors import SVDProjector  # noqa: E402
from quality import add_model_arguments, evaluate, make_model, warmup_cosine, windows  # noqa: E402

SVDS: dict[int, int] = {}


def count_svds() -> None:
    """Count compute_basis calls per optimizer (keyed by the id of the group dict the projector was built from)."""
    original = SVDProjector.compute_basis

    def counted(self, G, state, step):
        SVDS[id(self.group)] = SVDS.get(id(self.group), 0) + 1
        return original(self, G, state, step)

    SVDProjector.compute_basis = counted  # type: ignore[method-assign]


def run_seed(args, seed: int) -> list[dict]:
    args.seed = seed
    data = stdlib_bytes(args.data_bytes)
    split = int(len(data) * 0.9)
    train_data, val_data = data[:split], data[split:]
    g = torch.Generator().manual_seed(seed)
    val_batches = windows(val_data, args.eval_batches, args.batch, args.seq, g)
    runs = {}
    for label, refresh, gap in configurations(args):
        model = make_model(args)
        groups = gradproj.param_groups(model, rank=args.rank, update_proj_gap=gap, scale=args.scale)
        opt = gradproj.GaLoreAdamW(groups, lr=args.lr, refresh=refresh)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps, args.warmup, args.min_lr))
        runs[label] = dict(model=model, opt=opt, sched=sched, opt_s=0.0, val=[], gap=gap)
    for step in range(args.steps):
        (x,) = windows(train_data, 1, args.batch, args.seq, g)
        for r in runs.values():
            loss = r["model"](input_ids=x, labels=x).loss
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            t0 = time.perf_counter()
            r["opt"].step()
            r["opt_s"] += time.perf_counter() - t0
            r["sched"].step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            for r in runs.values():
                r["val"].append((step + 1, evaluate(r["model"], val_batches)))
    rows = []
    for label, r in runs.items():
        opt = r["opt"]
        projected = [g for g in opt.param_groups if g.get("rank")]
        gaps = [opt.state[p].get("lazy_gap", r["gap"]) for g in projected for p in g["params"]]
        rows.append(dict(
            seed=seed, refresh=label, svds=sum(SVDS.get(id(g), 0) for g in projected), matrices=len(gaps),
            val_loss=r["val"][-1][1], val_curve=r["val"], opt_s=r["opt_s"],
            final_gaps=dict(sorted((gap, gaps.count(gap)) for gap in set(gaps))),
        ))
    return rows


def configurations(args) -> list[tuple[str, str, int]]:
    """(label, refresh, update_proj_gap): the fixed gap, the lazy rule from it, and fixed controls."""
    return [
        (f"fixed, T = {args.gap}", "fixed", args.gap),
        (f"lazy, T₀ = {args.gap}", "lazy", args.gap),
        *((f"fixed, T = {gap}", "fixed", gap) for gap in args.control_gaps),
    ]


def markdown(result: dict) -> str:
    a, rows = result["args"], result["rows"]
    lines = [
        f"Machine: {result['cpu']} ({result['machine']}). LLaMA {a['hidden']}/{a['intermediate']}/{a['heads']} heads/"
        f"{a['layers']} layers, vocab 256; {a['steps']} steps x {a['batch'] * a['seq']} tokens; GaLoreAdamW lr {a['lr']}, "
        f"scale {a['scale']}, rank {a['rank']}, update_proj_gap {a['gap']}; lazy: queue 5, threshold 0.4, γ 2 (defaults).",
        "",
        "| seed | schedule | SVDs (all matrices) | final val loss | optimizer time, s | final gaps (gap: matrices) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        gaps = ", ".join(f"{k}: {v}" for k, v in r["final_gaps"].items())
        lines.append(f"| {r['seed']} | {r['refresh']} | {r['svds']} | {r['val_loss']:.4f} | {r['opt_s']:.1f} | {gaps} |")
    for refresh in dict.fromkeys(r["refresh"] for r in rows):
        sel = [r for r in rows if r["refresh"] == refresh]
        vals = [r["val_loss"] for r in sel]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(
            f"| mean | {refresh} | {statistics.fmean(r['svds'] for r in sel):.0f} | {statistics.fmean(vals):.4f} ± {sd:.4f} "
            f"| {statistics.fmean(r['opt_s'] for r in sel):.1f} | |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--gap", type=int, default=10, help="update_proj_gap T (the lazy rule's starting gap)")
    ap.add_argument("--control-gaps", type=int, nargs="*", default=[20], help="fixed gaps run as controls")
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--min-lr", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--data-bytes", type=int, default=4_000_000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--table", help="write the markdown table to this file")
    ap.add_argument("--json", help="write all numbers, curves included, to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    count_svds()
    t0 = time.perf_counter()
    rows = []
    for seed in args.seeds:
        rows += run_seed(args, seed)
        print(f"seed {seed} done after {time.perf_counter() - t0:.0f} s", flush=True)
    result = dict(rows=rows, args=vars(args), machine=machine(), cpu=cpu_name(), seconds=time.perf_counter() - t0)
    text = markdown(result) + f"\n\nWall time: {result['seconds'] / 60:.1f} min."
    print(text)
    if args.table:
        Path(args.table).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
