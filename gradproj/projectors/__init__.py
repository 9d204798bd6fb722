"""Subspace bases, selected by the param-group key ``projector``.

Register a new basis with :func:`register_projector`; the optimizer looks it up by name.
"""

from __future__ import annotations

from .base import PROJ_TYPES, IdentityProjector, NonFiniteGradientError, Projector, choose_side
from .svd import SVDProjector

PROJECTORS: dict[str, type[Projector]] = {}


def register_projector(cls: type[Projector]) -> type[Projector]:
    """Class decorator: make ``cls`` selectable as ``projector=cls.name`` in a param group."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    PROJECTORS[cls.name] = cls
    return cls


def get_projector(name: str) -> type[Projector]:
    try:
        return PROJECTORS[name]
    except KeyError:
        raise ValueError(
            f"unknown projector {name!r}; available: {', '.join(sorted(PROJECTORS))}"
        ) from None


register_projector(SVDProjector)
register_projector(IdentityProjector)

__all__ = [
    "PROJECTORS",
    "PROJ_TYPES",
    "IdentityProjector",
    "NonFiniteGradientError",
    "Projector",
    "SVDProjector",
    "choose_side",
    "get_projector",
    "register_projector",
]
