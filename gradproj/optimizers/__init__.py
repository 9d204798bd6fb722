"""Optimizers: the composed base, the named presets and param-group helpers."""

from .base import ProjectedOptimizer
from .groups import param_groups
from .presets import ApolloAdamW, ApolloMini, FiraAdamW, FrugalAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

__all__ = [
    "ApolloAdamW",
    "ApolloMini",
    "FiraAdamW",
    "FrugalAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "ProjectedOptimizer",
    "param_groups",
]
