"""``proj_dtype``: "auto" (the default), None (the parameter's float32) and "bfloat16" for GaLoreAdamW: speed and
quality.

Speed (``--speed``): the decoder blocks' matrices of a LLaMA configuration (rank hidden/4, fixed random
gradients), a regular step (no refresh) of ``GaLoreAdamW`` with each ``proj_dtype``, and the two projection
GEMMs alone (R = down(G), W += B(R)) in float32 and in bfloat16 (the basis cast once, as the option caches
it). One round times each once, the first one rotated every round; medians. It also prints what "auto"
measured and chose for each matrix shape in this process, and the time its measurements took (once per
shape and process, inside the first step).

Quality (``--quality``): benchmarks/quality.py's byte-level LLaMA, ``GaLoreAdamW`` and ``GaLoreAdamW-bf16proj``
trained in lockstep (same initial model, same batches) for each seed; final validation losses, their mean and
spread (max − min) over the seeds, and the paired difference per seed.

    PYTHONPATH=. python benchmarks/proj_dtype.py --speed --models llama_20m llama_60m --threads 1
    PYTHONPATH=. python benchmarks/proj_dtype.py --quality --seeds 0 1 2 --steps 200 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradproj
import quality
from common import block_matrix_shapes, cpu_name, LLAMA
from gradproj.projectors import base
from gradproj.projectors.base import dense_down

DTYPES = (None, "bfloat16", "auto")


def speed(name: str, repeats: int) -> dict:
    h = LLAMA[name][0]
    rank = h // 4
    g = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(s, generator=g).mul_(0.02)) for s in block_matrix_shapes(name)]
    for p in mats:
        p.grad = torch.randn(p.shape, generator=g).mul_(1e-3)
    measuring = [0.0]
    timer = base.measure_seconds

    def timed(label, run, device, repeats=1):  # the wall time of auto's own measurements
        t0 = time.perf_counter()
        try:
            return timer(label, run, device, repeats)
        finally:
            measuring[0] += time.perf_counter() - t0

    base.measure_seconds = timed
    opts = {}
    try:
        for dt in DTYPES:
            group = {"params": mats, "rank": rank, "update_proj_gap": 10**9, "scale": 0.25, "proj_dtype": dt}
            opts[f"step {dt}"] = gradproj.GaLoreAdamW([group], lr=1e-3)
            opts[f"step {dt}"].step()  # state and first basis (auto: its measurements)
    finally:
        base.measure_seconds = timer
    auto = opts["step auto"]
    picked = {}
    for p in mats:
        (m, n), code = p.shape, auto.state[p][base.AUTO_KEY]
        side = "right" if m >= n else "left"
        key = (m, n, rank, side, p.dtype, p.device, None)
        _, fp32, low = base.auto_decisions()[key]
        picked[(m, n, side)] = (base.AUTO_LABELS[code], fp32, low)
    first = opts["step None"]
    bases = [first.state[p]["proj"] for p in mats]
    sides = ["right" if p.shape[0] >= p.shape[1] else "left" for p in mats]

    class Gemms:
        def __init__(self, dtype, inputs=False):
            self.dtype, self.inputs = dtype, inputs
            self.bases = [P.to(dtype) for P in bases]  # cast once, as proj_dtype caches it per refresh

        def step(self):
            if self.inputs:  # float32 GEMMs in oneDNN's bfloat16 math mode, as auto's "bfloat16 inputs" runs them
                with base.bf16_input_gemms():
                    self._step()
            else:
                self._step()

        def _step(self):
            for p, P, side in zip(mats, self.bases, sides):
                R = dense_down(p.grad.to(self.dtype), P, side).float()
                if self.dtype == torch.float32:  # the float32 path's fused GEMM into W
                    p.data.addmm_(*((R, P) if side == "right" else (P, R)), alpha=-1e-6)
                else:
                    B = (R.to(self.dtype) @ P) if side == "right" else (P @ R.to(self.dtype))
                    p.data.add_(B, alpha=-1e-6)

    opts["GEMMs float32"], opts["GEMMs bfloat16"] = Gemms(torch.float32), Gemms(torch.bfloat16)
    if base.bf16_inputs_available(torch.device("cpu")):
        opts["GEMMs bfloat16 inputs"] = Gemms(torch.float32, inputs=True)
    names = list(opts)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(repeats):
        for nm in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            opts[nm].step()
            times[nm].append(time.perf_counter() - t0)
    return {"model": name, "rank": rank, "picked": picked, "measuring": measuring[0],
            **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--models", nargs="+", default=["llama_20m", "llama_60m"])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gap", type=int, default=100, help="update_proj_gap T (quality.py's default)")
    quality.add_model_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, torch {torch.__version__}, {args.threads} thread(s)\n")
    if args.speed:
        rows = [speed(name, args.repeats) for name in args.models]
        print("| model | rank | GaLoreAdamW regular step ms: None / bfloat16 / auto | bfloat16 / None | auto / None "
              "| GEMMs alone ms: float32 / bfloat16 / bfloat16 inputs | bfloat16 / float32 | bfloat16 inputs / float32 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            a, b, c = r["step None"], r["step bfloat16"], r["step auto"]
            d, e, f = r["GEMMs float32"], r["GEMMs bfloat16"], r.get("GEMMs bfloat16 inputs")
            fs, fr = ("-", "-") if f is None else (f"{f * 1e3:.1f}", f"{f / d:.2f}x")
            print(f"| {r['model']} | {r['rank']} | {a * 1e3:.1f} / {b * 1e3:.1f} / {c * 1e3:.1f} | {b / a:.2f}x "
                  f"| {c / a:.2f}x | {d * 1e3:.1f} / {e * 1e3:.1f} / {fs} | {e / d:.2f}x | {fr} |")
        print()
        print("What auto measured (best of its runs, down + add_up_ of one matrix) and chose; its measurements' "
              "time, once per shape and process:\n")
        print("| model | matrix (side) | float32 ms | faster low-precision path ms | / float32 | auto chose "
              "| measuring, whole model ms |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            for i, ((m, n, side), (dt, fp32, low)) in enumerate(r["picked"].items()):
                lows = "not timed" if low is None else f"{low * 1e3:.2f}"
                ratio = "-" if low is None else f"{low / fp32:.2f}x"
                cost = f"{r['measuring'] * 1e3:.0f}" if i == 0 else ""
                print(f"| {r['model']} | {m}x{n} ({side}) | {fp32 * 1e3:.2f} | {lows} | {ratio} "
                      f"| {dt} | {cost} |")
        print()
    if args.quality:
        names = ["GaLoreAdamW", "GaLoreAdamW-bf16proj"]
        if base.bf16_inputs_available(torch.device("cpu")):
            names.append("GaLoreAdamW-bf16inputs")
        finals: dict[str, list[float]] = {n: [] for n in names}
        for seed in args.seeds:
            q = argparse.Namespace(**{**vars(args), "seed": seed, "optimizers": names, "rank": args.hidden // 4,
                                      "gap": args.gap, "scale": 0.25, "lr_galore": 1e-2, "lr_adamw": 3e-3,
                                      "lr_frugal": 3e-3, "warmup": 0.1, "min_lr": 0.1, "eval_every": args.steps,
                                      "eval_batches": 4, "data_bytes": 4_000_000})
            for row in quality.run(q)["rows"]:
                finals[row["optimizer"]].append(row["val_loss"])
        low = names[1:]
        print("| seed | " + " | ".join(f"{n} val loss" for n in names) + " | "
              + " | ".join(f"{n[len('GaLoreAdamW-'):]} − fp32" for n in low) + " |")
        print("|---" * (len(names) + len(low) + 1) + "|")
        for i, seed in enumerate(args.seeds):
            a = finals[names[0]][i]
            print(f"| {seed} | " + " | ".join(f"{finals[n][i]:.4f}" for n in names) + " | "
                  + " | ".join(f"{finals[n][i] - a:+.4f}" for n in low) + " |")
        cells = [f"{statistics.fmean(v):.4f} ± {(max(v) - min(v)) / 2:.4f}" for v in finals.values()]
        diffs = [statistics.fmean(b - a for a, b in zip(finals[names[0]], finals[n])) for n in low]
        print("| mean ± half-range | " + " | ".join(cells) + " | " + " | ".join(f"{d:+.4f}" for d in diffs) + " |")


if __name__ == "__main__":
    main()
