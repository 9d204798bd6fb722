"""Data-parallel training with gradproj optimizers: DDP, FSDP2 (DTensor parameters) and torchrun helpers.

* DDP needs nothing: gradients are all-reduced before ``optimizer.step()``, so every rank computes the
  same bases and the same update. A projector that draws random numbers must seed them from the
  optimizer state (a per-parameter counter or seed), never from the process's global RNG, which differs
  between ranks; :func:`replicated_state_mismatches` checks it.
* FSDP2 (``fully_shard``): gradproj optimizers accept DTensor parameters sharded on dim 0 and step each
  rank's rows; see :mod:`gradproj.optimizers.sharding` for the layout of the state and the communication.
* :mod:`gradproj.distributed.launch`: process group from torchrun's environment, model wrapping,
  per-rank data, rank-0 helpers and distributed checkpoints.
"""

from .consistency import replicated_state_mismatches
from .launch import (
    DistributedEnv,
    all_reduce_mean,
    init_distributed,
    load_checkpoint,
    quiet_other_ranks,
    rank_zero_only,
    save_checkpoint,
    shard_iterable,
    shutdown_distributed,
    split_batch,
    transformer_blocks,
    unwrap_model,
    wrap_model,
)
from .sharding import SHARDED_REFRESH, is_dtensor

__all__ = [
    "SHARDED_REFRESH",
    "DistributedEnv",
    "all_reduce_mean",
    "init_distributed",
    "is_dtensor",
    "load_checkpoint",
    "quiet_other_ranks",
    "rank_zero_only",
    "replicated_state_mismatches",
    "save_checkpoint",
    "shard_iterable",
    "shutdown_distributed",
    "split_batch",
    "transformer_blocks",
    "unwrap_model",
    "wrap_model",
]
