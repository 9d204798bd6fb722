"""The residual interface: what to do with the part of the gradient the subspace throws away.

For a projected matrix the outer step applies::

    W -= s · scale · B(U)  +  s_res · S

where U and s are the inner rule's direction and step size. A residual rule's :meth:`Residual.compute`
returns ``(U, S)``: it may rewrite the low-rank U (to fold a term of the form B(X) into the one
back-projection GEMM the step already does) and returns the full-size term S, or ``None`` for nothing.
S is either a tensor of G's shape or a :class:`ScaledGradient` (``c ⊙ G``, never materialised).
:meth:`Residual.step_size` gives s_res: the inner rule's s by default (Fira), the group's lr for a rule
with its own step (FRUGAL's signSGD). Residual rules only run for projected matrices.
"""

from __future__ import annotations

from typing import Any, ClassVar, Union

import torch

from ..inner.base import StepContext
from ..projectors.base import Projector


class ScaledGradient:
    """The full-size term ``c ⊙ G`` kept as its two factors; ``c`` broadcasts along G's rows or columns."""

    __slots__ = ("G", "c")

    def __init__(self, G: torch.Tensor, c: torch.Tensor):
        self.G, self.c = G, c

    def dense(self) -> torch.Tensor:
        return self.G * self.c.to(self.G.dtype)

    def divided(self, k: torch.Tensor) -> "ScaledGradient":
        return ScaledGradient(self.G, self.c / k)

    def add_to_(self, W: torch.Tensor, alpha: float) -> None:
        G, c = self.G, self.c
        W.addcmul_(G if G.dtype == W.dtype else G.to(W.dtype), c if c.dtype == W.dtype else c.to(W.dtype), value=alpha)


#: what a residual rule may return as its full-size term
ResidualTerm = Union[torch.Tensor, ScaledGradient]


def dense_term(S: ResidualTerm) -> torch.Tensor:
    """S as a new full-size tensor (a copy: the caller may modify it)."""
    return S.dense() if isinstance(S, ScaledGradient) else S.clone()


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
    ) -> tuple[torch.Tensor, ResidualTerm | None]:
        """Return ``(U, S)``: the (possibly rewritten) low-rank direction and the full-size term or ``None``.

        A rule owns the S it returns (a fresh tensor the caller may scale in place); it must not modify
        the U it was given in place (an inner rule may hand out a view of its state), only return a new one.
        """
        raise NotImplementedError

    def step_size(self, group: dict, inner_step_size: float) -> float:
        """The step size S is multiplied with: the inner rule's by default."""
        return inner_step_size

    def apply_(self, W: torch.Tensor, S: ResidualTerm, inner_step_size: float, group: dict) -> None:
        """``W -= step_size · S`` in place."""
        alpha = -self.step_size(group, inner_step_size)
        if isinstance(S, ScaledGradient):
            S.add_to_(W, alpha)
        else:
            W.add_(S.to(W.dtype), alpha=alpha)


class NoResidual(Residual):
    """GaLore: the discarded part is dropped."""

    name = "none"

    def compute(self, G, R, U, projector, state, group, ctx):
        return U, None
