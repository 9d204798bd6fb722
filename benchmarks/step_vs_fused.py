"""The whole optimizer step of a LLaMA model's parameters against torch's fused AdamW and the GEMM floor.

Every parameter of the model (decoder blocks' Linear weights, RMSNorm weights, embedding, output head) gets
a fixed random gradient. Side by side, one step each per round with the first one rotated every round:

* ``fused AdamW``: ``torch.optim.AdamW(fused=True)`` over all parameters;
* ``gradproj``: ``GaLoreAdamW`` with its defaults (block matrices projected at rank hidden/4, T = 200,
  everything else unprojected); a refresh step and a regular step are timed separately and the amortized
  step is (refresh + (T - 1) · regular) / T;
* ``GEMMs``: the two projection GEMMs of every block matrix alone (R = down(G), W += B(R)) with the basis
  gradproj keeps, in the layout gradproj chooses — the floor of any GaLore step — against a regular step of
  ``GaLoreAdamW`` over the block matrices alone (first table).

Extra columns compare other gradproj configurations (``--variants``).

    PYTHONPATH=. python benchmarks/step_vs_fused.py --models llama_20m llama_60m --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import gradproj
from common import LLAMA, block_matrix_shapes, cpu_name, rows_per_thread_count
from gradproj.kernels.reference import adam_update_fused_
from gradproj.projectors.base import dense_down

VOCAB = 32000
#: the timer (``--clock``): wall time, or the process's CPU time (robust to a loaded machine with 1 thread)
CLOCK = time.perf_counter


def model_shapes(name: str) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(block matrices, other tensors) of a LLaMA configuration with an untied head."""
    h, _, _, layers = LLAMA[name]
    other = [(VOCAB, h), (VOCAB, h), (h,)] + [(h,)] * (2 * layers)
    return block_matrix_shapes(name), other


#: where and in what dtype the parameters live (``--device``, ``--dtype``)
DEVICE, DTYPE = torch.device("cpu"), torch.float32


def make_params(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).mul_(0.02).to(DEVICE, DTYPE)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).mul_(1e-3).to(DEVICE, DTYPE)
    return params


def cuda_clock() -> float:
    """Wall time after the GPU's queued work has finished (``--device cuda``)."""
    torch.cuda.synchronize()
    return time.perf_counter()


#: gradproj configurations (group options; "8bit" is GaLoreAdamW8bit with its defaults, "8bit_eager" the same
#: without the compiled CPU update, "8bit_bnb" the same stepping through bitsandbytes' quantizer calls)
VARIANTS = {
    "default": {},
    "reference": {"adam_kernel": "reference"},
    "randomized_svd": {"projector": "randomized_svd"},
    "eigh": {"projector": "eigh"},
    "8bit": {},
    "8bit_eager": {},  # GaLoreAdamW8bit's eager CPU update (the vectorized quantizer, the same codes)
    "8bit_bnb": {},  # GaLoreAdamW8bit stepping through bitsandbytes' CPU quantizer (the same codes)
    "proj_bf16": {"proj_dtype": "bfloat16"},  # the two projection GEMMs in bfloat16
    "proj_none": {"proj_dtype": None},  # the parameter's dtype (float32) everywhere, against the default "auto"
    # the defaults before the basis, stagger and GEMM dtype were chosen by measurement (galore-torch's schedule)
    "svd_aligned": {"projector": "svd", "refresh_stagger": False, "proj_dtype": None},
    "per_param": {"foreach": False},  # the regular steps always through the per-parameter path
    "batched": {"foreach": True},  # ... always batched (default None: chosen per bucket by timing, on the CPU)
}


class BnbQuantizer:
    """A GaLoreAdamW8bit whose steps call bitsandbytes' CPU quantizer (what the 8-bit step did before the
    vectorized replica; the same codes, bit for bit) instead of the vectorized one."""

    def __init__(self, opt):
        self.opt = opt
        self.state = opt.state

    def step(self):
        from gradproj.inner import adam8bit

        key = str(torch.device("cpu"))
        saved = adam8bit.lut_quantizer(torch.device("cpu"))
        adam8bit._LUT[key] = None
        try:
            self.opt.step()
        finally:
            adam8bit._LUT[key] = saved


class EagerUpdate:
    """A GaLoreAdamW8bit whose steps run the eager CPU update (torch ops and the vectorized quantizer) instead of
    the compiled one."""

    def __init__(self, opt):
        self.opt = opt
        self.state = opt.state

    def step(self):
        from gradproj.inner import adam8bit_fused

        saved = adam8bit_fused._state["kernel"]
        adam8bit_fused._state["kernel"] = None
        try:
            self.opt.step()
        finally:
            adam8bit_fused._state["kernel"] = saved


def run(
    name: str,
    gap: int,
    repeats: int,
    variants: list[str],
    blocks_8bit: bool,
    weight_decay: float = 0.0,
    warmup: int = 8,
) -> dict:
    h = LLAMA[name][0]
    rank = h // 4
    blocks, other = model_shapes(name)
    nb = len(blocks)
    params = make_params(blocks + other, seed=0)
    mats, rest = params[:nb], params[nb:]
    opts: dict = {"fused AdamW": torch.optim.AdamW(params, lr=1e-3, weight_decay=weight_decay, fused=True)}
    for v in variants:
        group = {"params": mats, "rank": rank, "update_proj_gap": gap, "scale": 0.25, **VARIANTS[v]}
        extra = {k: val for k, val in VARIANTS[v].items() if k not in ("projector",)}
        cls = gradproj.GaLoreAdamW8bit if v.startswith("8bit") else gradproj.GaLoreAdamW
        opt = cls([group, {"params": rest, **extra}], lr=1e-3, weight_decay=weight_decay)
        opts[f"gradproj {v}"] = {"8bit_bnb": BnbQuantizer, "8bit_eager": EagerUpdate}.get(v, lambda o: o)(opt)

    # the decoder blocks' matrices alone, default options: the regular step against the GEMMs alone
    def block_group():  # a new dict each time: an optimizer writes its defaults into the groups it is given
        # float32 projections (proj_dtype=None), like the GEMMs it is compared with
        return {"params": mats, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_dtype": None}

    opts["gradproj blocks"] = gradproj.GaLoreAdamW([block_group()], lr=1e-3, weight_decay=weight_decay)
    if blocks_8bit:
        opts["gradproj 8bit blocks"] = gradproj.GaLoreAdamW8bit([block_group()], lr=1e-3, weight_decay=weight_decay)
        opts["gradproj 8bit blocks eager"] = EagerUpdate(
            gradproj.GaLoreAdamW8bit([block_group()], lr=1e-3, weight_decay=weight_decay)
        )
        opts["gradproj 8bit blocks bnb"] = BnbQuantizer(
            gradproj.GaLoreAdamW8bit([block_group()], lr=1e-3, weight_decay=weight_decay)
        )
    if blocks_8bit or any(v.startswith("8bit") for v in variants):
        from gradproj.inner import adam8bit_fused

        # the compiled CPU update, as a run has it after its first ~5e8 8-bit values (built once, a few seconds)
        adam8bit_fused.build()
    for opt in opts.values():
        opt.step()  # allocates state, first basis
    for _ in range(warmup):  # regular steps: gradproj's run-time choices (layouts, foreach=None on the CPU) settle
        for nm, opt in opts.items():
            if nm.startswith("gradproj"):
                opt.step()
    first = opts[f"gradproj {variants[0]}"]
    bases = [first.state[p]["proj"] for p in mats]
    sides = ["right" if p.shape[0] >= p.shape[1] else "left" for p in mats]

    class Gemms:
        def step(self):
            for p, P, side in zip(mats, bases, sides):
                R = dense_down(p.grad, P, side)
                if side == "right":
                    p.data.addmm_(R, P, alpha=-1e-6)
                else:
                    p.data.addmm_(P, R, alpha=-1e-6)

    class GemmsAdam:  # the floor with the one pass Adam must make over R: GEMM, fused Adam on R, GEMM
        def __init__(self):
            self.moments = [
                (torch.zeros(low, device=DEVICE, dtype=DTYPE), torch.zeros(low, device=DEVICE, dtype=DTYPE))
                for low in (dense_down(p.grad, P, side).shape for p, P, side in zip(mats, bases, sides))
            ]

        def step(self):
            for p, P, side, (m, v) in zip(mats, bases, sides, self.moments):
                R = dense_down(p.grad, P, side)
                adam_update_fused_([R], [m], [v], 0.9, 0.999, 1e-6)
                if side == "right":
                    p.data.addmm_(R, P, alpha=-1e-6)
                else:
                    p.data.addmm_(P, R, alpha=-1e-6)

    opts["GEMMs"] = Gemms()
    opts["GEMMs + Adam"] = GemmsAdam()
    names = list(opts)
    times = {k: {"regular": [], "refresh": []} for k in names}
    # staggered refreshes (the default): matrix j refreshes at t % T == its stored offset. A regular round runs
    # at a step count no offset matches; a refresh round drops the offsets, so every matrix refreshes in it
    # (as each does once per gap), and the next step stores them again
    states = [st for o in opts.values() for st in getattr(o, "state", {}).values()]
    offsets = {st["refresh_offset"] % gap for st in states if "refresh_offset" in st}
    regular_step = next(t for t in range(1, gap) if t not in offsets) if len(offsets) < gap else 1
    for i in range(repeats + max(2, repeats // 3)):
        kind, k = ("regular", regular_step) if i < repeats else ("refresh", gap)
        for nm in names[i % len(names) :] + names[: i % len(names)]:
            opt = opts[nm]
            if nm.startswith("gradproj"):
                for st in opt.state.values():
                    st["step"] = k
                    if kind == "refresh":
                        st.pop("refresh_offset", None)
            if nm in ("fused AdamW", "GEMMs", "GEMMs + Adam"):
                if kind == "refresh":
                    continue
            t0 = CLOCK()
            opt.step()
            times[nm][kind].append(CLOCK() - t0)
    out = {}
    for nm, t in times.items():
        reg = statistics.median(t["regular"])
        ref = statistics.median(t["refresh"]) if t["refresh"] else reg
        out[nm] = {"regular": reg, "refresh": ref, "amortized": (ref + (gap - 1) * reg) / gap}
    return {"model": name, "rank": rank, "threads": torch.get_num_threads(), "weight_decay": weight_decay, "times": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama_20m", "llama_60m"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--gap", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    ap.add_argument(
        "--blocks-8bit",
        action="store_true",
        help="also GaLoreAdamW8bit on the block matrices: as it is, with the eager update, through bitsandbytes' quantizer",
    )
    ap.add_argument("--weight-decay", type=float, default=0.0, help="of every optimizer (GaLore's and fused AdamW)")
    ap.add_argument("--warmup", type=int, default=8, help="regular gradproj steps before the timed rounds")
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or process CPU time (with 1 thread: immune to time slicing on a loaded machine)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU goal: --device cuda --dtype bfloat16)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of parameters and gradients")
    ap.add_argument("--json")
    args = ap.parse_args()
    global CLOCK, DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(args.device), getattr(torch, args.dtype)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if DEVICE.type == "cuda":
        if args.clock == "cpu":
            ap.error("--clock cpu measures this process's CPU time, not the GPU's: use --clock wall with --device cuda")
        CLOCK = cuda_clock
    rows = rows_per_thread_count(
        args.threads,
        args.models,
        lambda name: run(name, args.gap, args.repeats, args.variants, args.blocks_8bit, args.weight_decay, args.warmup),
    )
    from gradproj.projectors.base import auto_decisions

    for (m, n, r, side, *_), (dtype, t32, tlow) in auto_decisions().items():
        low = "not timed" if tlow is None else f"{tlow * 1e3:.2f} ms"
        print(f"proj_dtype='auto' for {m}x{n} rank {r} ({side}): float32 {t32 * 1e3:.2f} ms, low precision {low} -> {dtype}")
    print(
        f"machine: {cpu_name()}, torch {torch.__version__}; T = {args.gap}, rank = hidden/4, {args.dtype} on {args.device}, "
        f"{args.repeats} regular rounds, medians, {args.clock} clock, weight decay {args.weight_decay:g}\n"
    )
    print(
        "| model | threads | blocks: GEMMs alone ms | blocks: GaLoreAdamW regular step ms | regular / GEMMs "
        "| blocks: GaLoreAdamW8bit regular ms | 8-bit / fp32 | 8-bit, eager update ms | / fp32 "
        "| 8-bit, bitsandbytes' quantizer ms | / fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["times"]
        g, b = t["GEMMs"]["regular"], t["gradproj blocks"]["regular"]
        eight = []
        for key in ("gradproj 8bit blocks", "gradproj 8bit blocks eager", "gradproj 8bit blocks bnb"):
            q = t.get(key, {}).get("regular")
            eight.append(f"{q * 1e3:.1f} | {q / b:.2f}x" if q else "- | -")
        print(
            f"| {r['model']} | {r['threads']} | {g * 1e3:.1f} | {b * 1e3:.1f} | {b / g:.2f}x | "
            + " | ".join(eight)
            + " |"
        )
    print()
    print(
        "| model | threads | fused AdamW ms | GEMMs ms | "
        + " | ".join(
            f"{v}: amortized (regular / refresh) ms | {v} / fused | {v} regular / GEMMs | {v} refresh share"
            for v in args.variants
        )
        + " |"
    )
    print("|---|---|---|---|" + "---|---|---|---|" * len(args.variants))
    for r in rows:
        t = r["times"]
        f, g = t["fused AdamW"]["regular"], t["GEMMs"]["regular"]
        cells = []
        for v in args.variants:
            x = t[f"gradproj {v}"]
            share = (x["refresh"] - x["regular"]) / args.gap / x["amortized"]
            cells.append(
                f"{x['amortized'] * 1e3:.1f} ({x['regular'] * 1e3:.1f} / {x['refresh'] * 1e3:.0f}) "
                f"| {x['amortized'] / f:.2f}x | {x['regular'] / g:.2f}x | {share:.1%}"
            )
        print(f"| {r['model']} | {r['threads']} | {f * 1e3:.1f} | {g * 1e3:.1f} | " + " | ".join(cells) + " |")
    print()
    print(
        f"Block matrices alone, weight decay {args.weight_decay:g}: the regular step against its two projection GEMMs "
        "and against those GEMMs plus the one fused Adam pass over R (the floor with Adam's own pass)"
    )
    print()
    print(
        "| model | threads | GEMMs ms | GEMMs + Adam pass ms | GaLoreAdamW regular ms | regular / GEMMs "
        "| regular / (GEMMs + Adam) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["times"]
        g, ga, b = t["GEMMs"]["regular"], t["GEMMs + Adam"]["regular"], t["gradproj blocks"]["regular"]
        print(
            f"| {r['model']} | {r['threads']} | {g * 1e3:.1f} | {ga * 1e3:.1f} | {b * 1e3:.1f} | {b / g:.3f}x "
            f"| {b / ga:.3f}x |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
