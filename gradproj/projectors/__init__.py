"""Subspace bases, selected by the param-group key ``projector``.

Register a new basis with :func:`register_projector`; the optimizer looks it up by name.
"""

from __future__ import annotations

from .base import (
    PROJ_TYPES,
    BasisDecompositionError,
    BasisRefreshWarning,
    IdentityProjector,
    NonFiniteGradientError,
    Projector,
    choose_side,
)
from .change import BasisChange
from .dct import DCTProjector, dct_fft, dct_matrix
from .eigh import EighProjector, gram_bases
from .golore import GoLoreProjector
from .random_basis import RandomProjector
from .randomized_svd import RandomizedSVDProjector, randomized_svd
from .sampled import SampledProjector
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
        raise ValueError(f"unknown projector {name!r}; available: {', '.join(sorted(PROJECTORS))}") from None


register_projector(SVDProjector)
register_projector(IdentityProjector)
for _cls in (RandomizedSVDProjector, EighProjector, DCTProjector, RandomProjector, GoLoreProjector):
    register_projector(_cls)
register_projector(SampledProjector)

__all__ = [
    "PROJECTORS",
    "PROJ_TYPES",
    "BasisChange",
    "BasisDecompositionError",
    "BasisRefreshWarning",
    "DCTProjector",
    "EighProjector",
    "GoLoreProjector",
    "IdentityProjector",
    "NonFiniteGradientError",
    "Projector",
    "RandomProjector",
    "RandomizedSVDProjector",
    "SVDProjector",
    "SampledProjector",
    "choose_side",
    "dct_fft",
    "dct_matrix",
    "get_projector",
    "gram_bases",
    "randomized_svd",
    "register_projector",
]
