"""Shared pieces of the benchmarks: LLaMA shapes (the GaLore paper's configurations), timing, machine description."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gradproj.models import LLAMA_CONFIGS

#: name -> (hidden, intermediate, heads, layers); vocabulary 32000 (the GaLore paper's configurations), from the one table
LLAMA = {name: (s.hidden, s.intermediate, s.heads, s.layers)
         for name, s in LLAMA_CONFIGS.items() if name.startswith("llama_")}


def stdlib_bytes(limit: int) -> torch.Tensor:
    """The first ``limit`` bytes of the Python standard library's top-level ``*.py`` files, in name order:
    a byte-level corpus present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return torch.tensor(list(out[:limit]), dtype=torch.long)


def byte_llama(hidden: int = 128, intermediate: int = 352, layers: int = 4, heads: int = 4, seed: int = 0,
               max_positions: int = 512):
    """A small byte-vocabulary LlamaForCausalLM (untied head), initialised from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                      rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def block_matrix_shapes(name: str) -> list[tuple[int, int]]:
    """The Linear weights of the decoder blocks (the matrices GaLore projects), torch layout [out, in]."""
    h, i, _, layers = LLAMA[name]
    per_layer = [(h, h)] * 4 + [(i, h), (i, h), (h, i)]  # q, k, v, o, gate, up, down
    return per_layer * layers


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, device="cpu") -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rows_per_thread_count(threads: list[int], models: list[str], run: Callable[[str], dict]) -> list[dict]:
    """``run(model)`` for each model, under each torch thread count in turn (``torch.set_num_threads``)."""
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        for name in models:
            rows.append(run(name))
    return rows


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{cpu_name()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


# ---------------------------------------------------------------------------------- peak memory of a step
def status_mib(field: str) -> float:
    """A size field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS


def peak_mib(device: torch.device, baseline: float) -> float:
    """Peak memory since :func:`reset_peak`: CUDA's ``max_memory_allocated``; on CPU the peak RSS above
    ``baseline`` (``status_mib("VmRSS")`` taken before the model was built)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return status_mib("VmHWM") - baseline


def step_peaks(model, opt, steps: int, batch: int, seq: int, vocab: int, device: torch.device,
               baseline: float) -> list[float]:
    """Peak MiB (:func:`peak_mib`) of each of ``steps`` training steps of a causal LM on random tokens
    (forward, backward, optimizer step, zero_grad), the tokens drawn from a generator seeded 0."""
    g = torch.Generator().manual_seed(0)
    peaks = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        reset_peak(device)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
        peaks.append(peak_mib(device, baseline))
    return peaks


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a measuring subprocess: this checkout's gradproj first on PYTHONPATH (whatever is
    installed), no Hub access, large allocations returned to the system at once (so RSS peaks are the step's)."""
    repo = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", **extra,
            "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}


def run_worker(script: str, model: str, config: str, args, env: dict[str, str]) -> dict:
    """Runs ``script --worker`` for one model and configuration with ``args``' device, dtype, batch, seq and
    steps; returns the JSON row it prints last."""
    cmd = [sys.executable, script, "--worker", "--model", model, "--config", config, "--device", args.device,
           "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(script).parent)
    if out.returncode != 0:
        raise RuntimeError(f"{model} / {config} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
