"""Kernels: the torch reference (CPU path and test oracle) and accelerated twins, chosen by ``impl``.

``impl="torch"`` always runs :mod:`gradproj.kernels.reference`. ``impl="auto"`` picks the fastest
implementation that can run on the tensor at hand and falls back to torch quietly. An explicit impl that
cannot run raises a ``ValueError`` that says why.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import reference

IMPLS = ("auto", "torch", "triton")


def resolve(impl: str, tensor: torch.Tensor) -> ModuleType:
    """Return the module of operations to use for ``tensor`` under ``impl``."""
    if impl in ("auto", "torch"):
        return reference
    if impl == "triton":
        raise ValueError(
            "impl='triton' was requested but this build of gradproj has no Triton kernels; use impl='auto' or 'torch'"
        )
    raise ValueError(f"unknown impl {impl!r}; use one of {', '.join(IMPLS)}")


__all__ = ["IMPLS", "reference", "resolve"]
