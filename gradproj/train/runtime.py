"""Where a training run executes: device, process rank and world size, model wrapping, checkpoint I/O.

The training loop talks to the machine only through a :class:`Runtime`. :class:`LocalRuntime` is one
process on one device. A distributed runtime (DDP / FSDP2 under ``torchrun``) subclasses it and overrides
the hooks marked below; the loop already shards batches by ``rank`` / ``world_size``, averages logged
numbers with :meth:`Runtime.reduce_mean`, and writes files only where :attr:`Runtime.is_main`.
"""

from __future__ import annotations

import gc
import os
import re
from typing import Any

import torch
from torch import nn


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here; use --device cpu")
    return dev


class Runtime:
    """One training process. Override the hooks to run under a distributed launcher."""

    rank: int = 0
    world_size: int = 1

    def __init__(self, device: str | torch.device = "auto"):
        self.device = resolve_device(device) if isinstance(device, str) else device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- hooks a distributed runtime overrides ---------------------------------------------------------
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Wrap the model for training (DDP / fully_shard); called after it is on ``self.device``."""
        return model

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        """The module whose ``state_dict`` is checkpointed."""
        return model

    def reduce_mean(self, value: float) -> float:
        """Average a number over processes (logged losses)."""
        return value

    def barrier(self) -> None:
        pass

    def save(self, obj: dict[str, Any], path: str) -> None:
        """Write a checkpoint (only the main process writes in the single-file layout)."""
        if self.is_main:
            tmp = f"{path}.tmp"
            torch.save(obj, tmp)
            os.replace(tmp, path)
        self.barrier()

    def load(self, path: str) -> dict[str, Any]:
        return torch.load(path, map_location=self.device, weights_only=True)

    # --- measurements -----------------------------------------------------------------------------------
    def reset_peak_memory(self) -> None:
        gc.collect()  # what earlier runs in this process left behind should not count
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()

    def peak_memory(self) -> tuple[int, str]:
        """(bytes, what was measured)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), "cuda max_memory_allocated"
        since = "since the run started" if _RSS_RESET else "since the process started"
        return _peak_rss(), f"peak RSS of the process {since}"


class LocalRuntime(Runtime):
    """A single process on one device (the default)."""


_RSS_RESET = None  # whether /proc/self/clear_refs can reset the peak RSS on this system


def _reset_peak_rss() -> None:
    global _RSS_RESET
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _RSS_RESET = True
    except OSError:
        _RSS_RESET = False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as fh:
            match = re.search(r"VmHWM:\s+(\d+)\s+kB", fh.read())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
