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

#: subpackages imported on first attribute access (``gradproj.distributed.save_checkpoint`` after ``import
#: gradproj``), not at import: they pull in torch.distributed, transformers or the training loop
_LAZY_SUBPACKAGES = ("distributed", "integrations", "train")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
