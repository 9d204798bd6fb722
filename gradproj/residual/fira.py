"""Fira: norm-based scaling of the discarded gradient plus a norm-growth limiter (docs/algorithms.md, Fira)."""

from __future__ import annotations

import torch

from ..kernels.reference import ScaledResidual
from ..options import Option
from ..state_layout import Spec
from .base import Residual
from .limiter import check_growth_limit

#: state key of the limiter's previous norm (a 0-dim float32 tensor on the parameter's device)
LIMITER_NORM = "residual_norm"


class FiraResidual(Residual):
    """``S = (G − α·B(R)) · φ`` with φ = ‖U‖/(‖R‖+1e-8) over the rank axis, then the norm-growth limiter
    with ``limiter_gamma`` (γ, default 1.01; ``None`` disables it).

    As in the released code, α multiplies B(R) too, so S is ``G − α·B(R)`` rather than the orthogonal
    complement whenever α ≠ 1.

    With an orthonormal basis (``projector.orthonormal``) the residual is never materialised: since φ is
    constant along the rank axis, ``α·B(U) + S = α·B(U − φ⊙R) + φ⊙G``, so B(R) joins the back-projection
    GEMM the step does anyway and S becomes the broadcast product φ⊙G; its norm comes from row (column)
    norms of G and R (the ``fira_residual_factors`` kernel operation; φ comes laid out along G, and
    ``projector.low_rank_factors`` gives the part that lines up with R, all of it unless R is a sharded
    block of a left projection's columns). Other bases take the
    direct path, which computes S as written above. So do bf16/fp16 parameters: the identity behind the
    factored norm holds only to the basis's own precision, which in half precision is too coarse for the
    limiter (with α = 1 the norm is a difference of two nearly equal terms).
    """

    name = "fira"
    options = (
        Option(
            "limiter_gamma",
            1.01,
            "Fira's norm-growth limit γ on the residual (None: off)",
            lambda v, name, where: check_growth_limit(v, name, where),
        ),
    )

    def validate_group(self, group, where):
        if group.get("proj_type") == "full":
            raise ValueError(
                f"{where}: residual='fira' needs a one-sided projection (its scaling factors are per row or per "
                "column of G); use proj_type 'std', 'reverse_std', 'left' or 'right' instead of 'full'"
            )

    def state_layout(self):
        return {LIMITER_NORM: Spec(())}

    def compute(self, G, R, U, projector, state, group, ctx):
        ops, axis, gamma = ctx.ops, projector.rank_axis(), group["limiter_gamma"]
        if not (projector.orthonormal and G.dtype in (torch.float32, torch.float64)):
            S = ops.fira_residual(G, R, U, projector, state, ctx.scale)  # (G − α·B(R)) · φ
            if gamma is not None:
                S = ops.limit_norm_growth_(S, state, LIMITER_NORM, float(gamma))
            return U, S
        phi, norm = ops.fira_residual_factors(G, R, U, ctx.scale, axis)
        if gamma is not None:
            k = ops.norm_growth_divisor(norm, state, LIMITER_NORM, float(gamma))
            if k is not None:
                phi = phi / k
        S = ScaledResidual(G, phi.reshape(-1), axis=0 if axis == 1 else 1)  # φ⊙G: one factor per row / column
        return torch.addcmul(U, projector.low_rank_factors(phi), R, value=-1.0), S  # U − φ⊙R
