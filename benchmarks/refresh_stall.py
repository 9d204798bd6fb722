"""The largest single step and the refresh share of the amortized step, per basis, with and without
``refresh_stagger``, on a whole LLaMA parameter set.

Without stagger every block matrix refreshes its basis at the same step (t % T == 0): that step stalls for
all the decompositions. With ``refresh_stagger=True`` matrix k of N refreshes at t % T == k·T // N, so at most
ceil(N / T) decompositions fall on one step (one, for T >= N).

Every parameter of a LLaMA model (block matrices projected at rank hidden/4, the rest, embedding, head and
norms, unprojected, as in ``step_vs_fused.py``) gets a fixed random gradient. Each configuration (basis ×
stagger) is an optimizer over the same tensors; after the first step (first bases) the T step positions of
a gap are grouped into classes by the shapes of the matrices that refresh there (without stagger: "none"
and "all"; with stagger and T >= N: "none" and one class per matrix shape). A round times one step of every
class with a refresh of every configuration, each right after a regular step (a position without a refresh),
rotating the order of the configurations and of the classes round by round; each step is placed at a
position of its class by setting the step count (another position of the class each round). Steps of one
class do the same work, so a class's extra time, the median over the rounds of (its step − the regular step
just before), stands for all its positions (the pairing cancels the machine's slow drifts):

* regular: the median of the regular steps;
* largest: regular + the largest class extra, in ms and in regular steps (the stall a user sees);
* amortized: regular + the class extras summed over the T positions / T;
* refresh share: (amortized − regular) / amortized.

Times are process CPU time (``time.process_time``), which other processes on a shared machine disturb less
than wall time; run with 1 thread. Bases: ``svd`` (exact, LAPACK), ``eigh`` (Gram matrix, eigensolver in
float64 up to 1024 x 1024), ``eigh_fp32`` (the same with a float32 eigensolver, defined here) and
``randomized_svd`` (q = 1, warm start: the defaults) and, with ``--baseline REF``, ``randomized_svd_baseline``
(the default projector calling the ``randomized_svd`` of git commit REF, with that commit's ``linalg``).

    cd benchmarks && PYTHONPATH=..:. python refresh_stall.py --models llama_60m llama_130m --rounds 3
    cd benchmarks && PYTHONPATH=..:. python refresh_stall.py --models llama_350m --rounds 2 \
        --configs randomized_svd:on randomized_svd:off eigh_fp32:on svd:on
    cd benchmarks && PYTHONPATH=..:. python refresh_stall.py --models llama_350m --rounds 3 --baseline 6b93ba9 \
        --configs randomized_svd:off randomized_svd_baseline:off randomized_svd:on
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

import gradproj
from common import cpu_name, rows_per_thread_count
from gradproj.projectors import register_projector
from gradproj.projectors.eigh import EighProjector
from gradproj.projectors.randomized_svd import RandomizedSVDProjector
from step_vs_fused import make_params, model_shapes


class EighFP32Projector(EighProjector):
    """``eigh`` with the eigensolver in float32 (the Gram matrix is float32 either way)."""

    name = "eigh_fp32"
    solve_dtype = torch.float32


register_projector(EighFP32Projector)


PROJECTORS = ("svd", "eigh", "eigh_fp32", "randomized_svd")


def baseline_randomized_svd(ref: str):
    """``randomized_svd`` as of git commit ``ref``, with the ``linalg`` helpers of that commit (both modules executed
    beside the current ones; bases register explicitly, so nothing of them is registered)."""
    root = Path(__file__).resolve().parent.parent

    def load(name: str, replace: tuple[str, str] | None = None) -> types.ModuleType:
        src = subprocess.run(["git", "show", f"{ref}:gradproj/projectors/{name}.py"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
        if replace is not None:
            src = src.replace(*replace)
        mod = types.ModuleType(f"gradproj.projectors._baseline_{name}")
        mod.__package__ = "gradproj.projectors"
        sys.modules[mod.__name__] = mod
        exec(compile(src, f"{ref}:gradproj/projectors/{name}.py", "exec"), mod.__dict__)
        return mod

    load("linalg")
    return load("randomized_svd", ("from .linalg import", "from ._baseline_linalg import")).randomized_svd


def register_baseline(ref: str) -> None:
    """Register ``randomized_svd_baseline``: the current projector calling ``ref``'s ``randomized_svd``."""
    function = baseline_randomized_svd(ref)
    module = sys.modules[RandomizedSVDProjector.__module__]

    class BaselineRandomizedSVDProjector(RandomizedSVDProjector):
        name = "randomized_svd_baseline"

        def compute_basis(self, G, state, step):
            current = module.randomized_svd
            module.randomized_svd = lambda A, rank, power_dtype=None, **kw: function(A, rank, **kw)
            try:
                return super().compute_basis(G, state, step)
            finally:
                module.randomized_svd = current

    register_projector(BaselineRandomizedSVDProjector)


def refreshing(offsets: list[int], shapes: list[tuple], gap: int, position: int) -> tuple:
    """The sorted shapes of the matrices that refresh at a step t >= 1 with t % gap == position."""
    return tuple(sorted(s for o, s in zip(offsets, shapes) if (position - o) % gap == 0))


def run(name: str, gap: int, rounds: int, configs: list[tuple[str, bool]]) -> dict:
    blocks, other = model_shapes(name)
    rank = blocks[0][0] // 4
    params = make_params(blocks + other, seed=0)
    mats, rest = params[: len(blocks)], params[len(blocks) :]
    opts, classes = {}, {}
    for projector, stagger in configs:
        group = {"params": mats, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "projector": projector}
        group["refresh_stagger"] = stagger
        opt = gradproj.GaLoreAdamW([group, {"params": rest}], lr=1e-3)
        opt.step()  # t = 0: state and first bases
        offsets = [opt.state[p].get("refresh_offset", 0) if stagger else 0 for p in mats]
        by_class: dict[tuple, list[int]] = {}
        for position in range(gap):
            by_class.setdefault(refreshing(offsets, blocks, gap, position), []).append(position)
        opts[(projector, stagger)], classes[(projector, stagger)] = opt, by_class
    keys = list(opts)
    regular_times: dict = {k: [] for k in keys}
    extra: dict = {k: {c: [] for c in classes[k] if c} for k in keys}

    def timed(opt, t: int) -> float:
        for p in params:
            opt.state[p]["step"] = t
        t0 = time.process_time()
        opt.step()
        return time.process_time() - t0

    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            opt, by_class = opts[key], classes[key]
            plain = by_class.get((), [])
            order = [c for c in by_class if c]
            for i, c in enumerate(order[r % max(1, len(order)) :] + order[: r % max(1, len(order))]):
                base = gap * (r + 1)
                positions = by_class[c]
                if plain:  # a regular step right before: the refresh's extra time is the paired difference
                    before = timed(opt, base + plain[(r + i) % len(plain)])
                    regular_times[key].append(before)
                    extra[key][c].append(timed(opt, base + positions[r % len(positions)]) - before)
                else:  # T < N: every position refreshes
                    extra[key][c].append(timed(opt, base + positions[r % len(positions)]))
    out = {}
    for projector, stagger in keys:
        by_class = classes[(projector, stagger)]
        regular = statistics.median(regular_times[(projector, stagger)] or [0.0])
        extras = {c: statistics.median(ts) for c, ts in extra[(projector, stagger)].items()}
        largest = regular + max(extras.values(), default=0.0)
        amortized = regular + sum(e * len(by_class[c]) for c, e in extras.items()) / gap
        out[f"{projector} stagger={stagger}"] = {
            "regular": regular,
            "largest": largest,
            "amortized": amortized,
            "most_matrices_per_step": max(len(c) for c in by_class),
        }
    return {"model": name, "rank": rank, "matrices": len(mats), "threads": torch.get_num_threads(), "times": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama_60m", "llama_130m"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1])
    ap.add_argument("--gap", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--projectors", nargs="+", default=list(PROJECTORS), choices=PROJECTORS)
    ap.add_argument("--stagger", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--configs", nargs="+", metavar="PROJECTOR:on|off",
                    help="these (basis, stagger) pairs instead of --projectors x --stagger (saves memory at 350m)")
    ap.add_argument("--baseline", metavar="REF",
                    help="also offer randomized_svd_baseline: the randomized_svd of git commit REF")
    ap.add_argument("--json")
    args = ap.parse_args()
    known = PROJECTORS
    if args.baseline:
        register_baseline(args.baseline)
        known = (*PROJECTORS, "randomized_svd_baseline")
    if args.configs:
        configs = [(c.split(":")[0], c.split(":")[1] == "on") for c in args.configs]
        for projector, _ in configs:
            if projector not in known:
                ap.error(f"--configs: unknown basis {projector!r}; use one of {', '.join(known)}")
    else:
        configs = [(p, s == "on") for p in args.projectors for s in args.stagger]
    rows = rows_per_thread_count(args.threads, args.models, lambda name: run(name, args.gap, args.rounds, configs))
    print(f"machine: {cpu_name()}, torch {torch.__version__}; T = {args.gap}, rank = hidden/4, float32, "
          f"{args.rounds} rounds, process CPU time, refresh extras paired with a regular step\n")
    print("| model (N matrices) | threads | projector | stagger | regular ms | largest step ms | largest / regular "
          "| amortized ms | refresh share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for label, x in r["times"].items():
            projector, stagger = label.split(" stagger=")
            share = (x["amortized"] - x["regular"]) / x["amortized"]
            print(f"| {r['model']} ({r['matrices']}) | {r['threads']} | {projector} | {stagger} | "
                  f"{x['regular'] * 1e3:.1f} | {x['largest'] * 1e3:.1f} | {x['largest'] / x['regular']:.1f} | "
                  f"{x['amortized'] * 1e3:.1f} | {share:.1%} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
