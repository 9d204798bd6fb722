"""The DTensor (FSDP2) step lives in the core, :mod:`gradproj.optimizers.sharding`; this name stays importable."""

# re-exports, for the code that imported them from here
from ..optimizers.sharding import *  # noqa: F403
from ..optimizers.sharding import ShardedOps, ShardedProjector, ShardedStep, gram_top_eigenvectors, shard_plan  # noqa: F401
