"""Residual rules, selected by the param-group key ``residual``."""

from __future__ import annotations

from .base import NoResidual, Residual
from .fira import LIMITER_NORM, FiraResidual

RESIDUALS: dict[str, type[Residual]] = {}


def register_residual(cls: type[Residual]) -> type[Residual]:
    RESIDUALS[cls.name] = cls
    return cls


def get_residual(name: str) -> type[Residual]:
    try:
        return RESIDUALS[name]
    except KeyError:
        raise ValueError(f"unknown residual {name!r}; available: {', '.join(sorted(RESIDUALS))}") from None


register_residual(NoResidual)
register_residual(FiraResidual)

__all__ = ["LIMITER_NORM", "RESIDUALS", "FiraResidual", "NoResidual", "Residual", "get_residual", "register_residual"]
