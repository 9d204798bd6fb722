"""Projected backward (``gradproj.project_backward``) against AdamW, GaLore and GaLore per-layer.

Three measurements, each of LLaMA configurations of the GaLore paper (transformers' LlamaForCausalLM, vocabulary
32000, GaLore's rank, update_proj_gap 200, scale 0.25):

* ``memory``: peak memory of a training step (forward, backward, optimizer step, zero_grad), each configuration
  in its own subprocess, measured as ``benchmarks/memory.py`` does (CUDA: ``max_memory_allocated``; CPU: peak
  RSS above the process's size before the model was built). "refresh" is the first step (state allocation and
  the SVD refresh: projected backward computes the full gradients then), "steady" the largest later step.
* ``time``: backward time and tokens/s of a whole step, all configurations in one process, one step each per
  round in rotated order (so load on a shared machine hits them alike), medians over the rounds; the refresh
  step is a warm-up and not timed. Per-layer GaLore steps inside backward, so its backward includes the update.
* ``ddp``: bytes DDP all-reduces per step (a counting comm hook over 2 gloo processes), plus the full gradients
  projected backward averages itself at refresh steps.

    python benchmarks/project_backward.py [--models llama_60m] [--parts memory time ddp] [--batch 2] [--seq 256]
                                          [--steps 3] [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common import LLAMA, machine, run_worker, status_mib, step_peaks, worker_env
from state_bytes import RANKS

CONFIGS = ("AdamW", "GaLore", "GaLore per-layer", "GaLore projected")


def build(model_name: str, config: str, device, dtype, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import gradproj

    hidden, inter, heads, layers = LLAMA[model_name]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                      rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    handle = None
    if config == "AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        groups = gradproj.param_groups(model, rank=RANKS[model_name], update_proj_gap=200, scale=0.25)
        opt = gradproj.GaLoreAdamW(groups, lr=1e-2, layerwise=config == "GaLore per-layer")
        if config == "GaLore projected":
            handle = gradproj.project_backward(model, opt)
    return model, opt, handle


# ------------------------------------------------------------------------------------------ memory
def memory_worker(args) -> dict:
    import torch

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    baseline = status_mib("VmRSS") if device.type == "cpu" else 0.0
    model, opt, _ = build(args.model, args.config, device, dtype)
    peaks = step_peaks(model, opt, args.steps, args.batch, args.seq, 32000, device, baseline)
    return {"model": args.model, "config": args.config, "refresh_mib": peaks[0], "steady_mib": max(peaks[1:])}


def memory_rows(args) -> list[dict]:
    env = worker_env()
    return [run_worker(__file__, model, config, args, env) for model in args.models for config in CONFIGS]


def vs_galore_table(rows: list[dict], columns: list[str], cells: Callable[[dict, dict], str]) -> str:
    """A markdown table, a row per configuration of each model: model, configuration, then the numeric
    ``columns`` whose ``cells(row, galore)`` gets the row and the GaLore row of its model to compare with."""
    lines = ["| model | configuration | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["config"] == "GaLore")
        lines.append(f"| {r['model']} | {r['config']} | {cells(r, base)} |")
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    return vs_galore_table(
        rows, ["peak MiB, refresh step", "peak MiB, steady step", "steady vs GaLore"],
        lambda r, base: f"{r['refresh_mib']:.0f} | {r['steady_mib']:.0f} | "
                        f"{r['steady_mib'] / base['steady_mib'] - 1:+.1%}")


# -------------------------------------------------------------------------------------------- time
def time_rows(args) -> list[dict]:
    import torch

    from common import sync

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for model_name in args.models:
        runs = {c: build(model_name, c, device, dtype) for c in CONFIGS}
        g = torch.Generator().manual_seed(0)
        times: dict[str, list[tuple[float, float]]] = {c: [] for c in CONFIGS}
        for rnd in range(args.rounds + 1):  # round 0: the refresh step, untimed
            order = CONFIGS[rnd % len(CONFIGS):] + CONFIGS[:rnd % len(CONFIGS)]
            tokens = torch.randint(0, 32000, (args.batch, args.seq), generator=g).to(device)
            for config in order:
                model, opt, _ = runs[config]
                t0 = time.perf_counter()
                loss = model(input_ids=tokens, labels=tokens).loss
                sync(device)
                t1 = time.perf_counter()
                loss.backward()
                sync(device)
                t2 = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                t3 = time.perf_counter()
                if rnd > 0:
                    times[config].append((t2 - t1, t3 - t0))
        for config in CONFIGS:
            backward = statistics.median(t[0] for t in times[config])
            step = statistics.median(t[1] for t in times[config])
            rows.append({"model": model_name, "config": config, "backward_s": backward, "step_s": step,
                         "tokens_per_s": args.batch * args.seq / step})
        del runs
    return rows


def time_table(rows: list[dict]) -> str:
    return vs_galore_table(
        rows, ["backward s", "backward vs GaLore", "step s", "tokens/s", "tokens/s vs GaLore"],
        lambda r, base: f"{r['backward_s']:.3f} | {r['backward_s'] / base['backward_s']:.2f}x | {r['step_s']:.3f} "
                        f"| {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x")


# --------------------------------------------------------------------------------------------- ddp
def _ddp_body(rank, world, model_name, seq, out_path):
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    rows = []
    for config in ("AdamW", "GaLore", "GaLore projected"):
        model, opt, handle = build(model_name, config, "cpu", torch.float32)
        wrapped = DistributedDataParallel(model)
        counts = []

        def hook(state, bucket):
            buf = bucket.buffer()
            counts[-1] += buf.numel() * buf.element_size()
            return allreduce_hook(None, bucket)

        wrapped.register_comm_hook(None, hook)
        g = torch.Generator().manual_seed(rank)
        full = []
        for _ in range(2):  # the refresh step (t = 0), then a projected one
            counts.append(0)
            before = handle.full_reduced_bytes if handle is not None else 0
            tokens = torch.randint(0, 32000, (1, seq), generator=g)
            wrapped(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            full.append((handle.full_reduced_bytes if handle is not None else 0) - before)
        projected = 0
        if handle is not None:
            projected = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                            if hasattr(m, "weight_projected_grad"))
        rows.append({"model": model_name, "config": config, "refresh_bytes": counts[0] + full[0],
                     "steady_bytes": counts[1] + full[1], "projected_weight_bytes": projected,
                     "weight_bytes": sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                         if "projected" not in n)})
        del wrapped, model, opt
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    dist.barrier()


def ddp_rows(args) -> list[dict]:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from distributed_utils import run_distributed

    rows = []
    for model_name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            run_distributed(_ddp_body, model_name, args.seq_ddp, str(out), timeout=1800)
            rows += json.loads(out.read_text())
    return rows


def ddp_table(rows: list[dict]) -> str:
    lines = ["| model | configuration | all-reduced MiB, refresh step | all-reduced MiB, steady step | steady vs GaLore |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["config"] == "GaLore")
        lines.append(f"| {r['model']} | {r['config']} | {r['refresh_bytes'] / 2**20:.1f} | "
                     f"{r['steady_bytes'] / 2**20:.1f} | {r['steady_bytes'] / base['steady_bytes']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama_60m"])
    ap.add_argument("--parts", nargs="+", default=["memory", "time", "ddp"], choices=["memory", "time", "ddp"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seq-ddp", type=int, default=32, help="tokens per rank in the ddp part (bytes do not depend on it)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(args)))
        return
    print(f"{machine()}; {args.device}, {args.dtype}, batch {args.batch} x {args.seq} tokens; GaLore rank "
          f"{'/'.join(str(RANKS[m]) for m in args.models)}, T 200, scale 0.25\n")
    if "memory" in args.parts:
        print(f"peak memory ({args.steps} steps)\n\n" + memory_table(memory_rows(args)) + "\n", flush=True)
    if "time" in args.parts:
        print(f"time ({args.rounds} rotated rounds, medians)\n\n" + time_table(time_rows(args)) + "\n", flush=True)
    if "ddp" in args.parts:
        print(f"DDP, 2 gloo processes, {args.seq_ddp} tokens per rank\n\n" + ddp_table(ddp_rows(args)), flush=True)


if __name__ == "__main__":
    main()
