"""The floor of a regular GaLore step: only its two projection GEMMs, for every decoder-block matrix.

A regular GaLore step must compute R = down(G) and W += α·B(U) for every projected m × n matrix: two GEMMs
of 2·m·n·r FLOPs each. This script times exactly those (the layouts gradproj uses, float32) and nothing
else, so the optimizer step of benchmarks/step_time.py can be read against what no implementation of the
algorithm can avoid.

    python benchmarks/gemm_floor.py [--models llama_60m llama_130m] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import LLAMA, block_matrix_shapes, machine, sync


def floor_ms(model: str, rank: int, device: torch.device, repeats: int) -> tuple[float, float]:
    mats = []
    for m, n in block_matrix_shapes(model):
        G, W = torch.randn(m, n, device=device), torch.randn(m, n, device=device)
        left = m <= n
        mats.append((left, G, W, torch.randn(m, rank, device=device) if left else torch.randn(rank, n, device=device)))

    def step():
        for left, G, W, P in mats:
            if left:
                R = (G.t() @ P).t() if device.type == "cpu" else P.t() @ G
                W.addmm_(P, R, alpha=-1e-3)
            else:
                R = G @ P.t()
                W.addmm_(R, P, alpha=-1e-3)

    step()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    flops = sum(4 * m * n * rank for m, n in block_matrix_shapes(model))
    return statistics.median(times) * 1e3, flops / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama_60m", "llama_130m"])
    ap.add_argument("--rank-div", type=int, default=4, help="rank = hidden / rank_div")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {machine()}\n")
    print("| model | rank | GFLOP per step | projection GEMMs alone, ms | GFLOP/s |")
    print("|---|---|---|---|---|")
    for model in args.models:
        rank = LLAMA[model][0] // args.rank_div
        ms, gflop = floor_ms(model, rank, device, args.repeats)
        print(f"| {model} | {rank} | {gflop:.1f} | {ms:.1f} | {gflop / ms * 1e3:.0f} |")


if __name__ == "__main__":
    main()
