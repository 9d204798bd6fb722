"""Peak memory of a training step: AdamW, GaLoreAdamW and GaLoreAdamW8bit, normal and per-layer (layerwise=True).

Each configuration runs in its own subprocess: build a LLaMA (transformers' LlamaForCausalLM from a config,
the GaLore paper's configurations), then run ``--steps`` training steps (forward, backward, optimizer step, zero_grad) on
random tokens. Reported per configuration:

* weights, and optimizer-state bytes by part (``gradproj.optimizer_state_bytes``) after the run;
* peak memory of a step — weights + gradients + optimizer state + activations + transients:
  on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size (VmHWM, reset through
  /proc/self/clear_refs) minus the process's size before the model was built (the Python/torch runtime),
  with glibc's mmap threshold fixed at 64 KiB so freed tensors go back to the system at once.
  "first" is the first step (state allocation and the first basis refresh, an SVD, happen in it);
  "steady" the largest of the later steps.

    python benchmarks/memory.py [--models llama_60m llama_130m] [--device cpu|cuda] [--dtype float32|bfloat16]
                                [--batch 1] [--seq 256] [--steps 3] [--json out.json] [--plot docs/memory.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from common import LLAMA, machine, run_worker, status_mib, step_peaks, worker_env
from state_bytes import RANKS, state_bytes  # RANKS: GaLore's pre-training ranks

#: configuration -> (optimizer, layerwise)
CONFIGS = {
    "AdamW": ("adamw", False),
    "AdamW per-layer": ("adamw", True),
    "GaLore": ("galore", False),
    "GaLore per-layer": ("galore", True),
    "GaLore 8-bit": ("galore8bit", False),
    "GaLore 8-bit per-layer": ("galore8bit", True),
}


# ------------------------------------------------------------------------------------------ worker
def worker(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import gradproj

    optimizer, layerwise = CONFIGS[args.config]
    if optimizer == "galore8bit":
        import bitsandbytes.functional  # noqa: F401  (imported before the baseline, like torch)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    baseline = status_mib("VmRSS") if device.type == "cpu" else 0.0

    hidden, inter, heads, layers = LLAMA[args.model]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                      rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    if optimizer == "adamw" and not layerwise:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    elif optimizer == "adamw":  # gradproj without rank groups is full-rank AdamW
        opt = gradproj.GaLoreAdamW(model.parameters(), lr=1e-3, layerwise=True)
    else:
        cls = gradproj.GaLoreAdamW8bit if optimizer == "galore8bit" else gradproj.GaLoreAdamW
        groups = gradproj.param_groups(model, rank=RANKS[args.model], update_proj_gap=200, scale=0.25)
        opt = cls(groups, lr=1e-2, layerwise=layerwise)

    peaks = step_peaks(model, opt, args.steps, args.batch, args.seq, cfg.vocab_size, device, baseline)

    parts = gradproj.optimizer_state_bytes(opt)
    mib = 2**20
    return {
        "model": args.model, "config": args.config, "device": str(device), "dtype": args.dtype,
        "batch": args.batch, "seq": args.seq, "rank": RANKS[args.model] if optimizer != "adamw" else None,
        "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / mib,
        "state_mib": parts["total"] / mib,
        "state_parts_mib": {k: parts[k] / mib for k in ("basis", "moments", "scales", "other")},
        "peak_first_mib": peaks[0], "peak_steady_mib": max(peaks[1:]) if len(peaks) > 1 else peaks[0],
        "runtime_mib": baseline,
    }


# --------------------------------------------------------------------------------------- driver
def run_all(args) -> list[dict]:
    rows = []
    jobs = [(m, c) for m in args.models for c in args.configs]
    env = worker_env(TOKENIZERS_PARALLELISM="false")
    for model, config in tqdm(jobs, desc="configurations"):
        rows.append(run_worker(__file__, model, config, args, env))
        if args.json:  # keep what is done if a later configuration fails
            Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    return rows


def analytic_state_mib(row: dict) -> float:
    """The state count of benchmarks/state_bytes.py for this row's model, optimizer and dtype."""
    optimizer, layerwise = CONFIGS[row["config"]]
    if optimizer == "adamw":
        optimizer = "adamw_gradproj" if layerwise else "adamw"  # torch's AdamW adds a 4-byte step tensor
    return state_bytes(row["model"], optimizer, 4 if row["dtype"] == "float32" else 2) / 2**20


def table(rows: list[dict]) -> str:
    lines = [
        "| model | configuration | weights MiB | optimizer state MiB (basis / moments / scales) | state vs AdamW "
        "| state = analytic count | peak step MiB (first / steady) | peak vs AdamW |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["config"] == "AdamW")
        p = r["state_parts_mib"]
        peak, base_peak = max(r["peak_first_mib"], r["peak_steady_mib"]), max(base["peak_first_mib"], base["peak_steady_mib"])
        lines.append(
            f"| {r['model']} | {r['config']} | {r['weights_mib']:.0f} | {r['state_mib']:.0f} "
            f"({p['basis']:.0f} / {p['moments']:.0f} / {p['scales']:.1f}) | {r['state_mib'] / base['state_mib'] - 1:+.1%} "
            f"| {'yes' if abs(r['state_mib'] - analytic_state_mib(r)) < 1e-9 else 'NO'} "
            f"| {r['peak_first_mib']:.0f} / {r['peak_steady_mib']:.0f} | {peak / base_peak - 1:+.1%} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == model]
        names = [r["config"].replace(" per-layer", "\nper-layer") for r in rs]
        weights = [r["weights_mib"] for r in rs]
        state = [r["state_mib"] for r in rs]
        rest = [max(r["peak_first_mib"], r["peak_steady_mib"]) - w - s for r, w, s in zip(rs, weights, state)]
        x = range(len(rs))
        ax.bar(x, weights, label="weights", color="#4c72b0")
        ax.bar(x, state, bottom=weights, label="optimizer state", color="#dd8452")
        ax.bar(x, rest, bottom=[w + s for w, s in zip(weights, state)],
               label="gradients, activations, transients", color="#bbbbbb")
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_title(model)
        ax.set_ylabel("peak memory of a training step (MiB)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama_60m", "llama_130m"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"],
                    help="weights' dtype; default bfloat16 on CUDA (the papers' setting), float32 on CPU (bf16 matmuls "
                         "are many times slower there without AVX512-BF16/AMX)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--plot", help="write a bar plot (PNG) to this path")
    ap.add_argument("--from-json", help="print the table (and plot) of a saved --json run instead of running")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        rows, desc = saved["rows"], saved["machine"]
    else:
        rows = run_all(args)
        desc = (f"{machine()}; {args.device}, {args.dtype} weights, batch {args.batch} x {args.seq} tokens, "
                f"{args.steps} steps; GaLore rank {'/'.join(str(RANKS[m]) for m in args.models)}, T 200, scale 0.25")
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": desc, "rows": rows}, indent=1))
    print(desc + "\n")
    print(table(rows))
    if args.plot:
        plot(rows, args.plot, desc)


if __name__ == "__main__":
    main()
