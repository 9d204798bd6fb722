"""The residual interface: what to do with the part of the gradient the subspace throws away.

A residual rule returns a full-size tensor S that the outer step adds to the back-projected inner update
before multiplying by the step size (``W -= step_size · (scale · B(U) + S)``), or ``None`` for nothing.
It only runs for projected matrices; unprojected parameters have no discarded part. A rule built from
``ctx.ops`` functions may return what those give (the Triton module keeps Fira's S factored); the outer
step hands it to the same module's ``apply_update``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..inner.base import StepContext
from ..projectors.base import Projector


class Residual:
    name: ClassVar[str] = ""
    #: group keys the rule reads, with their default values
    defaults: ClassVar[dict[str, Any]] = {}

    def validate_group(self, group: dict, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` for bad options."""

    def compute(
        self,
        G: torch.Tensor,
        R: torch.Tensor,
        U: torch.Tensor,
        projector: Projector,
        state: dict,
        group: dict,
        ctx: StepContext,
    ) -> torch.Tensor | None:
        raise NotImplementedError


class NoResidual(Residual):
    """GaLore: the discarded part is dropped."""

    name = "none"

    def compute(self, G, R, U, projector, state, group, ctx):
        return None
