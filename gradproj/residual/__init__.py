"""Residual rules, selected by the param-group key ``residual``."""

from __future__ import annotations

from .apollo import ApolloResidual
from .base import NoResidual, Residual, ResidualTerm
from .fira import LIMITER_NORM, FiraResidual
from .frugal import FrugalResidual
from .limiter import NORM_GROWTH_KEY, UPDATE_NORM, limit_update_growth

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
register_residual(FrugalResidual)
register_residual(ApolloResidual)

__all__ = [
    "LIMITER_NORM",
    "NORM_GROWTH_KEY",
    "RESIDUALS",
    "UPDATE_NORM",
    "ApolloResidual",
    "FiraResidual",
    "FrugalResidual",
    "NoResidual",
    "Residual",
    "ResidualTerm",
    "get_residual",
    "limit_update_growth",
    "register_residual",
]
