"""Change of basis at a refresh: carrying the inner rule's moments into the new subspace.

With ``moments_on_refresh="project"``, a refresh that replaces basis P_old by P_new maps every low-rank
state tensor to the new coordinates. A coordinate vector c (a column of R for a left projection, a row
for a right projection) of a vector P_old c in the old subspace has coordinates T c in the new one, with

    left  (P m x r, R = Pᵀ G):  T = P_newᵀ P_old        X_new = T X
    right (P r x n, R = G Pᵀ):  T = P_new P_oldᵀ        X_new = X Tᵀ
    full:                       both,                   X_new = T_l X T_rᵀ

That is M_new = P_newᵀ P_old M_old for the first moment of a left projection: the old moment, lifted to
the full space and projected onto the new subspace (its part outside the new subspace is dropped).

An elementwise second moment V (Adam's EMA of R²) is not a linear quantity. It is treated as the
diagonal of a covariance with independent coordinates: coordinate i of the new basis is Σ_j T_ij c_j,
whose second moment is Σ_j T_ij² V_j, so V_new = (T∘T) V (and V (T∘T)ᵀ for a right projection). This
keeps V >= 0, is exact when T is a permutation or a selection (DCT index sets: shared indices keep their
statistics, new ones start at 0), and reduces to "keep" when the basis did not change (T = I).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def snapshot_basis(state: dict, keys: tuple[str, ...]) -> dict:
    """Copy the basis entries of a parameter's state (tensors are cloned: refreshes write in place)."""
    return {k: (state[k].clone() if isinstance(state[k], torch.Tensor) else state[k]) for k in keys if k in state}


def _compute(new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both bases on ``new``'s device in float32, or float64 if either is float64."""
    dtype = torch.promote_types(torch.promote_types(new.dtype, old.dtype), torch.float32)
    return new.to(dtype), old.to(new.device, dtype)


@dataclass
class BasisChange:
    """Coordinate maps of a refresh: ``left`` (r x r, acts on the rows of X) and / or ``right`` (r x r, acts
    on the columns of X), float32 (float64 for float64 bases). ``None`` for a side that is not projected."""

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    @classmethod
    def between(cls, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> BasisChange:
        """From dense bases as :meth:`Projector.basis_matrices` returns them."""
        left = right = None
        if "left" in new:
            P, Q = _compute(new["left"], old["left"])
            left = P.t() @ Q
        if "right" in new:
            P, Q = _compute(new["right"], old["right"])
            right = P @ Q.t()
        return cls(left, right)

    @classmethod
    def between_indices(cls, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> BasisChange:
        """For bases made of columns of one orthonormal matrix, chosen by index: T_ij = [new_i == old_j]
        exactly (a partial permutation)."""
        maps = {
            side: (new[side].long()[:, None] == old[side].long().to(new[side].device)[None, :]).float() for side in new
        }
        return cls(maps.get("left"), maps.get("right"))

    def _apply(self, X: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
        dtype = torch.promote_types(X.dtype, torch.float32)
        Y = X.to(dtype)
        if left is not None:
            Y = left.to(Y.device, dtype) @ Y
        if right is not None:
            Y = Y @ right.to(Y.device, dtype).t()
        return Y

    def linear(self, X: torch.Tensor) -> torch.Tensor:
        """A first moment (or anything linear in R) in the new coordinates (float32 or wider)."""
        return self._apply(X, self.left, self.right)

    def second_moment(self, V: torch.Tensor) -> torch.Tensor:
        """An elementwise second moment in the new coordinates: (T∘T) V (see the module docstring)."""
        sq = lambda T: None if T is None else T * T  # noqa: E731  # a one-line local helper
        return self._apply(V, sq(self.left), sq(self.right))
