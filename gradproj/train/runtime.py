"""Where a training run executes: device, process rank and world size, model wrapping, checkpoint I/O.

The training loop talks to the machine only through a :class:`Runtime`. :class:`LocalRuntime` is one
process on one device; :class:`DistributedRuntime` is one rank of a ``torchrun`` job (DDP, or FSDP2 with
``--fsdp``). The loop shards batches by ``rank`` / ``world_size``, averages logged numbers with
:meth:`Runtime.reduce_mean`, and writes files only where :attr:`Runtime.is_main`. :func:`make_runtime`
picks the runtime from the environment torchrun sets.

Checkpoints: one process and DDP write a single ``step_NNNNNNN.pt`` (the state is replicated, so rank 0
writes it; it loads with ``torch.load(weights_only=True)`` and resumes in one process or under DDP alike).
FSDP2 writes a directory ``step_NNNNNNN/`` with ``torch.distributed.checkpoint`` (each rank its shards,
plus ``extra.pt``), which resumes under FSDP2 with any number of processes, or in one process.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
from pathlib import Path
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

    def accumulate(self, model: nn.Module, sync: bool):
        """Context for one micro-batch's backward; ``sync=False`` on all but the last of a step, so a
        distributed runtime can skip the gradient all-reduce of those."""
        return contextlib.nullcontext()

    def checkpoint_name(self, step: int) -> str:
        return f"step_{step:07d}.pt"

    def save_checkpoint(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
    ) -> None:
        """Write model, optimizer and ``extra`` (tensors and plain values) to ``path``."""
        self.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra}, str(path))

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load a checkpoint of either layout into ``model`` / ``optimizer``; returns its other entries."""
        if Path(path).is_dir():
            from ..distributed import launch

            return launch.load_checkpoint(path, model, optimizer, self._env())
        ckpt = self.load(str(path))
        model.load_state_dict(ckpt.pop("model"))
        optimizer.load_state_dict(ckpt.pop("optimizer"))
        return ckpt

    def remove_checkpoint(self, path: Path) -> None:
        if self.is_main:
            shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()

    def close(self) -> None:
        """Release what the runtime holds (the process group of a distributed run)."""

    def _env(self):
        from ..distributed import DistributedEnv

        return DistributedEnv(rank=self.rank, world_size=self.world_size, device=self.device)

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


PARALLEL = ("auto", "none", "ddp", "fsdp")


class DistributedRuntime(Runtime):
    """One rank of a ``torchrun`` job: DDP (gradients all-reduced, state replicated) or FSDP2
    (``fully_shard`` per decoder block: parameters, gradients and optimizer state sharded on dim 0)."""

    def __init__(self, device: str | torch.device = "auto", strategy: str = "ddp"):
        import torch.distributed as dist

        from ..distributed import init_distributed

        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy = {strategy!r}; use ddp or fsdp")
        env = init_distributed(None if device == "auto" else device)
        if not dist.is_initialized():  # torchrun with one process: a group of one, so DDP / FSDP2 work
            dist.init_process_group(backend="nccl" if env.device.type == "cuda" else "gloo")
        self.env, self.strategy = env, strategy
        self.rank, self.world_size, self.device = env.rank, env.world_size, env.device

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from ..distributed import wrap_model

        return wrap_model(model, self.env, self.strategy)

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        from ..distributed import unwrap_model

        return unwrap_model(model)

    def reduce_mean(self, value: float) -> float:
        from ..distributed import all_reduce_mean

        return all_reduce_mean(value, self.env)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def accumulate(self, model: nn.Module, sync: bool):
        if self.strategy == "ddp":
            # DDP's no_sync() and FSDP2's set_requires_gradient_sync(): methods of the wrapped model, which
            # nn.Module's annotations do not know
            return contextlib.nullcontext() if sync else model.no_sync()  # type: ignore[operator]
        # FSDP2: reduce-scatter only on the last micro-batch
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]
        return contextlib.nullcontext()

    def checkpoint_name(self, step: int) -> str:
        return f"step_{step:07d}" if self.strategy == "fsdp" else super().checkpoint_name(step)

    def save_checkpoint(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
    ) -> None:
        if self.strategy != "fsdp":
            return super().save_checkpoint(path, model, optimizer, extra)
        from ..distributed import save_checkpoint

        save_checkpoint(path, model, optimizer, self.env, extra=extra)

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self.strategy == "fsdp" and not Path(path).is_dir():
            raise ValueError(
                f"{path} is a single-file checkpoint (one process or DDP); FSDP2 resumes from the directory "
                "checkpoints it writes itself. Resume this run without --fsdp"
            )
        return super().load_checkpoint(path, model, optimizer)

    def _env(self):
        return self.env

    def close(self) -> None:
        from ..distributed import shutdown_distributed

        shutdown_distributed()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def make_runtime(device: str = "auto", parallel: str = "auto") -> Runtime:
    """The runtime for ``parallel`` (``auto``: DDP under torchrun, else one local process)."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel = {parallel!r}; use one of {', '.join(PARALLEL)}")
    torchrun = launched_by_torchrun()
    if parallel == "auto":
        parallel = "ddp" if torchrun else "none"
    if parallel == "none":
        if torchrun and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError(
                "parallel = 'none' but this process is one of WORLD_SIZE = "
                f"{os.environ['WORLD_SIZE']} launched by torchrun; drop the setting (DDP) or use --fsdp"
            )
        return LocalRuntime(device)
    if not torchrun:
        flag = "--fsdp" if parallel == "fsdp" else "--parallel ddp"
        raise ValueError(
            f"{flag} (parallel = {parallel!r}) needs one process per device started by torchrun, e.g. "
            f"`torchrun --nproc-per-node 2 -m gradproj train {flag}` (to continue such a run in one process: "
            "--resume DIR --parallel none)"
        )
    return DistributedRuntime(device, parallel)


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
