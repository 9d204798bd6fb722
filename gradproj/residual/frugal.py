"""FRUGAL: the complement of the subspace updated state-free with signSGD (arXiv 2411.07837; docs/algorithms.md)."""

from __future__ import annotations

from .base import Residual


class FrugalResidual(Residual):
    """``S = sign(G − B(R))``, applied with the group's learning rate: ``W -= lr · S``.

    The projected part keeps its inner rule (Adam, with its bias-corrected step size); every direction
    outside the subspace moves by exactly ``lr`` per coordinate, with no state. B(R) is the orthogonal
    projection of G onto the subspace (not multiplied by ``scale``, unlike Fira's residual), so S is the
    sign of the true complement. Works with every ``proj_type``, ``full`` included.
    """

    name = "frugal"

    def validate_group(self, group, where):
        if group.get("lr") is None:
            raise ValueError(
                f"{where}: residual='frugal' takes its sign step with the group's lr, and lr is None (Adafactor's "
                "relative step); pass a learning rate (with relative_step=False), or use another residual"
            )

    def compute(self, G, R, U, projector, state, group, ctx):
        S = G.clone()
        projector.add_up_(S, R, state, alpha=-1.0)  # G − B(R): one GEMM into a copy of G
        return U, S.sign_()

    def step_size(self, group, inner_step_size):
        return group["lr"]
