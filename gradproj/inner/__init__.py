"""Inner update rules on low-rank tensors, selected by the optimizer class (see the presets)."""

from __future__ import annotations

from .adam import Adam
from .base import InnerRule, StepContext

INNER_RULES: dict[str, type[InnerRule]] = {}


def register_inner_rule(cls: type[InnerRule]) -> type[InnerRule]:
    INNER_RULES[cls.name] = cls
    return cls


register_inner_rule(Adam)

__all__ = ["INNER_RULES", "Adam", "InnerRule", "StepContext", "register_inner_rule"]
