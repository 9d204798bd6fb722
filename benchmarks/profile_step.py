"""Profile one regular (no refresh) GaLoreAdamW step over a LLaMA model's decoder-block matrices.

    PYTHONPATH=.:benchmarks python benchmarks/profile_step.py --model llama_1b --dtype bfloat16 [--impl torch] [--foreach 1]
    PYTHONPATH=.:benchmarks python benchmarks/profile_step.py --model llama_60m --dtype float32 --threads 1 \\
        --weight-decay 0.1 --baseline /tmp/base

Prints torch.profiler's table (device and host time per operator) and the wall time of the step, so the
cost of the step can be split into GEMMs, elementwise kernels and host-side dispatch. On the CPU it also
prints the step split into operator groups (self CPU time per step): the projection GEMMs, the Adam kernels,
other elementwise passes (weight decay, zeroing, copies) and what is left of the step's time (Python and
dispatch). ``--baseline DIR`` profiles another version's package (a source tree holding ``gradproj/``, e.g.
``git archive <commit> gradproj | tar -x -C DIR``) on the same matrices in the same run, for a before/after.
"""

from __future__ import annotations

import argparse
import time

import torch

import gradproj
from common import LLAMA, block_matrix_shapes

#: CPU operator groups (self time); anything not listed counts as "other kernels"
GROUPS = {
    "GEMMs": ("aten::mm", "aten::addmm_", "aten::addmm", "aten::bmm", "aten::baddbmm_"),
    "Adam": ("aten::_fused_adam_", "aten::_fused_adamw_", "aten::_foreach_lerp_", "aten::_foreach_addcmul_",
             "aten::_foreach_sqrt", "aten::_foreach_div", "aten::lerp_", "aten::addcmul_", "aten::sqrt", "aten::div"),
    "zeroing": ("aten::zero_", "aten::fill_", "aten::_foreach_zero_", "aten::zeros_like", "aten::zeros"),
    "weight decay / adds": ("aten::add_", "aten::_foreach_add_", "aten::mul_", "aten::_foreach_mul_"),
}


def build(package, args, device, dtype):
    shapes = block_matrix_shapes(args.model)
    rank = args.rank or LLAMA[args.model][0] // 4
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device, dtype)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device, dtype)
    foreach = None if args.foreach is None else bool(args.foreach)
    opt = package.GaLoreAdamW([{"params": params, "rank": rank, "update_proj_gap": 10**9, "scale": 0.25}],
                              lr=1e-3, weight_decay=args.weight_decay, impl=args.impl, foreach=foreach)
    for _ in range(1 + args.warmup):  # the first refresh, then regular steps (foreach=None's CPU trials)
        opt.step()
    return opt, len(params), rank


def profile(label, opt, n, rank, args, device, show=True):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        opt.step()
    sync()
    wall = (time.perf_counter() - t) * 100
    if show:
        print(f"[{label}] {args.model} {args.dtype} impl={args.impl} foreach={args.foreach} wd={args.weight_decay}: "
              f"regular step {wall:.2f} ms ({n} matrices, rank {rank})")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 5
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            opt.step()
        sync()
    key = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    if show and args.rows:
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
        return None
    per = {name: 0.0 for name in GROUPS}
    per["other kernels"] = 0.0
    calls = dict.fromkeys(per, 0)
    total = 0.0
    for e in prof.key_averages():
        if e.key.startswith("Optimizer.") or e.key.startswith("ProfilerStep"):
            total = max(total, e.cpu_time_total)
            continue
        group = next((g for g, names in GROUPS.items() if e.key in names), "other kernels")
        per[group] += e.self_cpu_time_total
        calls[group] += e.count
    per = {k: v / steps / 1e3 for k, v in per.items()}
    step_ms = total / steps / 1e3
    per["Python and dispatch"] = step_ms - sum(per.values())
    calls = {k: v / steps for k, v in calls.items()}
    if show:
        print(f"[{label}] per step under the profiler: {step_ms:.2f} ms = " + ", ".join(
            f"{k} {v:.2f} ms ({calls.get(k, 0):.0f} calls)" for k, v in per.items()))
    return step_ms, per, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_1b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--foreach", type=int, default=None, choices=[0, 1])
    ap.add_argument("--rank", type=int, default=None, help="default hidden / 4")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=8, help="regular steps before timing")
    ap.add_argument("--baseline", help="a directory holding another version's gradproj/, profiled after this one")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=3, help="profiled rounds (CPU: the smallest figure of each group)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    runs = [("this", gradproj)]
    if args.baseline:
        from versions import load_baseline

        runs.append(("baseline", load_baseline(args.baseline)))
    built = {label: build(package, args, device, dtype) for label, package in runs}
    results = {}
    for rnd in range(args.rounds):  # rotated rounds; per operator group the least-disturbed (smallest) figure
        labels = list(built)[rnd % len(built):] + list(built)[:rnd % len(built)]
        for label in labels:
            out = profile(label, *built[label], args, device, show=rnd == 0)
            if out is None:
                continue
            if label not in results:
                results[label] = out
            else:
                step_ms, per, calls = results[label]
                results[label] = (min(step_ms, out[0]), {k: min(v, out[1][k]) for k, v in per.items()}, calls)
    if device.type == "cpu" and len(results) == 2:
        print(f"smallest of {args.rounds} rotated rounds per group")
        print("| operators per regular step | this: ms (calls) | baseline: ms (calls) |")
        print("|---|---|---|")
        (a_ms, a, ac), (b_ms, b, bc) = results["this"], results["baseline"]
        for k in a:
            cells = [f"{x[k]:.2f}" + (f" ({c[k]:.0f})" if k in c else "") for x, c in ((a, ac), (b, bc))]
            print(f"| {k} | {cells[0]} | {cells[1]} |")
        print(f"| step | {a_ms:.2f} | {b_ms:.2f} |")


if __name__ == "__main__":
    main()
