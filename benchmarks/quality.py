"""Quality at equal steps and tokens: a small LLaMA trained with AdamW, GaLoreAdamW, FiraAdamW and FrugalAdamW.

Data needs no download: the Python standard library's source files (``*.py`` directly under the stdlib
directory, sorted by name), read as bytes (vocabulary 256); the last 10 % of the bytes are held out for
validation. The model is a LLaMA built from a local ``LlamaConfig`` (no hub access). The four optimizers
train four copies of the same initial model in lockstep: at every step each one sees the same batch, and
its ``optimizer.step()`` is timed right next to the others', so time ratios are side by side even on a
busy machine. GaLore, Fira and FRUGAL project the same matrices (every Linear of the decoder blocks) at
the same rank.

    PYTHONPATH=. python benchmarks/quality.py --threads 1 --plot docs/img/quality_loss.png
    PYTHONPATH=. python benchmarks/quality.py --optimizers AdamW FrugalAdamW --lr-adamw 1e-2 --lr-frugal 1e-2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import gradproj
from common import byte_llama, machine, stdlib_bytes


def make_model(args):
    return byte_llama(args.hidden, args.intermediate, args.layers, args.heads, args.seed, max_positions=args.seq)


OPTIMIZERS = ("AdamW", "GaLoreAdamW", "FiraAdamW", "FrugalAdamW", "AdamW-lr-split", "GaLoreAdamW-int8", "GaLoreAdamW-int4",
              "GaLoreAdamW-bf16proj", "GaLoreAdamW-bf16inputs")
DEFAULT_OPTIMIZERS = OPTIMIZERS[:4]


def make_optimizer(name: str, model, args):
    """The recipes (stated in docs/benchmarks.md): AdamW at its own lr; GaLore / Fira at lr 0.01, scale 0.25;
    FRUGAL at AdamW's lr with scale 1 (its paper's setting). Same rank and refresh gap for the three.

    ``AdamW-lr-split`` is a control: full-rank Adam (the identity projector) with GaLore's learning rates,
    lr on embeddings / norms / head and lr · scale on the block matrices, to separate the effect of the
    projection from that of GaLore's lr split."""
    proj = dict(rank=args.rank, update_proj_gap=args.gap)
    if name == "AdamW-lr-split":
        groups = gradproj.param_groups(model, scale=args.scale, projector="identity", **proj)
        return gradproj.GaLoreAdamW(groups, lr=args.lr_galore), args.lr_galore
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=args.lr_adamw, weight_decay=0.0), args.lr_adamw
    if name in ("GaLoreAdamW-int8", "GaLoreAdamW-int4"):  # GaLore with its basis stored as INT8 / INT4 codes
        groups = gradproj.param_groups(model, scale=args.scale, basis_bits=int(name[-1]), **proj)
        return gradproj.GaLoreAdamW(groups, lr=args.lr_galore), args.lr_galore
    if name == "GaLoreAdamW-bf16proj":  # GaLore with its projection GEMMs in bfloat16 (proj_dtype)
        groups = gradproj.param_groups(model, scale=args.scale, proj_dtype="bfloat16", **proj)
        return gradproj.GaLoreAdamW(groups, lr=args.lr_galore), args.lr_galore
    if name == "GaLoreAdamW-bf16inputs":  # proj_dtype="auto"'s third choice, stored as if it had been measured
        from gradproj.projectors import base

        if not base.bf16_inputs_available(torch.device("cpu")):
            raise SystemExit("GaLoreAdamW-bf16inputs: oneDNN's bfloat16 math mode is not in effect on this CPU")
        opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, scale=args.scale, **proj), lr=args.lr_galore)
        for group in opt.param_groups:
            if group.get("rank"):
                for p in group["params"]:
                    opt.state[p][base.AUTO_KEY] = base.AUTO_BF16_INPUTS  # kept: auto decides only where it is absent
        return opt, args.lr_galore
    if name == "GaLoreAdamW":
        return gradproj.GaLoreAdamW(gradproj.param_groups(model, scale=args.scale, **proj), lr=args.lr_galore), args.lr_galore
    if name == "FiraAdamW":
        return gradproj.FiraAdamW(gradproj.param_groups(model, scale=args.scale, **proj), lr=args.lr_galore), args.lr_galore
    if name == "FrugalAdamW":
        return gradproj.FrugalAdamW(gradproj.param_groups(model, scale=1.0, **proj), lr=args.lr_frugal), args.lr_frugal
    raise ValueError(name)


def warmup_cosine(steps: int, warmup_frac: float, floor: float):
    warm = max(1, int(steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


@torch.no_grad()
def evaluate(model, batches) -> float:
    model.eval()
    loss = sum(model(input_ids=x, labels=x).loss.item() for x in batches) / len(batches)
    model.train()
    return loss


def windows(data: torch.Tensor, n: int, batch: int, seq: int, g: torch.Generator) -> list[torch.Tensor]:
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        out.append(torch.stack([data[s: s + seq] for s in starts]))
    return out


def run(args) -> dict:
    data = stdlib_bytes(args.data_bytes)
    split = int(len(data) * 0.9)
    train_data, val_data = data[:split], data[split:]
    g = torch.Generator().manual_seed(args.seed)
    val_batches = windows(val_data, args.eval_batches, args.batch, args.seq, g)
    names = args.optimizers
    runs = {}
    for name in names:
        model = make_model(args)
        opt, lr = make_optimizer(name, model, args)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps, args.warmup, args.min_lr))
        runs[name] = dict(model=model, opt=opt, sched=sched, lr=lr, train=[], val=[], opt_s=[], iter_s=[])
    for step in tqdm(range(args.steps), desc=f"training ({len(names)} optimizers in lockstep)"):
        (x,) = windows(train_data, 1, args.batch, args.seq, g)
        for name in names:
            r = runs[name]
            t0 = time.perf_counter()
            loss = r["model"](input_ids=x, labels=x).loss
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            r["opt"].step()
            t2 = time.perf_counter()
            r["sched"].step()
            r["train"].append(loss.item())
            r["opt_s"].append(t2 - t1)
            r["iter_s"].append(t2 - t0)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            for name in names:
                runs[name]["val"].append((step + 1, evaluate(runs[name]["model"], val_batches)))
    rows = []
    adamw_state = 2 * sum(p.numel() * p.element_size() for p in runs[names[0]]["model"].parameters())
    tail = max(1, args.steps // 20)
    for name in names:
        r = runs[name]
        # steps that refresh the basis (t % gap == 0) are the SVD steps; the others are the regular ones
        regular = [t for i, t in enumerate(r["opt_s"]) if i % args.gap != 0]
        rows.append(dict(
            optimizer=name, lr=r["lr"], train_loss=statistics.fmean(r["train"][-tail:]), val_loss=r["val"][-1][1],
            opt_ms_median=statistics.median(regular) * 1e3, opt_ms_mean=statistics.fmean(r["opt_s"]) * 1e3,
            iter_ms_mean=statistics.fmean(r["iter_s"]) * 1e3, state_bytes=state_bytes(r["opt"]),
            state_vs_adamw=state_bytes(r["opt"]) / adamw_state, train_curve=r["train"], val_curve=r["val"],
        ))
    return dict(rows=rows, args=vars(args), machine=machine(), tokens_per_step=args.batch * args.seq,
                params=sum(p.numel() for p in runs[names[0]]["model"].parameters()))


def markdown(result: dict) -> str:
    a, rows = result["args"], result["rows"]
    by = {r["optimizer"]: r for r in rows}
    lines = [
        f"Machine: {result['machine']}. LLaMA {a['hidden']}/{a['intermediate']}/{a['heads']} heads/{a['layers']} layers, "
        f"vocab 256, {result['params'] / 1e6:.2f} M parameters; {a['steps']} steps x {result['tokens_per_step']} tokens "
        f"(batch {a['batch']} x seq {a['seq']}); rank {a['rank']}, update_proj_gap {a['gap']}; warm-up "
        f"{a['warmup']:.0%} + cosine to {a['min_lr']:.0%}; seed {a['seed']}.",
        "",
        "| optimizer | lr (scale) | train loss (last 5 %) | val loss | optimizer step, ms: median regular / mean incl. SVD | "
        "train step ms (mean) | optimizer state | state / AdamW's (2 x params) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    scales = {"AdamW": "", "GaLoreAdamW": f" ({a['scale']})", "FiraAdamW": f" ({a['scale']})", "FrugalAdamW": " (1.0)",
              "AdamW-lr-split": f" ({a['scale']} on matrices)", "GaLoreAdamW-int8": f" ({a['scale']})",
              "GaLoreAdamW-int4": f" ({a['scale']})"}
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g}{scales[r['optimizer']]} | {r['train_loss']:.4f} | {r['val_loss']:.4f} "
            f"| {r['opt_ms_median']:.2f} / {r['opt_ms_mean']:.2f} | {r['iter_ms_mean']:.0f} "
            f"| {r['state_bytes'] / 2**10:.0f} KiB | {r['state_vs_adamw']:.1%} |"
        )
    if "FiraAdamW" in by and "GaLoreAdamW" in by:
        f, gl = by["FiraAdamW"], by["GaLoreAdamW"]
        lines += ["", f"FiraAdamW / GaLoreAdamW optimizer step: {f['opt_ms_median'] / gl['opt_ms_median']:.2f}x (median "
                  f"of regular steps), {f['opt_ms_mean'] / gl['opt_ms_mean']:.2f}x (mean including SVD refreshes)."]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in result["rows"]:
        ema, smooth = None, []
        for v in r["train_curve"]:
            ema = v if ema is None else 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax1.plot(range(1, len(smooth) + 1), smooth, label=r["optimizer"])
        steps, vals = zip(*r["val_curve"])
        ax2.plot(steps, vals, marker="o", markersize=3, label=r["optimizer"])
    ax1.set(title="training loss (EMA 0.9)", xlabel="step", ylabel="cross-entropy (nats/byte)")
    ax2.set(title="validation loss", xlabel="step")
    lo = min(min(min(v for _, v in r["val_curve"]), min(r["train_curve"][-20:])) for r in result["rows"])
    for ax in (ax1, ax2):
        ax.set_ylim(lo - 0.1, lo + 1.2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"LLaMA {result['params'] / 1e6:.2f}M on stdlib bytes, rank {result['args']['rank']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The run and model options shared by the benchmarks that train this LLaMA."""
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=352)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--rank", type=int, default=32, help="same rank for GaLore, Fira, FRUGAL (hidden/4: FRUGAL's ρ = 0.25)")
    ap.add_argument("--gap", type=int, default=100, help="update_proj_gap T")
    ap.add_argument("--scale", type=float, default=0.25, help="GaLore / Fira α")
    ap.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--lr-adamw", type=float, default=3e-3)
    ap.add_argument("--lr-galore", type=float, default=1e-2, help="GaLore and Fira")
    ap.add_argument("--lr-frugal", type=float, default=3e-3)
    ap.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    ap.add_argument("--min-lr", type=float, default=0.1, help="cosine floor, as a fraction of the peak lr")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--data-bytes", type=int, default=4_000_000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", help="write the loss curves to this PNG")
    ap.add_argument("--table", help="write the markdown table to this file")
    ap.add_argument("--json", help="write all numbers, curves included, to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - t0
    text = markdown(result) + f"\n\nWall time of the whole run: {result['seconds'] / 60:.1f} min."
    print(text)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(text + "\n")
    if args.plot:
        plot(result, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
