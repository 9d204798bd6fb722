"""The norm-growth limiter as a group option of every gradproj optimizer: ``norm_growth_limit`` (γ).

Fira limits the growth of its residual's norm; the same rule is a useful stabiliser for any update (APOLLO
reuses it). With ``norm_growth_limit=γ`` in a group, every parameter of that group has its update
direction ``D = scale · B(U) + S`` (the inner rule's direction projected back, plus the residual term)
limited so that ‖D‖ grows by at most a factor γ from one step to the next::

    k = max(‖D‖ / (N + 1e-8), γ) / γ ;   D ← D / k ;   N ← ‖D‖ / k        (the first step is never limited)

D is measured before the step sizes are applied, like Fira's S: the un-bias-corrected Adam direction,
independent of the learning-rate schedule (a warm-up is not throttled). For a parameter that is trained
unprojected (no ``rank``, 1-D tensors) D is the inner rule's direction itself. One 0-dim fp32 tensor of
state per parameter (``update_norm``); everything stays on the device (no host synchronisation).
"""

from __future__ import annotations

import math

import torch

from ..inner.base import StepContext
from ..kernels.reference import ScaledResidual
from ..projectors.base import Projector
from .base import ResidualTerm, dense_term

#: group key of the limit γ (``None``: off)
NORM_GROWTH_KEY = "norm_growth_limit"
#: state key of the previous limited norm
UPDATE_NORM = "update_norm"


def check_growth_limit(gamma: object, key: str, where: str) -> None:
    """A limiter's γ must be None (off) or a real number >= 1."""
    if gamma is None:
        return
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"{where}: {key} = {gamma!r} must be a number >= 1 (Fira uses 1.01), or None to disable it")
    if not (math.isfinite(gamma) and float(gamma) >= 1.0):
        raise ValueError(
            f"{where}: {key} = {gamma} must be >= 1: it is the largest factor by which the norm may grow per step "
            "(Fira uses 1.01); use None to disable it"
        )


def update_norm(
    U: torch.Tensor, S: ResidualTerm | None, projector: Projector, state: dict, ctx: StepContext
) -> torch.Tensor:
    """‖scale · B(U) + S‖ as a 0-dim tensor on U's device, in the accumulation dtype (overflow-safe: a
    gradient spike gives a large finite norm, which the limiter then scales down). The norms are the kernel
    operations of ``ctx.ops``, which under FSDP2 combine the ranks' parts into the whole matrix's norm."""
    if S is None and projector.orthonormal:
        return ctx.ops.low_rank_norm(U) * abs(ctx.scale)  # ‖B(U)‖ = ‖U‖ for an isometry
    if S is None:
        rows = projector.m if ctx.param is None else ctx.param.shape[0]  # this rank's rows under FSDP2
        D = torch.zeros(rows, projector.n, dtype=U.dtype, device=U.device)
    else:
        D = dense_term(S)
    projector.add_up_(D, U, state, alpha=ctx.scale)
    return ctx.ops.safe_norm(D)


def limit_update_growth(
    U: torch.Tensor,
    S: ResidualTerm | None,
    projector: Projector,
    state: dict,
    group: dict,
    ctx: StepContext,
) -> tuple[torch.Tensor, ResidualTerm | None]:
    """Apply the group's ``norm_growth_limit`` to the direction ``scale · B(U) + S``; return the new (U, S)."""
    gamma = group.get(NORM_GROWTH_KEY)
    if gamma is None:
        return U, S
    norm = update_norm(U, S, projector, state, ctx)
    k = ctx.ops.norm_growth_divisor(norm, state, UPDATE_NORM, float(gamma))
    if k is None:
        return U, S
    if isinstance(S, ScaledResidual):
        S = S.divided(k)
    elif S is not None:
        S = S.div_(k.to(S.dtype))
    return U / k.to(U.dtype), S
