"""Inner update rules on low-rank tensors, selected by the optimizer class (see the presets)."""

from __future__ import annotations

from .adafactor import Adafactor
from .adam import Adam
from .adam8bit import Adam8bit
from .base import InnerRule, StepContext

INNER_RULES: dict[str, type[InnerRule]] = {}


def register_inner_rule(cls: type[InnerRule]) -> type[InnerRule]:
    INNER_RULES[cls.name] = cls
    return cls


register_inner_rule(Adam)
register_inner_rule(Adam8bit)
register_inner_rule(Adafactor)

__all__ = ["INNER_RULES", "Adafactor", "Adam", "Adam8bit", "InnerRule", "StepContext", "register_inner_rule"]
