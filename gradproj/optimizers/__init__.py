"""Optimizers: the composed base, the named presets and param-group helpers."""

from .base import ProjectedOptimizer
from .groups import param_groups
from .presets import FiraAdamW, GaLoreAdamW

__all__ = ["FiraAdamW", "GaLoreAdamW", "ProjectedOptimizer", "param_groups"]
