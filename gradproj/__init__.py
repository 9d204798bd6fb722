"""gradproj: memory-efficient optimizers that keep their state in low-rank gradient subspaces."""

import logging

from .memory import optimizer_state_bytes
from .optimizers import FiraAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, ProjectedOptimizer, param_groups
from .projectors import register_projector

logging.getLogger("gradproj").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "ProjectedOptimizer",
    "__version__",
    "optimizer_state_bytes",
    "param_groups",
    "register_projector",
]
