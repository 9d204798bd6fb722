"""APOLLO: the raw gradient, scaled by factors estimated from Adam in a random subspace (arXiv 2412.05270).

The inner rule (Adam) runs on the projection R of G only to estimate how much Adam would rescale G: per
channel along the projected side (``scale_type="channel"``: one factor per row of G for a right projection,
per column for a left one) or for the whole tensor (``"tensor"``, APOLLO-Mini)::

    φ = ‖ψ‖ / (κ·‖R‖ + 1e-8)                 (norms over the rank axis, or of the whole tensor; ψ = U)
    S = √scale · φ ⊙ G,  limited by Fira's norm-growth limiter (γ = 1.01; ``disable_nl`` turns it off)
    W -= s · S                                  (s: the inner rule's step size, or lr with correct_bias=False)

The low-rank direction itself is dropped (U = 0), so S is a :class:`ScaledResidual`: one factor per row or
column of G, never materialised. κ makes the subspace norm that of the reference's projection: the released
code draws a random matrix with entries of variance 1/r (‖R‖ ≈ ‖G‖), gradproj's ``random`` basis has entries
of variance 1/d (columns of unit norm), so ‖R‖ is √(r/d) times smaller and κ = √(d/r) (for every basis
drawn at random: ``random``, and ``golore`` after its switch); for an SVD basis, and any other basis that
keeps the top of the spectrum (``randomized_svd``, ``eigh``, ``dct``, ``identity``), κ = 1.
docs/algorithms.md (APOLLO) says where this departs from the reference.
"""

from __future__ import annotations

import math

import torch

from ..kernels.reference import ScaledResidual
from ..options import Option, boolean, choice
from ..projectors.random_basis import DRAW_KEY
from ..state_layout import Spec
from .base import Residual
from .fira import LIMITER_NORM

#: the norm-growth limit of the released code (fixed there; ``disable_nl`` turns it off)
APOLLO_GAMMA = 1.01


def subspace_norm_factor(projector, state: dict) -> float:
    """κ: the factor that makes ‖R‖ of ``projector`` that of the reference's projection (see the module).

    A basis regenerated from a random draw (its state holds ``proj_draw``) has columns of unit norm; any
    other basis is used as it is."""
    if DRAW_KEY not in state:
        return 1.0
    d = projector.m if projector.side == "left" else projector.n
    return math.sqrt(d / projector.rank)


class ApolloResidual(Residual):
    """The update is ``√scale · φ ⊙ G`` (φ from the inner direction and R), then the norm-growth limiter."""

    name = "apollo"
    options = (
        Option(
            "scale_type",
            "channel",
            "APOLLO's scaling factor: per `'channel'` (row / column of the projected side) or per `'tensor'`",
            choice("channel", "tensor"),
        ),
        Option("scale_front", False, "APOLLO: apply √scale before the norm-growth limiter (APOLLO-Mini)", boolean),
        Option("disable_nl", False, "APOLLO: turn off the norm-growth limiter (γ = 1.01)", boolean),
        Option("correct_bias", True, "APOLLO: Adam's bias correction in the step size (False: plain lr)", boolean),
    )

    def validate_group(self, group, where):
        if group.get("proj_type") == "full":
            raise ValueError(
                f"{where}: residual='apollo' needs a one-sided projection (its scaling factors are per row or per "
                "column of G); use proj_type 'std', 'reverse_std', 'left' or 'right' instead of 'full'"
            )
        if group.get("lr") is None:
            raise ValueError(f"{where}: residual='apollo' needs a learning rate (lr is None)")

    def state_layout(self):
        return {LIMITER_NORM: Spec(())}

    def compute(self, G, R, U, projector, state, group, ctx):
        ops, kappa = ctx.ops, subspace_norm_factor(projector, state)
        acc = torch.float32 if G.dtype in (torch.bfloat16, torch.float16) else G.dtype
        root = math.sqrt(float(group["scale"] if "scale" in group else group["alpha"]))
        if group["scale_type"] == "channel":
            # Fira's factors with α = 0: φ = ‖ψ‖ / (‖κR‖ + 1e-8) over the rank axis, laid out along G, and
            # ‖φ ⊙ G‖ from the row (column) norms of G; the kernel operation also runs sharded (FSDP2)
            axis = projector.rank_axis()  # 1: R is m x r, one factor per row of G; 0: r x n, per column
            phi, norm = ops.fira_residual_factors(G, R if kappa == 1.0 else R * kappa, U, 0.0, axis)
            S_axis = 0 if axis == 1 else 1
        else:
            phi = ops.low_rank_norm(U).to(acc) / (ops.low_rank_norm(R).to(acc) * kappa + 1e-8)
            norm = ops.safe_norm(G).to(acc) * phi  # ‖φ·G‖
            S_axis = 0
        if group["scale_front"]:
            phi, norm = phi * root, norm * root
        if not group["disable_nl"]:
            k = ops.norm_growth_divisor(norm, state, LIMITER_NORM, APOLLO_GAMMA)
            if k is not None:
                phi = phi / k
        if not group["scale_front"]:
            phi = phi * root
        rows = G.shape[S_axis]
        phi = phi.reshape(-1) if phi.numel() > 1 else phi.reshape(1).expand(rows).contiguous()  # kernels index it
        return torch.zeros_like(U), ScaledResidual(G, phi, axis=S_axis)

    def step_size(self, group, inner_step_size):
        return inner_step_size if group["correct_bias"] else group["lr"]
