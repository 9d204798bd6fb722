"""Fira: norm-based scaling of the discarded gradient plus a norm-growth limiter (ALGORITHMS.md §2)."""

from __future__ import annotations

from .base import Residual

#: state key of the limiter's previous norm (a 0-dim float32 tensor on the parameter's device)
LIMITER_NORM = "residual_norm"


class FiraResidual(Residual):
    """``S = (G − α·B(R)) · φ`` with φ = ‖U‖/(‖R‖+1e-8) over the rank axis, then the norm-growth limiter
    with ``limiter_gamma`` (γ, default 1.01; ``None`` disables it).

    As in the released code, α multiplies B(R) too, so S is ``G − α·B(R)`` rather than the orthogonal
    complement whenever α ≠ 1.
    """

    name = "fira"
    defaults = {"limiter_gamma": 1.01}

    def validate_group(self, group, where):
        if group.get("proj_type") == "full":
            raise ValueError(
                f"{where}: residual='fira' needs a one-sided projection (its scaling factors are per row or per "
                "column of G); use proj_type 'std', 'reverse_std', 'left' or 'right' instead of 'full'"
            )
        gamma = group.get("limiter_gamma", 1.01)
        if gamma is not None and not float(gamma) >= 1.0:
            raise ValueError(f"{where}: limiter_gamma = {gamma} must be >= 1 (or None to disable the limiter)")

    def compute(self, G, R, U, projector, state, group, ctx):
        ops = ctx.ops
        S = ops.fira_residual(G, R, U, projector, state, ctx.scale)  # (G − α·B(R)) · φ
        gamma = group.get("limiter_gamma", 1.01)
        if gamma is not None:
            S = ops.limit_norm_growth_(S, state, LIMITER_NORM, float(gamma))
        return S
