"""Optimizers: the composed base, the named presets and param-group helpers."""

from .base import ProjectedOptimizer
from .groups import param_groups
from .presets import ApolloAdamW, ApolloMini, FiraAdamW, FrugalAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .projected_backward import ProjectedBackward, project_backward

__all__ = [
    "ApolloAdamW",
    "ApolloMini",
    "FiraAdamW",
    "FrugalAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "ProjectedBackward",
    "ProjectedOptimizer",
    "param_groups",
    "project_backward",
]
