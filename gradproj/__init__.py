"""gradproj: memory-efficient optimizers that keep their state in low-rank gradient subspaces."""

import logging

from .memory import optimizer_state_bytes
from .optimizers import (
    ApolloAdamW,
    FiraAdamW,
    FrugalAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    ProjectedOptimizer,
    apollo_mini,
    param_groups,
)
from .projectors import BasisDecompositionError, BasisRefreshWarning, NonFiniteGradientError, register_projector
from .sampling import LayerSampler, outlier_ratios
from .sampling.owlore import owlore

logging.getLogger("gradproj").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "ApolloAdamW",
    "BasisDecompositionError",
    "BasisRefreshWarning",
    "FiraAdamW",
    "FrugalAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerSampler",
    "NonFiniteGradientError",
    "ProjectedOptimizer",
    "__version__",
    "apollo_mini",
    "optimizer_state_bytes",
    "outlier_ratios",
    "owlore",
    "param_groups",
    "register_projector",
]
