"""Optimizers: the composed base, the named presets and param-group helpers."""

from .base import ProjectedOptimizer
from .groups import param_groups
from .presets import FiraAdamW, FrugalAdamW, GaLoreAdamW

__all__ = ["FiraAdamW", "FrugalAdamW", "GaLoreAdamW", "ProjectedOptimizer", "param_groups"]
