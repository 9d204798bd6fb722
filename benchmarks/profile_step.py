"""Profile one regular (no refresh) GaLoreAdamW step over a LLaMA model's decoder-block matrices.

    PYTHONPATH=. python benchmarks/profile_step.py --model llama_1b --dtype bfloat16 [--impl torch] [--foreach 1]

Prints torch.profiler's table (device and host time per operator) and the wall time of the step, so the
cost of the step can be split into GEMMs, elementwise kernels and host-side dispatch.
"""

from __future__ import annotations

import argparse
import time

import torch

import gradproj
from common import LLAMA, block_matrix_shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_1b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--foreach", type=int, default=None, choices=[0, 1])
    ap.add_argument("--rank", type=int, default=None, help="default hidden / 4")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    shapes = block_matrix_shapes(args.model)
    rank = args.rank or LLAMA[args.model][0] // 4
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device, dtype)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device, dtype)
    foreach = None if args.foreach is None else bool(args.foreach)
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": rank, "update_proj_gap": 10**9, "scale": 0.25}],
                               lr=1e-3, impl=args.impl, foreach=foreach)
    opt.step()  # the first refresh
    for _ in range(3):
        opt.step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        opt.step()
    sync()
    print(f"{args.model} {args.dtype} impl={args.impl} foreach={foreach}: regular step {(time.perf_counter() - t) * 100:.2f} ms "
          f"({len(params)} matrices, rank {rank})")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            opt.step()
        sync()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    if device.type == "cuda":  # device time per step: GEMM kernels vs everything else
        gemm = other = 0.0
        for e in prof.key_averages():
            if e.device_type != torch.autograd.DeviceType.CUDA or e.key.startswith("Optimizer."):
                continue  # kernels only (the step's own annotation spans them all)
            name = e.key.lower()
            is_gemm = any(w in name for w in ("gemm", "cutlass", "nvjet", "sm90_xmma", "ampere_", "cublas"))
            if is_gemm:
                gemm += e.self_device_time_total
            else:
                other += e.self_device_time_total
        print(f"device time per step: GEMM kernels {gemm / 3e3:.2f} ms, other kernels {other / 3e3:.2f} ms")


if __name__ == "__main__":
    main()
