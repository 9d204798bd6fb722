"""Projections for bases that are rebuilt from a small state (DCT indices, a seed) instead of being stored."""

from __future__ import annotations

import torch

from .base import Projector


class RegeneratedBasis(Projector):
    """The dense-basis formulas of :class:`Projector`, on a basis that :meth:`dense` rebuilds per call.

    Subclasses implement ``dense(state, like) -> (left, right)``: P_l (m x r) and / or P_r (r x n) in
    ``like``'s dtype and device, ``None`` for a side that is not projected.
    """

    dense_basis = False  # rebuilt per call, not stored under ``proj``

    def dense(self, state: dict, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    def basis_matrices(self, state):
        left, right = self.dense(state, torch.empty(0, device=self.state_device(state)))
        return {k: v for k, v in (("left", left), ("right", right)) if v is not None}

    def state_device(self, state: dict) -> torch.device:
        for v in state.values():
            if isinstance(v, torch.Tensor):
                return v.device
        return torch.device("cpu")

    def down(self, G, state):
        left, right = self.dense(state, G)
        if self.side == "right":
            assert right is not None  # dense() returns the basis of each projected side
            return G @ right.t()
        assert left is not None
        if self.side == "left":
            return left.t() @ G
        assert right is not None
        return left.t() @ G @ right.t()

    def up(self, X, state):
        left, right = self.dense(state, X)
        if self.side == "right":
            return X @ right
        if self.side == "left":
            return left @ X
        return left @ X @ right

    def add_up_(self, W, X, state, alpha):
        left, right = self.dense(state, W)
        X = X.to(W.dtype)
        if self.side == "right":
            W.addmm_(X, right, alpha=alpha)
        elif self.side == "left":
            W.addmm_(left, X, alpha=alpha)
        else:
            W.addmm_(left, X @ right, alpha=alpha)
