"""The largest single step and the amortized step of GaLoreAdamW with and without ``refresh_stagger``.

Without stagger every block matrix refreshes its basis at the same step (t % T == 0): that step stalls for
all the decompositions. With ``refresh_stagger=True`` matrix k of N refreshes at t % T == k·T // N, so at most
ceil(N / T) decompositions fall on one step (one, for T >= N).

Every parameter of a LLaMA model (block matrices projected at rank hidden/4, the rest unprojected, as in
``step_vs_fused.py``) gets a fixed random gradient. The configurations (projector × stagger) step the same
tensors side by side: at every step each configuration steps once, the first one rotated step by step. After
the first step (first bases) ``--rounds`` whole gaps of T steps run; each step position of the gap keeps the
median over the rounds. Reported per configuration: the regular step (median of the positions without a
refresh), the largest step (the slowest position) in ms and in regular steps, the amortized step (mean over
the positions) and the refresh share (amortized − regular) / amortized.

    PYTHONPATH=. python benchmarks/refresh_stall.py --models llama_20m llama_60m --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import gradproj
from common import cpu_name, rows_per_thread_count
from step_vs_fused import make_params, model_shapes

PROJECTORS = ("svd", "randomized_svd")


def run(name: str, gap: int, rounds: int) -> dict:
    blocks, other = model_shapes(name)
    rank = blocks[0][0] // 4
    params = make_params(blocks + other, seed=0)
    mats, rest = params[: len(blocks)], params[len(blocks) :]
    opts = {}
    for projector in PROJECTORS:
        for stagger in (False, True):
            group = {"params": mats, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "projector": projector}
            group["refresh_stagger"] = stagger
            opts[(projector, stagger)] = gradproj.GaLoreAdamW([group, {"params": rest}], lr=1e-3)
    for opt in opts.values():
        opt.step()  # t = 0: state and first bases
    keys = list(opts)
    times: dict = {k: [[] for _ in range(gap)] for k in keys}
    for i in range(rounds * gap):  # t = 1 .. rounds·T; position t % T
        position = (i + 1) % gap
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
            t0 = time.perf_counter()
            opts[k].step()
            times[k][position].append(time.perf_counter() - t0)
    out = {}
    for (projector, stagger), per_position in times.items():
        opt = opts[(projector, stagger)]
        refreshing = {opt.state[p].get("refresh_offset", 0) % gap for p in mats}
        medians = [statistics.median(t) for t in per_position]
        plain = [m for pos, m in enumerate(medians) if pos not in refreshing]
        regular = statistics.median(plain) if plain else min(medians)  # T < N: every position refreshes
        largest = max(medians)
        amortized = statistics.fmean(medians)
        out[f"{projector} stagger={stagger}"] = {
            "regular": regular,
            "largest": largest,
            "largest_position": medians.index(largest),
            "amortized": amortized,
            "matrices_per_refresh_step": len(mats) / len(refreshing),
        }
    return {"model": name, "rank": rank, "matrices": len(mats), "threads": torch.get_num_threads(), "times": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama_20m", "llama_60m"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1])
    ap.add_argument("--gap", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = rows_per_thread_count(args.threads, args.models, lambda name: run(name, args.gap, args.rounds))
    print(f"machine: {cpu_name()}, torch {torch.__version__}; T = {args.gap}, rank = hidden/4, float32, "
          f"{args.rounds} rounds of T steps, median per step position\n")
    print("| model (N matrices) | threads | projector | stagger | regular ms | largest step ms | largest / regular "
          "| amortized ms | refresh share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for label, x in r["times"].items():
            projector, stagger = label.split(" stagger=")
            share = (x["amortized"] - x["regular"]) / x["amortized"]
            print(f"| {r['model']} ({r['matrices']}) | {r['threads']} | {projector} | {stagger} | "
                  f"{x['regular'] * 1e3:.1f} | {x['largest'] * 1e3:.1f} | {x['largest'] / x['regular']:.1f} | "
                  f"{x['amortized'] * 1e3:.1f} | {share:.1%} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
