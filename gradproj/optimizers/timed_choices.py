"""The CPU step's choices made by timing, carried in the optimizer's checkpoint so that a resumed run keeps them.

Two GEMM forms are chosen per shape by timing them once per process (docs/architecture.md): the layout of a left
projection (:func:`gradproj.projectors.base.left_layout`: ``Pᵀ G`` or ``(Gᵀ P)ᵀ``) and whether weight decay
rides in the back-projection GEMM (:func:`gradproj.kernels.reference.decay_in_gemm_pays`). The two forms of each
round differently, so a resumed process that timed a shape near the margin the other way would continue with
other roundings than the run it resumes. The optimizer's ``state_dict`` therefore lists the choices made for
its parameters' shapes (under ``state_dict()["gradproj"]["timed_choices"]``, plain ints, strings and bools, so
``torch.load(weights_only=True)`` reads it), and ``load_state_dict`` installs them in this process's caches,
replacing a choice the process made already (another optimizer of the same shapes in this process then takes
the loaded form too). (``proj_dtype="auto"``'s choice is kept per matrix in the state itself.)
"""

from __future__ import annotations

from typing import Any

import torch

from ..kernels import reference
from ..projectors import base as projector_base

#: the names the choices have in the checkpoint
NAMES = ("left_layout", "decay_in_gemm")
KEY = "timed_choices"


def caches() -> dict[str, dict[tuple, bool]]:
    """Name in the checkpoint -> the process cache it restores, keyed (m, n, k, dtype): the matrix's 2-D shape,
    the GEMM's inner size (the rank) and its dtype."""
    return dict(zip(NAMES, (projector_base._LEFT_LAYOUT, reference._DECAY_IN_GEMM), strict=True))


def export(params) -> dict[str, list[list]]:
    """The cached choices for the 2-D shapes and dtypes of ``params`` (matrices as the optimizer views them:
    ``(shape[0], numel // shape[0])``), as ``{name: [[m, n, k, "float32", choice], ...]}``."""
    shapes = {(p.shape[0], p.numel() // p.shape[0], p.dtype) for p in params if p.dim() >= 2 and p.numel() > 0}
    out = {}
    for name, cache in caches().items():
        rows = [
            [m, n, k, str(dtype).removeprefix("torch."), bool(v)]
            for (m, n, k, dtype), v in cache.items()
            if (m, n, dtype) in shapes
        ]
        if rows:
            out[name] = sorted(rows)
    return out


def check(choices: Any) -> None:
    """Raise ValueError, naming what is wrong, where ``choices`` is not what :func:`export` writes."""
    where = f"load_state_dict: state_dict['gradproj'][{KEY!r}]"
    if not isinstance(choices, dict):
        raise ValueError(f"{where} must be a dict of lists, got {type(choices).__name__}")
    for name, rows in choices.items():
        if name not in NAMES:
            raise ValueError(f"{where} has an unknown entry {name!r}; known: {', '.join(NAMES)}")
        if not isinstance(rows, list):
            raise ValueError(f"{where}[{name!r}] must be a list of [m, n, k, dtype, choice] rows")
        for row in rows:
            ok = (
                isinstance(row, list)
                and len(row) == 5
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in row[:3])
                and isinstance(row[3], str)
                and isinstance(getattr(torch, row[3], None), torch.dtype)
                and isinstance(row[4], bool)
            )
            if not ok:
                raise ValueError(
                    f"{where}[{name!r}] has the row {row!r}; each row is [m, n, k, dtype name, choice] with "
                    "positive ints, a torch dtype name such as 'float32' and a bool"
                )


def install(choices: dict[str, list[list]]) -> None:
    """Put the checked ``choices`` into this process's caches."""
    for name, rows in choices.items():
        cache = caches()[name]
        for m, n, k, dtype, choice in rows:
            cache[(m, n, k, getattr(torch, dtype))] = choice
