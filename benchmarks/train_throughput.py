"""End-to-end training throughput: a whole training step (forward, backward, optimizer step, zero_grad) of a
LLaMA model (``gradproj.train.models.build_model``, vocabulary 32000, untied head) on random tokens, against
torch's fused AdamW.

Configurations, all in one process:

* ``AdamW fused``: ``torch.optim.AdamW(fused=True)`` over all parameters;
* ``AdamW``: ``torch.optim.AdamW`` with its defaults;
* ``GaLore``: ``gradproj.GaLoreAdamW`` over ``gradproj.param_groups(model, rank=hidden/4, update_proj_gap=T)``,
  every other option at its default;
* ``GaLore stagger``: the same with ``refresh_stagger=True``;
* ``GaLore projected``: ``GaLore`` with ``gradproj.project_backward``.

Step 0 (state allocation, first bases) runs untimed for every configuration. Then one refresh step per
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

CONFIGS = ("AdamW fused", "AdamW", "GaLore", "GaLore stagger", "GaLore projected")
VOCAB = 32000


def build(model_name: str, config: str, seq: int, gap: int):
    """(model, optimizer, projected-backward handle or None) of one configuration; the model's weights are the
    same for every configuration."""
    import torch

    import gradproj
    from gradproj.train.models import build_model

    model = build_model(model_name, vocab_size=VOCAB, max_seq_len=max(seq, 512), seed=0, dtype=torch.float32)
    if config == "AdamW fused":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), None
    if config == "AdamW":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), None
    extra = {"refresh_stagger": True} if config == "GaLore stagger" else {}
    groups = gradproj.param_groups(model, rank=LLAMA[model_name][0] // 4, update_proj_gap=gap, **extra)
    opt = gradproj.GaLoreAdamW(groups, lr=1e-3)
    handle = gradproj.project_backward(model, opt) if config == "GaLore projected" else None
    return model, opt, handle


def train_step(model, opt, tokens) -> float:
    t0 = time.perf_counter()
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def force_refresh(opt, gap: int) -> None:
    """Makes the next step a refresh of every projected matrix (see the module's docstring)."""
    from gradproj.projectors.schedule import OFFSET_KEY

    for state in opt.state.values():
        state["step"] = gap
        state.pop(OFFSET_KEY, None)


def run(model_name: str, args) -> dict:
    import torch

    runs = {c: build(model_name, c, args.seq, args.gap) for c in CONFIGS}
    g = torch.Generator().manual_seed(0)

    def batch():
        return torch.randint(0, VOCAB, (args.batch, args.seq), generator=g)

    tokens = batch()
    for model, opt, _ in runs.values():  # step 0: state, first bases; untimed
        train_step(model, opt, tokens)
    refresh = {}
    tokens = batch()
    for config in CONFIGS:
        if config.startswith("GaLore"):
            force_refresh(runs[config][1], args.gap)
            refresh[config] = train_step(*runs[config][:2], tokens)
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for rnd in range(args.rounds):
        tokens = batch()
        k = rnd % len(CONFIGS)
        for config in CONFIGS[k:] + CONFIGS[:k]:
            times[config].append(train_step(*runs[config][:2], tokens))
    del runs
    out = {}
    for config in CONFIGS:
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
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = rows_per_thread_count(args.threads, args.models, lambda name: run(name, args))
    print(
        f"machine: {cpu_name()}, torch {torch.__version__}; float32, batch {args.batch} x {args.seq} tokens, "
        f"GaLore rank hidden/4, T = {args.gap}; {args.rounds} rotated rounds, medians; "
        f"{time.perf_counter() - t0:.0f} s\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
