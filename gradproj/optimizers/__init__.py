"""Optimizers: the composed base, the named presets and param-group helpers."""

from .base import ProjectedOptimizer
from .groups import param_groups
from .presets import ApolloAdamW, FiraAdamW, FrugalAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, apollo_mini

__all__ = [
    "ApolloAdamW",
    "FiraAdamW",
    "FrugalAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "ProjectedOptimizer",
    "apollo_mini",
    "param_groups",
]
