"""Running a training script under ``torchrun``: process group, model wrapping, data split, rank-0 helpers
and checkpoints that work for one process, DDP and FSDP2 alike.

A script becomes multi-GPU in five lines::

    env = init_distributed()                                  # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    model = wrap_model(build_model(), env, "fsdp" if fsdp else "auto")   # "auto": DDP when WORLD_SIZE > 1
    opt = gradproj.GaLoreAdamW(gradproj.param_groups(unwrap_model(model), ...), lr=...)  # after wrapping
    for batch in batches:
        loss = loss_fn(model, split_batch(batch, env))        # this rank's rows of the global batch
        ...
    save_checkpoint(out_dir, model, opt, env, extra={"step": step})       # every rank calls it
    shutdown_distributed()
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("gradproj")

STRATEGIES = ("auto", "none", "ddp", "fsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits: its rank among ``world_size`` processes and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs, shows progress bars and writes single-file outputs (rank 0)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def init_distributed(device: str | torch.device | None = None, backend: str | None = None) -> DistributedEnv:
    """Join the process group described by torchrun's environment, or describe a single process.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (``MASTER_ADDR`` / ``MASTER_PORT`` are read by
    ``torch.distributed``). Without them (plain ``python train.py``) it returns a one-process environment
    and creates no process group. ``device``: ``"cuda"`` (this rank's GPU, ``cuda:LOCAL_RANK``), ``"cpu"``,
    or ``None`` for CUDA when available. ``backend`` defaults to NCCL on CUDA and gloo on CPU. If a process
    group already exists it is reused.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world}); launch with torchrun")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this build of torch has no torch.distributed")
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend)
        log.info("gradproj: rank %d of %d on %s (%s)", rank, world, device, backend)
    return DistributedEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """Destroy the process group, if any (call once at the end of the script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- models
def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 should shard one by one: modules whose class is named in the model's
    ``_no_split_modules`` (transformers models, e.g. ``LlamaDecoderLayer``), else the children of the
    largest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    largest = max(lists, key=len)
    return list(largest)


def wrap_model(
    model: nn.Module,
    env: DistributedEnv,
    strategy: str = "auto",
    *,
    blocks: Sequence[nn.Module] | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Move ``model`` to ``env.device`` and wrap it for data-parallel training.

    ``strategy``: ``"auto"`` (DDP when ``env.world_size > 1``, else nothing), ``"none"``, ``"ddp"``
    (``DistributedDataParallel``) or ``"fsdp"`` (FSDP2: ``fully_shard`` on every block of
    :func:`transformer_blocks` or ``blocks``, then on the root; parameters become DTensors sharded on
    dim 0). ``param_dtype`` / ``reduce_dtype`` set FSDP2's mixed-precision policy (compute / gradient
    reduction dtypes; the sharded parameters keep their own dtype).

    Build the optimizer *after* wrapping, from :func:`unwrap_model` (FSDP2 replaces the parameters).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; use one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        strategy = "ddp" if env.is_distributed else "none"
    model = model.to(env.device)
    if strategy == "none":
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"strategy={strategy!r} needs a process group: call init_distributed() under torchrun first")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    kwargs: dict[str, Any] = {}
    if param_dtype is not None or reduce_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in transformer_blocks(model) if blocks is None else blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so its model is returned as is)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------- data
def split_batch(batch: T, env: DistributedEnv) -> T:
    """This rank's contiguous share of a global batch (tensors split on dim 0; tuples, lists and dicts
    of tensors split element-wise). With every rank drawing the same global batch (same seed), the
    ranks together see exactly what one process would, so a DDP / FSDP run matches it.
    """
    if not env.is_distributed:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % env.world_size:
            raise ValueError(
                f"a global batch of {batch.shape[0]} rows does not split evenly over {env.world_size} ranks; "
                "use a batch size divisible by the number of processes"
            )
        # (the ignores: isinstance does not narrow the type variable T, so mypy cannot see these are T)
        return batch.chunk(env.world_size)[env.rank]  # type: ignore[return-value]
    if isinstance(batch, Mapping):
        return type(batch)({k: split_batch(v, env) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (tuple, list)):
        return type(batch)(split_batch(v, env) for v in batch)
    raise TypeError(f"split_batch takes tensors or tuples / lists / dicts of tensors, not {type(batch).__name__}")


def shard_iterable(items: Iterable[T], env: DistributedEnv) -> Iterator[T]:
    """Every ``world_size``-th item, starting at this rank's index (for data read as a stream)."""
    for i, item in enumerate(items):
        if i % env.world_size == env.rank:
            yield item


def all_reduce_mean(value: float | torch.Tensor, env: DistributedEnv) -> float:
    """The mean of a scalar over all ranks (e.g. the loss to log); the value itself on one process."""
    if not env.is_distributed:
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64, device=env.device).detach().clone().reshape(1)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


# --------------------------------------------------------------------------------------------- rank 0
def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank_zero_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run ``fn`` on rank 0 only (returns ``None`` on the other ranks)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if _is_main() else None

    return wrapper


def quiet_other_ranks(
    env: DistributedEnv, loggers: Iterable[str] = ("gradproj",), level: int = logging.WARNING
) -> None:
    """On ranks other than 0, raise the given loggers' level (default: warnings and errors only)."""
    if not env.is_main:
        for name in loggers:
            logging.getLogger(name).setLevel(level)


# ---------------------------------------------------------------------------------------- checkpoints
EXTRA_FILE = "extra.pt"


class _single_process_quiet(warnings.catch_warnings):
    """Silence DCP's warning that it saves / loads in one process, when that is what was asked for."""

    def __init__(self, env: DistributedEnv):
        super().__init__(record=False)
        self.env = env

    def __enter__(self):
        out = super().__enter__()
        if not self.env.is_distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return out


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    env: DistributedEnv,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save model and optimizer with ``torch.distributed.checkpoint`` into the directory ``path``.

    Every rank must call it: each writes its own shards (FSDP2) or rank 0 writes the replicated tensors
    (DDP, one process). ``extra`` (step counters, scheduler state, ... : tensors and plain Python values)
    and the optimizer's own extra state (samplers, generators) are written by rank 0 to ``path/extra.pt``,
    loadable with ``torch.load(weights_only=True)``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    model_sd, optim_sd = get_state_dict(unwrap_model(model), optimizer)
    with _single_process_quiet(env):
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    if env.is_main:
        own = optimizer.state_dict().get("gradproj", {}) if hasattr(optimizer, "extra_state") else {}
        torch.save({"extra": extra or {}, "optimizer_extra": own}, path / EXTRA_FILE)
    if env.is_distributed:
        dist.barrier()


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistributedEnv
) -> dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote into ``model`` and ``optimizer`` (same world size and
    wrapping, or any world size for FSDP2: DCP reshards); returns ``extra``. Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not (path / EXTRA_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a gradproj checkpoint directory (no {EXTRA_FILE})")
    saved = torch.load(path / EXTRA_FILE, weights_only=True, map_location="cpu")
    gp: Any = optimizer  # a gradproj optimizer has optimizer-level state of its own
    own = saved.get("optimizer_extra") if hasattr(gp, "load_extra_state") else None
    if own:
        gp.check_extra_state(own)  # before anything is loaded
    inner = unwrap_model(model)
    model_sd, optim_sd = get_state_dict(inner, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet(env):
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(inner, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if own:
        gp.load_extra_state(own)
    return saved.get("extra", {})
