"""Amortized optimizer step time and state bytes: GaLoreAdamW vs torch.optim.AdamW vs the original GaLore.

For each model, the optimizers step the decoder blocks' Linear weights (the matrices GaLore projects) with
fixed random gradients. A GaLore step that refreshes the basis (SVD) and a regular step are timed
separately (medians); the amortized step is (refresh + (T - 1) · regular) / T with T = update_proj_gap.
The optimizers of a table step the same parameters in turn (one step of each per round, the first one
rotated every round, medians), so the ratios hold even when the machine's load changes during the run.

The first table: AdamW, GaLoreAdamW and the original GaLore package. The second: the residual methods
with GaLore: FiraAdamW, FrugalAdamW and the original ``fira`` package.

    python benchmarks/step_time.py [--models llama_60m llama_130m] [--gap 200] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import torch

import gradproj
from common import block_matrix_shapes, machine, sync, LLAMA


def make_params(shapes, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).mul_(0.02).to(device, dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
    return params


def analytic_galore_bytes(shapes, rank, elem):
    total = 0
    for m, n in shapes:
        r = min(rank, m, n)
        total += (r * n + 2 * m * r) if m >= n else (m * r + 2 * r * n)  # basis + two moments
    return total * elem


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def interleaved_steps(makers: dict, params, gap: int, repeats: int, state_out: dict | None = None) -> dict:
    """Median regular and refresh step time of each optimizer, stepping them in turn on the same parameters.

    Optimizers without a subspace (torch.optim.AdamW: its ``state["step"]`` is a tensor it owns) are stepped
    as they are; their "refresh" time is just another regular step. ``state_out`` receives state bytes.
    """
    opts = {name: make(params) for name, make in makers.items()}
    for opt in opts.values():
        opt.step()  # first refresh, allocates state
    times = {name: {"regular": [], "refresh": []} for name in opts}
    names = list(opts)
    for i in range(repeats + max(2, repeats // 3)):
        kind, k = ("regular", 1) if i < repeats else ("refresh", gap)
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotate who goes first (cache state)
            opt = opts[name]
            if not isinstance(opt, torch.optim.AdamW):
                for st in opt.state.values():
                    st["step"] = k
            sync(params[0].device)
            t0 = time.perf_counter()
            opt.step()
            sync(params[0].device)
            times[name][kind].append(time.perf_counter() - t0)
    if state_out is not None:
        state_out.update({name: state_bytes(opt) for name, opt in opts.items()})
    return {name: {kind: statistics.median(v) for kind, v in t.items()} for name, t in times.items()}


def residual_table(args, dtype) -> list[dict]:
    have_fira = importlib.util.find_spec("fira") is not None
    rows = []
    for name in args.models:
        shapes = block_matrix_shapes(name)
        rank = LLAMA[name][0] // args.rank_div
        group = {"rank": rank, "update_proj_gap": args.gap, "scale": 0.25, "proj_type": "std"}
        makers = {
            "GaLoreAdamW": lambda ps: gradproj.GaLoreAdamW([{"params": ps, **group}], lr=1e-3),
            "FiraAdamW": lambda ps: gradproj.FiraAdamW([{"params": ps, **group}], lr=1e-3),
            "FrugalAdamW": lambda ps: gradproj.FrugalAdamW([{"params": ps, **group}], lr=1e-3),
        }
        if have_fira:
            import fira

            orig = {k: v for k, v in group.items() if k != "scale"}
            makers["fira 1.0.2"] = lambda ps: fira.FiraAdamW([{"params": ps, **orig, "alpha": 0.25}], lr=1e-3,
                                                               no_deprecation_warning=True)
        params = make_params(shapes, args.device, dtype)
        t = interleaved_steps(makers, params, args.gap, args.repeats)
        amort = {k: (v["refresh"] + (args.gap - 1) * v["regular"]) / args.gap for k, v in t.items()}
        rows.append({"model": name, "rank": rank, "times": t, "amortized": amort})
        del params
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama_60m", "llama_130m"])
    ap.add_argument("--gap", type=int, default=200)
    ap.add_argument("--rank-div", type=int, default=4, help="rank = hidden / rank_div")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--only-residual", action="store_true", help="only the residual-methods table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.only_residual:
        print_residual_table(args, residual_table(args, dtype))
        return
    have_orig = importlib.util.find_spec("galore_torch") is not None
    if have_orig:
        import galore_torch

    rows = []
    for name in args.models:
        shapes = block_matrix_shapes(name)
        rank = LLAMA[name][0] // args.rank_div
        group = {"rank": rank, "update_proj_gap": args.gap, "scale": 0.25, "proj_type": "std"}
        params = make_params(shapes, args.device, dtype)

        def amortized(t):
            return (t["refresh"] + (args.gap - 1) * t["regular"]) / args.gap

        makers = {
            "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0),
            "gradproj": lambda ps: gradproj.GaLoreAdamW([{"params": ps, **group}], lr=1e-3),
        }
        if have_orig:
            makers["original"] = lambda ps: galore_torch.GaLoreAdamW([{"params": ps, **group}], lr=1e-3,
                                                                      no_deprecation_warning=True)
        state = {}
        t = interleaved_steps(makers, params, args.gap, args.repeats, state)  # side by side, rotated order
        expected = analytic_galore_bytes(shapes, rank, torch.finfo(dtype).bits // 8)
        row = {
            "model": name, "rank": rank, "matrices": len(shapes), "device": args.device, "dtype": args.dtype,
            "adamw_ms": t["AdamW"]["regular"] * 1e3, "gradproj_ms": amortized(t["gradproj"]) * 1e3,
            "gradproj_regular_ms": t["gradproj"]["regular"] * 1e3,
            "gradproj_refresh_ms": t["gradproj"]["refresh"] * 1e3, "adamw_state": state["AdamW"],
            "gradproj_state": state["gradproj"], "gradproj_state_analytic": expected,
        }
        if have_orig:
            o = t["original"]
            row.update(orig_ms=amortized(o) * 1e3, orig_regular_ms=o["regular"] * 1e3, orig_refresh_ms=o["refresh"] * 1e3)
        rows.append(row)

    print(f"machine: {machine()}; T = {args.gap}, rank = hidden/{args.rank_div}, dtype {args.dtype}\n")
    print("| model | rank | AdamW ms | gradproj ms (regular / refresh) | original GaLore ms (regular / refresh) "
          "| gradproj / original | gradproj / AdamW | state: gradproj / AdamW | state = analytic |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        orig = (f"{r['orig_ms']:.1f} ({r['orig_regular_ms']:.1f} / {r['orig_refresh_ms']:.0f})"
                if "orig_ms" in r else "not installed")
        ratio_orig = f"{r['gradproj_ms'] / r['orig_ms']:.2f}x" if "orig_ms" in r else "-"
        print(f"| {r['model']} | {r['rank']} | {r['adamw_ms']:.1f} | {r['gradproj_ms']:.1f} "
              f"({r['gradproj_regular_ms']:.1f} / {r['gradproj_refresh_ms']:.0f}) | {orig} | {ratio_orig} "
              f"| {r['gradproj_ms'] / r['adamw_ms']:.2f}x | {r['gradproj_state'] / r['adamw_state']:.1%} "
              f"| {'yes' if r['gradproj_state'] == r['gradproj_state_analytic'] else 'NO'} |")
    residual_rows = residual_table(args, dtype)
    print()
    print_residual_table(args, residual_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"galore": rows, "residual": residual_rows}, f, indent=1)


def print_residual_table(args, rows):
    print(f"residual methods vs GaLore, interleaved: machine {machine()}; T = {args.gap}, rank = hidden/{args.rank_div}\n")
    print("| model | rank | GaLoreAdamW ms (regular / refresh) | FiraAdamW ms | FrugalAdamW ms | fira 1.0.2 ms "
          "| Fira / GaLore regular | Fira / GaLore amortized | Fira / fira 1.0.2 amortized |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, a = r["times"], r["amortized"]

        def cell(k):
            return f"{t[k]['regular'] * 1e3:.1f} / {t[k]['refresh'] * 1e3:.0f}" if k in t else "not installed"

        orig = f"{a['FiraAdamW'] / a['fira 1.0.2']:.2f}x" if "fira 1.0.2" in a else "-"
        print(f"| {r['model']} | {r['rank']} | {cell('GaLoreAdamW')} | {cell('FiraAdamW')} | {cell('FrugalAdamW')} "
              f"| {cell('fira 1.0.2')} | {t['FiraAdamW']['regular'] / t['GaLoreAdamW']['regular']:.2f}x "
              f"| {a['FiraAdamW'] / a['GaLoreAdamW']:.2f}x | {orig} |")


if __name__ == "__main__":
    main()
