"""gradproj: memory-efficient optimizers that keep their state in low-rank gradient subspaces."""

import logging

from .memory import optimizer_state_bytes
from .optimizers import (
    ApolloAdamW,
    ApolloMini,
    FiraAdamW,
    FrugalAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    ProjectedOptimizer,
    param_groups,
    project_backward,
)
from .projectors import BasisDecompositionError, BasisRefreshWarning, NonFiniteGradientError, register_projector
from .sampling import LayerSampler, outlier_ratios
from .sampling.owlore import owlore

logging.getLogger("gradproj").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "ApolloAdamW",
    "ApolloMini",
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
    "optimizer_state_bytes",
    "outlier_ratios",
    "owlore",
    "param_groups",
    "project_backward",
    "register_projector",
]
