"""Fused kernels: correctness first, then per-matrix step time, bandwidth and the whole-optimizer step.

One script, four parts, run in this order (it stops with exit status 1 if a correctness check fails):

1. correctness: one GaLore and one Fira matrix step (two steps: the limiter's first and a limited one)
   with the Triton ops, ``torch.compile`` of the reference and the reference itself, from the same state;
   and a few whole-optimizer steps with ``impl="triton"`` and ``foreach=True`` against ``impl="torch"``;
2. the copy ceiling: a device-to-device ``copy_`` of a large buffer (bytes read + written per second);
3. per-matrix step time (down-projection GEMM, Adam, [Fira residual + limiter], update) for each shape
   and rank, for the torch reference, ``torch.compile(dynamic=True)`` of the reference and the Triton
   path; and the achieved bandwidth of each Triton kernel against the copy ceiling;
4. the whole-optimizer step on a LLaMA model's decoder-block matrices (the ones GaLore projects) against
   ``torch.optim.AdamW(fused=True)`` on the same weights, per parameter (``foreach=False``) and batched
   (``foreach=True``, GaLoreAdamW; ``--foreach-batched-max-numel`` sets which matrices use batched GEMMs);
   the amortized GaLore step adds the basis refresh every T steps: regular step + Σ over matrices of its
   shape's refresh time / T (the refresh — an SVD — is timed once per distinct shape, not by running whole
   refresh steps).

    python benchmarks/kernel_bench.py --out kernels.json          # a GPU (H100 / H200): about 6 minutes
    python benchmarks/kernel_bench.py --smoke --out smoke.json    # CPU, tiny sizes, Triton interpreter

A compact markdown table is printed at the end; ``--out`` receives every number as JSON. Weights are
random at an LLM's init scale, gradients random, bases random orthonormal (timing only needs the shapes).
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before anything imports triton: the kernels then run under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import torch  # noqa: E402

import gradproj  # noqa: E402
from common import LLAMA, block_matrix_shapes, machine  # noqa: E402
from gradproj import kernels  # noqa: E402
from gradproj.kernels import reference  # noqa: E402
from gradproj.optimizers import multi_tensor  # noqa: E402
from gradproj.projectors import get_projector  # noqa: E402

HP = dict(beta1=0.9, beta2=0.999, eps=1e-6, alpha=0.25, gamma=1.01, lr=1e-3)
U_ROUND = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
LIMITER = "residual_norm"


# ------------------------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, repeats, inner=1, warmup=2):
    """Median seconds per call: ``repeats`` samples of ``inner`` back-to-back calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


# ------------------------------------------------------------------------------------ one matrix step
class Matrix:
    """One weight with its gradient, a random orthonormal basis of rank r and fresh Adam state."""

    def __init__(self, m, n, r, dtype, device, seed=0, w_scale=0.02):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.W = (torch.randn(m, n, generator=g) * w_scale).to(device, dtype)
        self.G = (torch.randn(m, n, generator=g) * 1e-3).to(device, dtype)
        self.proj = get_projector("svd")((m, n), r, "std", {"update_proj_gap": 200})
        long = n if self.proj.side == "right" else m
        Q, _ = torch.linalg.qr(torch.randn(long, r, generator=g).to(device))
        basis = Q.t() if self.proj.side == "right" else Q  # r x n (right) or m x r (left)
        self.state = {"proj": basis.to(dtype).contiguous()}
        shape = self.proj.low_rank_shape()
        self.state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        self.state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)

    def clone(self):
        other = object.__new__(Matrix)
        other.W, other.G, other.proj = self.W.clone(), self.G.clone(), self.proj
        other.state = {k: v.clone() for k, v in self.state.items()}
        return other


def matrix_step(ops, W, G, proj, state, fira: bool, weight_decay: float, lr: float):
    """One regular (no refresh) step of one matrix, exactly as ``ProjectedOptimizer._update`` runs it."""
    R = proj.down(G, state)
    U = ops.adam_update(R, state["exp_avg"], state["exp_avg_sq"], HP["beta1"], HP["beta2"], HP["eps"])
    S = None
    if fira:
        S = ops.fira_residual(G, R, U, proj, state, HP["alpha"])
        S = ops.limit_norm_growth_(S, state, LIMITER, HP["gamma"])
    ops.apply_update(W, proj, state, U, S, lr, HP["alpha"], lr, weight_decay)


def make_steppers(fira, weight_decay, lr, triton_ops, compile_ok):
    """{impl: step(matrix)}. The compiled reference is built once and shared by the check and the timings
    (``dynamic=True``: one compilation per projection side and dtype, not per shape and rank)."""
    steppers = {
        "torch": lambda mx: matrix_step(reference, mx.W, mx.G, mx.proj, mx.state, fira, weight_decay, lr),
        "triton": lambda mx: matrix_step(triton_ops, mx.W, mx.G, mx.proj, mx.state, fira, weight_decay, lr),
    }
    if compile_ok:
        def ref_step(W, G, proj, state):
            matrix_step(reference, W, G, proj, state, fira, weight_decay, lr)

        compiled = torch.compile(ref_step, dynamic=True)
        steppers["compile"] = lambda mx: compiled(mx.W, mx.G, mx.proj, mx.state)
    return steppers


def rel_update_err(a, b, before):
    """‖(a − before) − (b − before)‖ / ‖b − before‖: how far apart two updates of the same weights are."""
    a, b, before = a.float(), b.float(), before.float()
    return float((a - b).norm() / (b - before).norm().clamp_min(1e-30))


# An update's relative error, for float32 a few u of the terms (1e-4 leaves room for cancellation); for
# bfloat16 weights the rounding of W to 8 bits: with each step moving a weight by ~30 of its ulps (the
# weights are scaled so), rounding noise is ~1-2 % of the update. A wrong term or factor would be off by
# far more. State: m, v (and the limiter's norm) within 64 u of the state dtype, relative.
UPDATE_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


# --------------------------------------------------------------------------------------- correctness
def check_matrix_steps(shapes, rank, dtypes, device, steppers, t_start, compile_budget_s):
    rows, ok = [], True
    for (m, n) in shapes:
        for dtype in dtypes:
            for fira in (False, True):
                base = Matrix(m, n, rank, dtype, device, seed=1, w_scale=1e-3)
                results = {}
                for impl, step in steppers[fira].items():
                    if impl == "compile" and time.perf_counter() - t_start > compile_budget_s:
                        continue
                    mx = base.clone()
                    try:
                        for k in range(2):  # step 2 applies the limiter to a grown residual
                            mx.G.mul_(1.0 + 2.0 * k)
                            step(mx)
                        sync(device)
                        results[impl] = mx
                    except Exception as err:  # noqa: BLE001 — report it; only our own path must work
                        rows.append(dict(shape=[m, n], dtype=str(dtype), fira=fira, impl=impl, ok=False,
                                         error=f"{type(err).__name__}: {err}"[:300]))
                        ok = ok and impl == "compile"
                ref = results["torch"]
                for impl, mx in results.items():
                    if impl == "torch":
                        continue
                    row = dict(shape=[m, n], dtype=str(dtype).replace("torch.", ""), fira=fira, impl=impl,
                               rel_update_err=rel_update_err(mx.W, ref.W, base.W))
                    good = row["rel_update_err"] < UPDATE_TOL[dtype]
                    for key in ("exp_avg", "exp_avg_sq") + ((LIMITER,) if fira else ()):
                        a, b = mx.state[key].float(), ref.state[key].float()
                        row[f"{key}_rel_err"] = float((a - b).norm() / b.norm().clamp_min(1e-30))
                        good = good and row[f"{key}_rel_err"] < 64 * U_ROUND[dtype] + 1e-6
                    row["ok"] = good
                    rows.append(row)
                    ok = ok and (good or impl == "compile")  # the compiled reference is a baseline, not ours
    return rows, ok


def check_optimizer(shapes, rank, dtype, device):
    """A few steps of GaLoreAdamW / FiraAdamW with impl='triton' (and GaLoreAdamW with foreach=True, both
    impls) against impl='torch' with foreach=False (refresh included)."""
    rows, ok = [], True
    for cls in (gradproj.GaLoreAdamW, gradproj.FiraAdamW):
        finals = {}
        variants = [("torch", False), ("triton", False)]
        if cls is gradproj.GaLoreAdamW:
            variants += [("torch", True), ("triton", True)]
        for impl, foreach in variants:
            g = torch.Generator(device="cpu").manual_seed(0)
            ps = [torch.nn.Parameter((torch.randn(s, generator=g) * 1e-3).to(device, dtype)) for s in shapes]
            start = [p.detach().clone() for p in ps]
            opt = cls([{"params": ps, "rank": rank, "update_proj_gap": 3, "scale": 0.25}], lr=HP["lr"],
                      weight_decay=0.1, impl=impl, foreach=foreach)
            for _ in range(4):
                for p in ps:
                    p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device, dtype)
                opt.step()
            finals[(impl, foreach)] = [p.detach() for p in ps]
        for impl, foreach in variants[1:]:
            for a, b, w0 in zip(finals[(impl, foreach)], finals[("torch", False)], start):
                rel = rel_update_err(a, b, w0)  # the same bases (same gradients, same SVD): rounding apart
                good = rel < UPDATE_TOL[dtype]
                rows.append(dict(optimizer=cls.__name__, impl=impl + ("+foreach" if foreach else ""),
                                 shape=list(a.shape), dtype=str(dtype).replace("torch.", ""), ok=good,
                                 rel_update_err=rel))
                ok = ok and good
    return rows, ok


# ------------------------------------------------------------------------------------------ ceilings
def copy_ceiling(device, nbytes, repeats):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, repeats, inner=5)
    return 2 * nbytes / t  # read + write


# ---------------------------------------------------------------------------------- per-matrix timing
def bench_matrices(args, device, all_steppers, t_start):
    rows = []
    for (m, n) in args.shapes:
        for dtype in args.dtypes:
            for fira in (False, True):
                steppers = all_steppers[fira]
                for r in args.ranks:
                    mx = Matrix(m, n, r, dtype, device)
                    row = dict(shape=[m, n], rank=r, dtype=str(dtype).replace("torch.", ""),
                               method="fira" if fira else "galore")
                    for impl, step in steppers.items():
                        if impl == "compile" and time.perf_counter() - t_start > args.compile_budget_s:
                            row["compile_ms"] = None
                            row["compile_note"] = "skipped: over --compile-budget-s"
                            continue
                        try:
                            row[f"{impl}_ms"] = 1e3 * time_fn(lambda: step(mx), device, args.repeats, args.inner)
                        except Exception as err:  # noqa: BLE001
                            row[f"{impl}_ms"] = None
                            row[f"{impl}_note"] = f"{type(err).__name__}: {err}"[:200]
                    rows.append(row)
                    print(f"  {m}x{n} r={r} {row['dtype']} {row['method']}: " + ", ".join(
                        f"{k[:-3]} {v:.3f} ms" for k, v in row.items() if k.endswith("_ms") and v is not None),
                        flush=True)
    return rows


def bench_kernel_bandwidth(args, device, triton_ops, ceiling):
    """Each Triton kernel alone, with the bytes it must move, against the copy ceiling."""
    from gradproj.kernels.fira import ScaledResidual
    from gradproj.kernels.update import apply_update

    rows = []
    for (m, n) in args.shapes:
        for dtype in args.dtypes:
            e = torch.finfo(dtype).bits // 8
            mx = Matrix(m, n, args.ranks[0], dtype, device)
            D = mx.G.clone()
            phi = torch.rand(m, device=device)
            S = ScaledResidual(D, phi, 0)
            state = {}
            triton_ops.limit_norm_growth_(S, state, "n", HP["gamma"])
            BU = torch.randn(m, n, device=device).to(dtype)
            full = [
                ("fira_sumsq+limiter", lambda: triton_ops.limit_norm_growth_(ScaledResidual(D, phi, 0), state, "n", 1.01),
                 m * n * e),
                ("update_epilogue(W,B(U),D)", lambda: apply_update(mx.W, identity(m, n), {}, BU, S, 1e-6, 1.0, 0.0, 0.0),
                 m * n * e * 4),
            ]
            for name, fn, nbytes in full:
                t = time_fn(fn, device, args.repeats, args.inner)
                rows.append(dict(kernel=name, shape=[m, n], rank=None, dtype=str(dtype).replace("torch.", ""),
                                 us=t * 1e6, gbps=nbytes / t / 1e9, of_ceiling=nbytes / t / ceiling))
            for r in args.ranks:
                mx = Matrix(m, n, r, dtype, device)
                R = mx.proj.down(mx.G, mx.state)
                nbytes = R.numel() * e * 6  # read R, m, v; write m, v, ψ
                t = time_fn(lambda: triton_ops.adam_update(R, mx.state["exp_avg"], mx.state["exp_avg_sq"], 0.9, 0.999, 1e-6),
                            device, args.repeats, args.inner)
                rows.append(dict(kernel="adam", shape=[m, n], rank=r, dtype=str(dtype).replace("torch.", ""),
                                 us=t * 1e6, gbps=nbytes / t / 1e9, of_ceiling=nbytes / t / ceiling))
    return rows


def identity(m, n):
    from gradproj.projectors import IdentityProjector

    return IdentityProjector((m, n), 0, "std", {})


# ---------------------------------------------------------------------------------- whole optimizer
#: (optimizer, impl, foreach) timed on the whole model; JSON keys ``{cls}_{impl}[_foreach]_regular_ms`` etc.
#: foreach=False is the per-parameter path (the default on CPU; on CUDA the default is the batched one)
WHOLE_VARIANTS = [(gradproj.GaLoreAdamW, "torch", False), (gradproj.GaLoreAdamW, "triton", False),
                  (gradproj.GaLoreAdamW, "torch", True), (gradproj.GaLoreAdamW, "triton", True),
                  (gradproj.FiraAdamW, "torch", False), (gradproj.FiraAdamW, "triton", False)]


def bench_whole(args, device, dtype):
    shapes = block_matrix_shapes(args.model)
    if args.layers:
        shapes = shapes[: 7 * args.layers]
    rank = args.whole_rank or LLAMA[args.model][0] // 4
    g = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device, dtype)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device, dtype)
    out = dict(model=args.model, matrices=len(shapes), params=sum(p.numel() for p in params), rank=rank,
               gap=args.gap, dtype=str(dtype).replace("torch.", ""),
               foreach_batched_max_numel=multi_tensor.BATCHED_GEMM_MAX_NUMEL, foreach_chunk_bytes=multi_tensor.CHUNK_BYTES,
               foreach_batched_devices=list(multi_tensor.BATCHED_GEMM_DEVICES))

    fused = device.type == "cuda"  # the comparison asked for; on the CPU smoke run, torch's default
    adamw = torch.optim.AdamW(params, lr=1e-3, weight_decay=args.weight_decay, fused=fused or None)
    out["adamw_ms"] = 1e3 * time_fn(adamw.step, device, args.whole_repeats, warmup=2)
    out["adamw_kind"] = "fused" if fused else "default"
    del adamw

    # refresh: each projector's compute_basis once per distinct shape. The dense bases (svd, eigh,
    # randomized_svd) share the regular step; only the refresh cost differs between them.
    refresh = {}
    for name in args.whole_projectors:
        refresh_s, per_shape = 0.0, {}
        for (m, n), count in Counter(shapes).items():
            proj = get_projector(name)((m, n), min(rank, m, n), "std", {"update_proj_gap": args.gap})
            G = next(p.grad for p in params if tuple(p.shape) == (m, n))
            t = time_fn(lambda: proj.compute_basis(G, {}, 0), device, args.refresh_repeats, warmup=1)
            per_shape[f"{m}x{n}"] = dict(count=count, refresh_ms=t * 1e3)
            refresh_s += count * t
        refresh[name] = dict(per_shape=per_shape, refresh_step_extra_ms=refresh_s * 1e3)
    out["refresh"] = refresh
    refresh_s = refresh[args.whole_projectors[0]]["refresh_step_extra_ms"] / 1e3
    out["refresh_per_shape"] = refresh[args.whole_projectors[0]]["per_shape"]
    out["refresh_step_extra_ms"] = refresh_s * 1e3
    bases = {s: Matrix(*s, rank, dtype, device).state["proj"] for s in Counter(shapes)}

    for cls, impl, foreach in WHOLE_VARIANTS:
        if impl not in args.whole_impls:
            continue
        opt = cls([{"params": params, "rank": rank, "update_proj_gap": args.gap, "scale": 0.25}],
                  lr=1e-3, weight_decay=args.weight_decay, impl=impl, foreach=foreach)
        for p in params:  # bases in place of the first refresh (168 SVDs would take minutes)
            opt.state[p].update(step=1, proj=bases[tuple(p.shape)].clone())

        def regular():
            for st in opt.state.values():
                st["step"] = 1  # never a multiple of the gap: no refresh
            opt.step()

        t = time_fn(regular, device, args.whole_repeats, warmup=2)
        key = f"{cls.__name__}_{impl}" + ("_foreach" if foreach else "")
        out[f"{key}_regular_ms"] = t * 1e3
        out[f"{key}_amortized_ms"] = (t + refresh_s / args.gap) * 1e3
        for name, r in refresh.items():
            out.setdefault("amortized_by_projector", {}).setdefault(name, {})[key] = (
                t * 1e3 + r["refresh_step_extra_ms"] / args.gap)
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------- report
def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def print_tables(result):
    print(f"\nmachine: {result['machine']}; copy ceiling {result['copy_ceiling_gbps']:.0f} GB/s")
    print(f"command: {result['command']}\n")
    print("| shape | rank | dtype | method | torch ms | compile ms | triton ms | torch / triton | compile / triton |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["per_matrix"]:
        t, c, k = r.get("torch_ms"), r.get("compile_ms"), r.get("triton_ms")
        print(f"| {r['shape'][0]}x{r['shape'][1]} | {r['rank']} | {r['dtype']} | {r['method']} | {fmt(t)} | {fmt(c)} "
              f"| {fmt(k)} | {fmt(t / k if t and k else None, 2)}x | {fmt(c / k if c and k else None, 2)}x |")
    print("\n| kernel | shape | rank | dtype | µs | GB/s | of copy ceiling |")
    print("|---|---|---|---|---|---|---|")
    for r in result["bandwidth"]:
        print(f"| {r['kernel']} | {r['shape'][0]}x{r['shape'][1]} | {r['rank'] or '-'} | {r['dtype']} | {r['us']:.1f} "
              f"| {r['gbps']:.0f} | {r['of_ceiling']:.0%} |")
    for w in result["whole"]:
        print(f"\nwhole optimizer: {w['model']} decoder-block matrices ({w['matrices']}, {w['params'] / 1e6:.1f}M "
              f"params), rank {w['rank']}, {w['dtype']}, T = {w['gap']}; AdamW ({w['adamw_kind']}) "
              f"{w['adamw_ms']:.2f} ms; refresh adds {w['refresh_step_extra_ms']:.0f} ms every T steps\n")
        print("| optimizer | impl | regular step ms | amortized step ms | amortized / AdamW |")
        print("|---|---|---|---|---|")
        for cls, impl, foreach in WHOLE_VARIANTS:
            key = f"{cls.__name__}_{impl}" + ("_foreach" if foreach else "")
            if f"{key}_regular_ms" not in w:
                continue
            reg, am = w[f"{key}_regular_ms"], w[f"{key}_amortized_ms"]
            print(f"| {cls.__name__} | {impl}{'+foreach' if foreach else ''} | {reg:.2f} | {am:.2f} "
                  f"| {am / w['adamw_ms']:.2f}x |")
        if len(w.get("refresh", {})) > 1:
            print("\n| projector | refresh of all matrices ms | GaLoreAdamW triton+foreach amortized ms | / AdamW |")
            print("|---|---|---|---|")
            for name, r in w["refresh"].items():
                am = w["amortized_by_projector"][name]["GaLoreAdamW_triton_foreach"]
                print(f"| {name} | {r['refresh_step_extra_ms']:.0f} | {am:.2f} | {am / w['adamw_ms']:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, kernels under the Triton interpreter")
    ap.add_argument("--out", help="write every number to this JSON file")
    ap.add_argument("--shapes", nargs="+", default=None, help="MxN ... (default 4096x4096 4096x11008)")
    ap.add_argument("--ranks", nargs="+", type=int, default=None, help="default 32 64 128 256 512 1024")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["bfloat16", "float32"])
    ap.add_argument("--weight-decay", type=float, default=0.0, help="0 is GaLore's default")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--inner", type=int, default=None, help="calls per timed sample")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--compile-budget-s", type=float, default=330,
                    help="stop timing torch.compile rows once the run is this old (compiles are slow)")
    ap.add_argument("--model", default=None, help="whole-optimizer LLaMA shapes (default llama_1b)")
    ap.add_argument("--layers", type=int, default=None, help="only the first N decoder blocks")
    ap.add_argument("--whole-rank", type=int, default=None, help="default hidden / 4")
    ap.add_argument("--whole-dtypes", nargs="+", default=None, choices=["bfloat16", "float32"])
    ap.add_argument("--whole-repeats", type=int, default=None)
    ap.add_argument("--refresh-repeats", type=int, default=None)
    ap.add_argument("--gap", type=int, default=200)
    ap.add_argument("--whole-projectors", nargs="+", default=["svd"],
                    help="bases whose refresh cost is timed for the amortized step (first one: main table)")
    ap.add_argument("--only-whole", action="store_true", help="skip the per-matrix parts (correctness still runs)")
    ap.add_argument("--whole-impls", nargs="+", default=["torch", "triton"], choices=["torch", "triton"],
                    help="impls timed in the whole-optimizer part (e.g. torch only on a CPU: Triton is interpreted)")
    ap.add_argument("--foreach-batched-max-numel", type=int, default=None,
                    help="foreach: matrices up to this many elements use batched GEMMs (default: the library's, "
                         "gradproj.optimizers.multi_tensor.BATCHED_GEMM_MAX_NUMEL; 0: per-matrix GEMMs only)")
    ap.add_argument("--foreach-batched-devices", nargs="+", default=None, choices=["cuda", "cpu"],
                    help="foreach: device types where small matrices use batched GEMMs (default: the library's, cuda)")
    args = ap.parse_args()
    if args.foreach_batched_max_numel is not None:
        multi_tensor.BATCHED_GEMM_MAX_NUMEL = args.foreach_batched_max_numel
    if args.foreach_batched_devices is not None:
        multi_tensor.BATCHED_GEMM_DEVICES = tuple(args.foreach_batched_devices)
    smoke = args.smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not smoke:
        ap.error("no CUDA device: run with --smoke for the CPU check of this script")
    torch.set_num_threads(1 if smoke else min(torch.get_num_threads(), 16))
    d = dict(shapes=["64x64", "64x172"] if smoke else ["4096x4096", "4096x11008"],
             ranks=[4, 16] if smoke else [32, 64, 128, 256, 512, 1024],
             dtypes=["bfloat16", "float32"], repeats=2 if smoke else 10, inner=1 if smoke else 5,
             model="llama_9m" if smoke else "llama_1b", layers=1 if smoke else None,
             whole_dtypes=["bfloat16"] if smoke else ["bfloat16", "float32"],
             whole_repeats=2 if smoke else 10, refresh_repeats=1 if smoke else 3)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    args.dtypes = [getattr(torch, x) for x in args.dtypes]
    args.whole_dtypes = [getattr(torch, x) for x in args.whole_dtypes]
    torch._dynamo.config.cache_size_limit = 64

    reason = kernels.why_not_triton(torch.empty(0, device=device))
    if reason:
        sys.exit(f"the Triton kernels cannot run: {reason}")
    triton_ops = kernels.load_triton_ops()
    t_start = time.perf_counter()
    import triton

    result = dict(machine=machine(), command="python " + " ".join(sys.argv), torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(), interpreted=triton_ops.INTERPRETED,
                  weight_decay=args.weight_decay, hyper=HP)

    print("1. correctness", flush=True)
    steppers = {fira: make_steppers(fira, args.weight_decay, HP["lr"], triton_ops, not args.no_compile)
                for fira in (False, True)}
    check_shapes = [(67, 131), (131, 67)] if smoke else [(1024, 2816), (2816, 1024)]
    rows, ok1 = check_matrix_steps(check_shapes, 8 if smoke else 128, args.dtypes, device, steppers, t_start,
                                   args.compile_budget_s)
    orows, ok2 = [], True
    for dtype in args.dtypes:
        r, ok = check_optimizer([(40, 24), (24, 40)] if smoke else [(1024, 2816), (2816, 1024)],
                                6 if smoke else 128, dtype, device)
        orows += r
        ok2 = ok2 and ok
    result["correctness"] = dict(matrix_steps=rows, optimizer=orows, ok=ok1 and ok2)
    for r in rows + orows:
        print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    if not (ok1 and ok2):
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        sys.exit("correctness check FAILED: no timings taken (see above)")

    print("2. copy ceiling", flush=True)
    ceiling = copy_ceiling(device, (16 << 20) if smoke else (1 << 30), args.repeats)
    result["copy_ceiling_gbps"] = ceiling / 1e9

    result["per_matrix"], result["bandwidth"] = [], []
    if not args.only_whole:
        print("3. per-matrix step", flush=True)
        result["per_matrix"] = bench_matrices(args, device, steppers, t_start)
        result["bandwidth"] = bench_kernel_bandwidth(args, device, triton_ops, ceiling)

    print("4. whole optimizer", flush=True)
    result["whole"] = []
    for dtype in args.whole_dtypes:
        result["whole"].append(bench_whole(args, device, dtype))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - t_start
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print_tables(result)
    print(f"\n({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
