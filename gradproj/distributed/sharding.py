"""The DTensor (FSDP2) step lives in the core, :mod:`gradproj.optimizers.sharding`; this name stays importable."""

from ..optimizers.sharding import *  # noqa: F403
from ..optimizers.sharding import ShardedOps, ShardedProjector, ShardedStep, gram_top_eigenvectors, shard_plan  # noqa: F401
