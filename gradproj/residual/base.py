"""The residual interface: what to do with the part of the gradient the subspace throws away.

For a projected matrix the outer step applies::

    W -= s · scale · B(U)  +  s_res · S

where U and s are the inner rule's direction and step size. A residual rule's :meth:`Residual.compute`
returns ``(U, S)``: it may rewrite the low-rank U (to fold a term of the form B(X) into the one
back-projection GEMM the step already does) and returns the full-size term S, or ``None`` for nothing.
S is either a tensor of G's shape or a :class:`~gradproj.kernels.reference.ScaledResidual` (``D ⊙ φ / k``
kept factored, never materialised by the fused paths). :meth:`Residual.step_size` gives s_res: the
inner rule's s by default (Fira), the group's lr for a rule with its own step (FRUGAL's signSGD).
The outer step hands U, S and both step sizes to the kernels module's ``apply_update``. Residual rules
only run for projected matrices.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..inner.base import StepContext
from ..kernels.reference import ScaledResidual
from ..options import Configurable
from ..projectors.base import Projector
from ..state_layout import Spec

#: what a residual rule may return as its full-size term
ResidualTerm = torch.Tensor | ScaledResidual


def dense_term(S: ResidualTerm) -> torch.Tensor:
    """S as a new full-size tensor (a copy: the caller may modify it)."""
    return S.materialize() if isinstance(S, ScaledResidual) else S.clone()


class Residual(Configurable):
    name: ClassVar[str] = ""
    #: the group keys the rule reads: ``options`` (:mod:`gradproj.options`); ``defaults`` is derived

    #: whether the batched ``foreach`` step runs groups with this rule (only a rule that adds nothing)
    batched: ClassVar[bool] = False

    def validate_group(self, group: dict, where: str) -> None:
        """Checks across several options (each option's own check is in its declaration)."""

    def state_layout(self) -> dict[str, Spec]:
        """The state keys the rule keeps (:mod:`gradproj.state_layout`)."""
        return {}

    def compute(
        self,
        G: torch.Tensor,
        R: torch.Tensor,
        U: torch.Tensor,
        projector: Projector,
        state: dict,
        group: dict,
        ctx: StepContext,
    ) -> tuple[torch.Tensor, ResidualTerm | None]:
        """Return ``(U, S)``: the (possibly rewritten) low-rank direction and the full-size term or ``None``.

        A rule owns the S it returns (a fresh tensor the caller may scale in place); it must not modify
        the U it was given in place (an inner rule may hand out a view of its state), only return a new one.
        """
        raise NotImplementedError

    def step_size(self, group: dict, inner_step_size: float) -> float:
        """The step size S is multiplied with: the inner rule's by default."""
        return inner_step_size


class NoResidual(Residual):
    """GaLore: the discarded part is dropped."""

    name = "none"
    batched = True

    def compute(self, G, R, U, projector, state, group, ctx):
        return U, None
