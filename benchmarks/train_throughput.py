"""End-to-end training throughput: a whole training step (forward, backward, optimizer step, zero_grad) of a
LLaMA model (``gradproj.train.models.build_model``, vocabulary 32000, untied head) on random tokens, against
torch's fused AdamW.

Configurations, all in one process:

* ``AdamW fused``: ``torch.optim.AdamW(fused=True)`` over all parameters;
* ``AdamW``: ``torch.optim.AdamW`` with its defaults;
* ``GaLore``: ``gradproj.GaLoreAdamW`` over ``gradproj.param_groups(model, rank=hidden/4, update_proj_gap=T)``,
  every other option at its default;
* ``GaLore svd aligned``: the same with ``projector="svd", refresh_stagger=False, proj_dtype=None`` (the
  defaults before these were chosen by measurement; galore-torch's schedule);
* ``GaLore projected``: ``GaLore`` with ``gradproj.project_backward``;
* ``GaLore baseline`` (with ``--baseline DIR``): ``GaLore`` built by another version's package (a source tree
  holding ``gradproj/``, e.g. ``git archive <commit> gradproj | tar -x -C DIR``), for a before/after.

``--configs`` picks a subset (``AdamW fused`` is always kept: the ratios are against it). ``--weight-decay``
applies to every optimizer.

Step 0 (state allocation, first bases) and ``--warmup`` regular steps (gradproj's run-time choices settle) run
untimed for every configuration. Then one refresh step per
GaLore configuration is timed alone: every state's step counter is set to a multiple of T (and stagger's
stored offsets are dropped, so all its matrices refresh at that step, as all of them do once per gap). Then
``--rounds`` rounds time one regular step of each configuration, the first one rotated every round; the
regular step is the median over the rounds. Amortized step = (refresh + (T - 1) · regular) / T, tokens/s
= batch · seq / amortized (AdamW has no refresh: its amortized step is its regular one). With stagger a
round may include one matrix's refresh (its offsets are k·T // N); the median absorbs it.

Peak memory of these configurations: ``benchmarks/memory.py`` and ``benchmarks/project_backward.py``.

    cd benchmarks && PYTHONPATH=..:. python train_throughput.py --models llama_20m llama_60m --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import LLAMA, cpu_name, rows_per_thread_count

CONFIGS = ("AdamW fused", "AdamW", "GaLore", "GaLore svd aligned", "GaLore projected", "GaLore baseline")
#: the group options before the basis, stagger and GEMM dtype were chosen by measurement (galore-torch's schedule)
SVD_ALIGNED = {"projector": "svd", "refresh_stagger": False, "proj_dtype": None}
VOCAB = 32000
#: the other version's package (``--baseline``), or None
BASELINE = None
#: the timer (``--clock``): wall time, or the process's CPU time (robust to a loaded machine with 1 thread)
CLOCK = time.perf_counter


def build(model_name: str, config: str, seq: int, gap: int, weight_decay: float = 0.0):
    """(model, optimizer, projected-backward handle or None) of one configuration; the model's weights are the
    same for every configuration."""
    import torch

    import gradproj
    from gradproj.train.models import build_model

    model = build_model(model_name, vocab_size=VOCAB, max_seq_len=max(seq, 512), seed=0, dtype=torch.float32)
    if config == "AdamW fused":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=weight_decay, fused=True), None
    if config == "AdamW":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=weight_decay), None
    package = BASELINE if config == "GaLore baseline" else gradproj
    extra = SVD_ALIGNED if config == "GaLore svd aligned" else {}
    groups = package.param_groups(model, rank=LLAMA[model_name][0] // 4, update_proj_gap=gap, **extra)
    opt = package.GaLoreAdamW(groups, lr=1e-3, weight_decay=weight_decay)
    handle = gradproj.project_backward(model, opt) if config == "GaLore projected" else None
    return model, opt, handle


def train_step(model, opt, tokens) -> float:
    t0 = CLOCK()
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return CLOCK() - t0


def force_refresh(opt, gap: int) -> None:
    """Makes the next step a refresh of every projected matrix (see the module's docstring)."""
    from gradproj.projectors.schedule import OFFSET_KEY

    for state in opt.state.values():
        state["step"] = gap
        state.pop(OFFSET_KEY, None)


def run(model_name: str, args) -> dict:
    import torch

    configs = args.configs
    runs = {c: build(model_name, c, args.seq, args.gap, args.weight_decay) for c in configs}
    g = torch.Generator().manual_seed(0)

    def batch():
        return torch.randint(0, VOCAB, (args.batch, args.seq), generator=g)

    tokens = batch()
    for model, opt, _ in runs.values():  # step 0: state, first bases; untimed
        train_step(model, opt, tokens)
    for _ in range(args.warmup):
        tokens = batch()
        for model, opt, _ in runs.values():
            train_step(model, opt, tokens)
    refresh = {}
    tokens = batch()
    for config in configs:
        if config.startswith("GaLore"):
            force_refresh(runs[config][1], args.gap)
            refresh[config] = train_step(*runs[config][:2], tokens)
    times: dict[str, list[float]] = {c: [] for c in configs}
    for rnd in range(args.rounds):
        tokens = batch()
        k = rnd % len(configs)
        for config in configs[k:] + configs[:k]:
            times[config].append(train_step(*runs[config][:2], tokens))
    del runs
    out = {}
    for config in configs:
        regular = statistics.median(times[config])
        ref = refresh.get(config, regular)
        amortized = (ref + (args.gap - 1) * regular) / args.gap
        out[config] = {
            "regular_s": regular,
            "refresh_s": ref,
            "amortized_s": amortized,
            "tokens_per_s": args.batch * args.seq / amortized,
        }
    return {"model": model_name, "threads": torch.get_num_threads(), "times": out}


def table(rows: list[dict]) -> str:
    cols = ["regular step s", "refresh step s", "amortized step s", "tokens/s", "vs AdamW fused"]
    lines = ["| model | threads | configuration | " + " | ".join(cols) + " |", "|---|---|---|" + "---:|" * len(cols)]
    for r in rows:
        base = r["times"]["AdamW fused"]["tokens_per_s"]
        for config, t in r["times"].items():
            cells = (
                f"{t['regular_s']:.3f} | {t['refresh_s']:.3f} | {t['amortized_s']:.3f} | "
                f"{t['tokens_per_s']:.0f} | {t['tokens_per_s'] / base:.2f}x"
            )
            lines.append(f"| {r['model']} | {r['threads']} | {config} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama_20m", "llama_60m"], choices=sorted(LLAMA))
    ap.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gap", type=int, default=200, help="update_proj_gap T")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=8, help="untimed regular steps after step 0")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c != "GaLore baseline"], choices=CONFIGS)
    ap.add_argument("--baseline", help="a directory holding another version's gradproj/ (adds 'GaLore baseline')")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or process CPU time (with 1 thread: immune to time slicing on a loaded machine)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    args.configs = ["AdamW fused"] + [c for c in args.configs if c != "AdamW fused"]
    if args.baseline:
        global BASELINE
        from versions import load_baseline

        BASELINE = load_baseline(args.baseline)
        if "GaLore baseline" not in args.configs:
            args.configs.append("GaLore baseline")
    elif "GaLore baseline" in args.configs:
        ap.error("--configs 'GaLore baseline' needs --baseline DIR")
    t0 = time.perf_counter()
    rows = rows_per_thread_count(args.threads, args.models, lambda name: run(name, args))
    print(
        f"machine: {cpu_name()}, torch {torch.__version__}; float32, batch {args.batch} x {args.seq} tokens, "
        f"GaLore rank hidden/4, T = {args.gap}, weight decay {args.weight_decay:g}; {args.rounds} rotated rounds, "
        f"medians, {args.clock} clock; "
        f"{time.perf_counter() - t0:.0f} s\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
