"""APOLLO and APOLLO-Mini against GaLore, Fira and AdamW, each at the best of its own three learning rates.

The small byte-level LLaMA of ``quality.py`` (same data, model, batches, warm-up + cosine schedule), every
method at each lr of its grid, all trained in lockstep on the same batches (the same tokens for all), one
lr for every parameter of a run (embeddings and head included), so no method gets a better lr split than
another. The table gives each method's best final validation loss over its grid, the lr that gave it, and
the optimizer-state bytes.

    python benchmarks/apollo_quality.py --threads 1 --seeds 0 --json apollo_quality.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

import gradproj
from quality import add_model_arguments, evaluate, make_model, state_bytes, warmup_cosine, windows
from common import machine, stdlib_bytes

#: method -> (lr grid, builder(model, lr, args))
METHODS = {
    "AdamW": ((1e-3, 3e-3, 1e-2), lambda m, lr, a: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)),
    "GaLore": ((3e-3, 1e-2, 3e-2), lambda m, lr, a: gradproj.GaLoreAdamW(
        gradproj.param_groups(m, rank=a.rank, update_proj_gap=a.gap, scale=0.25), lr=lr)),
    "Fira": ((3e-3, 1e-2, 3e-2), lambda m, lr, a: gradproj.FiraAdamW(
        gradproj.param_groups(m, rank=a.rank, update_proj_gap=a.gap, scale=0.25), lr=lr)),
    "APOLLO": ((3e-3, 1e-2, 3e-2), lambda m, lr, a: gradproj.ApolloAdamW(
        gradproj.param_groups(m, rank=a.rank, update_proj_gap=a.gap, scale=1.0), lr=lr)),
    "APOLLO-Mini": ((3e-3, 1e-2, 3e-2), lambda m, lr, a: gradproj.ApolloMini(
        gradproj.param_groups(m, rank=1, update_proj_gap=a.gap, scale=128.0), lr=lr)),
}


def run(args, seed: int) -> list[dict]:
    data = stdlib_bytes(args.data_bytes)
    split = int(len(data) * 0.9)
    train_data, val_data = data[:split], data[split:]
    g = torch.Generator().manual_seed(seed)
    val_batches = windows(val_data, args.eval_batches, args.batch, args.seq, g)
    args.seed = seed
    runs = []
    for method in args.methods:
        grid, build = METHODS[method]
        for lr in args.lrs or grid:
            model = make_model(args)
            opt = build(model, lr, args)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps, args.warmup, args.min_lr))
            runs.append(dict(method=method, lr=lr, model=model, opt=opt, sched=sched, train=[]))
    for _ in tqdm(range(args.steps), desc=f"seed {seed}: {len(runs)} runs in lockstep"):
        (x,) = windows(train_data, 1, args.batch, args.seq, g)
        for r in runs:
            loss = r["model"](input_ids=x, labels=x).loss
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            r["opt"].step()
            r["sched"].step()
            r["train"].append(loss.item())
    rows = []
    for r in runs:
        val = evaluate(r["model"], val_batches)
        rows.append(dict(method=r["method"], lr=r["lr"], seed=seed, val_loss=val if val == val else float("inf"),
                         train_loss=statistics.fmean(r["train"][-max(1, args.steps // 20):]),
                         state_bytes=state_bytes(r["opt"])))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--lrs", type=float, nargs="+", help="replace every method's lr grid by these lrs")
    add_model_arguments(ap)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--gap", type=int, default=100)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--min-lr", type=float, default=0.1)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--data-bytes", type=int, default=4_000_000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for seed in args.seeds for row in run(args, seed)]
    print(f"# {machine()}; {args.steps} steps x {args.batch * args.seq} tokens, rank {args.rank} (Mini: 1), "
          f"T {args.gap}, seeds {args.seeds}")
    print("| method | lr grid: mean val loss over seeds | best lr | best val loss | optimizer state |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        by_lr = {}
        for r in rows:
            if r["method"] == method:
                by_lr.setdefault(r["lr"], []).append(r["val_loss"])
        means = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
        best = min(means, key=means.get)
        state = next(r["state_bytes"] for r in rows if r["method"] == method)
        grid = ", ".join(f"{lr:g}: {m:.4f}" for lr, m in sorted(means.items()))
        print(f"| {method} | {grid} | {best:g} | {means[best]:.4f} | {state / 2**10:.0f} KiB |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
