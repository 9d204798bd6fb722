"""This checkout's optimizer step against another version of gradproj, side by side in one process.

The other version is a source tree (e.g. ``git archive <commit> gradproj | tar -x -C /tmp/base``) imported
as the package ``gradproj_baseline``; both step the same parameter set — every tensor of a LLaMA model:
the decoder blocks' Linear weights (projected), their norms, the embedding and the head (unprojected) —
with fixed random gradients, in rotated rounds (one step of each version per round, the first one rotated),
so the ratio holds when the machine's load changes during the run. Regular steps and refresh steps are
timed separately (medians); the amortized step is (refresh + (T - 1) · regular) / T.

    git archive 7c2730e gradproj | tar -x -C /tmp/base
    python benchmarks/versions.py --baseline /tmp/base --models llama_20m llama_60m [--threads 2] [--weight-decay 0 0.1]

``--optimizer GaLoreAdamW8bit`` compares the 8-bit optimizers; each version's compiled CPU update is built
before the timed rounds where that version has one (as a run has it after its first ~5·10^8 8-bit values).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import gradproj
from common import LLAMA, block_matrix_shapes, machine

VOCAB = 32000


def load_baseline(src: str):
    root = Path(src) / "gradproj"
    spec = importlib.util.spec_from_file_location("gradproj_baseline", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gradproj_baseline"] = module
    spec.loader.exec_module(module)
    return module


def model_shapes(name: str) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(projected matrices, unprojected tensors) of a LLaMA model."""
    h, _, _, layers = LLAMA[name]
    return block_matrix_shapes(name), [(VOCAB, h), (VOCAB, h), (h,)] + [(h,)] * (2 * layers)


def make_params(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).mul_(0.02)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def build(package, projected, regular, rank, gap, weight_decay=0.0, optimizer="GaLoreAdamW"):
    groups = [{"params": regular}, {"params": projected, "rank": rank, "update_proj_gap": gap, "scale": 0.25}]
    return getattr(package, optimizer)(groups, lr=1e-3, weight_decay=weight_decay)


def build_8bit_kernel(package) -> None:
    """Build the version's compiled 8-bit CPU update now, where it has one."""
    try:
        fused = importlib.import_module(package.__name__ + ".inner.adam8bit_fused")
    except ImportError:
        return
    fused.build()


#: the timer (``--clock``): wall time, or the process's CPU time (robust to a loaded machine with 1 thread)
CLOCK = time.perf_counter


def timed(opt) -> float:
    t0 = CLOCK()
    opt.step()
    return CLOCK() - t0


def compare(
    name: str, baseline, gap: int, repeats: int, weight_decay: float = 0.0, warmup: int = 8, optimizer="GaLoreAdamW"
) -> dict:
    shapes, others = model_shapes(name)
    rank = LLAMA[name][0] // 4
    runs = {}
    for label, package in (("this", gradproj), ("baseline", baseline)):
        projected, regular = make_params(shapes, 0), make_params(others, 1)
        runs[label] = build(package, projected, regular, rank, gap, weight_decay, optimizer)
        if optimizer.endswith("8bit"):
            build_8bit_kernel(package)
    for opt in runs.values():
        for _ in range(1 + warmup):  # the first refresh allocates the state; then regular steps (run-time choices)
            opt.step()
    times = {label: {"regular": [], "refresh": []} for label in runs}
    labels = list(runs)
    # staggered refreshes (refresh_stagger): matrix j refreshes at t % T == its stored offset. A regular round runs
    # at a step count no offset matches; a refresh round drops the offsets, so every matrix refreshes in it (as
    # each does once per gap), and the next step stores them again
    states = [st for opt in runs.values() for st in opt.state.values()]
    offsets = {st["refresh_offset"] % gap for st in states if "refresh_offset" in st}
    regular_step = next(t for t in range(1, gap) if t not in offsets) if len(offsets) < gap else 1

    def at_step(opt, step: int, refresh: bool) -> None:
        for st in opt.state.values():
            if "step" in st:
                st["step"] = step
                if refresh:
                    st.pop("refresh_offset", None)

    for i in range(repeats):
        order = labels[i % 2:] + labels[:i % 2]
        for label in order:
            at_step(runs[label], regular_step, False)
            times[label]["regular"].append(timed(runs[label]))  # a regular step
        for label in order:
            at_step(runs[label], gap, True)  # the next step refreshes every matrix
            times[label]["refresh"].append(timed(runs[label]))
    row = {"model": name, "rank": rank, "gap": gap, "weight_decay": weight_decay}
    for label in labels:
        reg = statistics.median(times[label]["regular"])
        ref = statistics.median(times[label]["refresh"])
        row[f"{label}_regular_ms"] = 1e3 * reg
        row[f"{label}_refresh_ms"] = 1e3 * ref
        row[f"{label}_amortized_ms"] = 1e3 * (ref + (gap - 1) * reg) / gap
    for kind in ("regular", "refresh", "amortized"):
        row[f"{kind}_ratio"] = row[f"this_{kind}_ms"] / row[f"baseline_{kind}_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a directory holding the other version's gradproj/")
    ap.add_argument("--models", nargs="+", default=["llama_20m", "llama_60m"])
    ap.add_argument("--gap", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, nargs="+", default=[0.0])
    ap.add_argument("--warmup", type=int, default=8, help="regular steps of each version before the timed rounds")
    ap.add_argument("--optimizer", default="GaLoreAdamW", choices=["GaLoreAdamW", "GaLoreAdamW8bit"])
    ap.add_argument("--json")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or process CPU time (with 1 thread: immune to time slicing on a loaded machine)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline)
    rows = [compare(name, baseline, args.gap, args.repeats, wd, args.warmup, args.optimizer)
            for wd in args.weight_decay for name in args.models]
    print(f"# {machine()}; {args.optimizer} on a whole LLaMA parameter set, rank hidden/4, T {args.gap}, "
          f"{args.clock} clock, {args.repeats} rounds")
    print("| model | weight decay | regular (this / baseline, ms) | refresh (ms) | amortized (ms) | ratio regular "
          "| ratio amortized |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['weight_decay']:g} | {r['this_regular_ms']:.1f} / {r['baseline_regular_ms']:.1f} "
              f"| {r['this_refresh_ms']:.0f} / {r['baseline_refresh_ms']:.0f} "
              f"| {r['this_amortized_ms']:.1f} / {r['baseline_amortized_ms']:.1f} "
              f"| {r['regular_ratio']:.3f} | {r['amortized_ratio']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
