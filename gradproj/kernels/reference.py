"""Pure-torch reference implementations of the fused operations.

These are the CPU path and the test oracle of every accelerated kernel: a Triton kernel must compute the
same function as its twin here. Each function is written to read like the math in ALGORITHMS.md.
"""

from __future__ import annotations

import torch

from ..projectors.base import IdentityProjector


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision tensors, the tensor's own dtype otherwise (float32 / float64)."""
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype


def adam_update(
    R: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """Update the moments in place and return ψ = m / (sqrt(v) + eps), *without* bias correction.

    The bias correction is folded into the step size by the caller
    (``lr · sqrt(1 - β2^t) / (1 - β1^t)``), exactly as GaLore's reference does.
    """
    R = R.to(exp_avg.dtype)
    exp_avg.lerp_(R, 1.0 - beta1)  # = beta1 * m + (1 - beta1) * R, one pass
    exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    return torch.div(exp_avg, denom, out=denom)


def fira_scaled_residual(
    G: torch.Tensor,
    BR: torch.Tensor,
    psi: torch.Tensor,
    R: torch.Tensor,
    alpha: float,
    rank_axis: int,
) -> torch.Tensor:
    """Fira's norm-based scaling: ``S = (G - α·B(R)) · φ`` with φ = ‖ψ‖ / (‖R‖ + 1e-8) over the rank axis.

    ``rank_axis`` is 1 for a right projection (R is m x r: one factor per row of G) and 0 for a left
    projection (R is r x n: one factor per column). ψ is the un-bias-corrected Adam direction.
    """
    phi = torch.linalg.vector_norm(psi, dim=rank_axis, keepdim=True) / (
        torch.linalg.vector_norm(R, dim=rank_axis, keepdim=True).to(psi.dtype) + 1e-8
    )
    S = G - alpha * BR.to(G.dtype)
    return S * phi.to(S.dtype)


def limit_norm_growth_(S: torch.Tensor, state: dict, key: str, gamma: float) -> torch.Tensor:
    """Fira's norm-growth limiter, in place on ``S``; all on the device (no host sync).

    With a previous norm N in ``state[key]``: k = max(‖S‖ / (N + 1e-8), γ) / γ, S ← S / k and
    N ← ‖S_before‖ / k. Without one (the first step) S is left as is and N ← ‖S‖.
    """
    norm = torch.linalg.vector_norm(S, dtype=accumulation_dtype(S))
    prev = state.get(key)
    if prev is None:
        state[key] = norm
        return S
    k = torch.clamp(norm / (prev + 1e-8), min=gamma) / gamma
    S.div_(k.to(S.dtype))
    prev.copy_(norm / k)
    return S


def apply_weight_decay_(W: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay in full space, after the update: W -= lr · wd · W (the reference's form)."""
    if weight_decay != 0.0:
        W.add_(W, alpha=-lr * weight_decay)


def fira_residual(
    G: torch.Tensor,
    R: torch.Tensor,
    psi: torch.Tensor,
    projector,
    state: dict,
    alpha: float,
) -> torch.Tensor:
    """Fira's scaled residual for ``projector``: :func:`fira_scaled_residual` with ``B(R)`` computed here."""
    return fira_scaled_residual(G, projector.up(R, state), psi, R, alpha, projector.rank_axis())


def back_project(projector, U: torch.Tensor, state: dict, dtype: torch.dtype) -> torch.Tensor:
    """``B(U)``, with U cast to the weight's dtype first as the GEMM of :meth:`Projector.add_up_` does.

    The identity projector returns U itself (in its own dtype: nothing is gained by rounding it first).
    """
    if isinstance(projector, IdentityProjector):
        return U
    return projector.up(U.to(dtype), state)


def apply_update(
    W: torch.Tensor,
    projector,
    state: dict,
    U: torch.Tensor,
    S: torch.Tensor | None,
    step_size: float,
    scale: float,
    lr: float,
    weight_decay: float,
    seed: int | None = None,
) -> None:
    """The weight update, in place: ``W -= step_size · (scale · B(U) + S)``, then ``W -= lr · wd · W``.

    With ``seed=None`` the update is one GEMM into W (``addmm_``), an add of S and the decay, each
    rounded to W's dtype as it goes (round to nearest). With a seed (bfloat16 W only, see
    :func:`stochastic_round_to_bf16`) the same expression is evaluated in float32, in this order::

        w = float32(W);  u = scale · float32(B(U)) [+ float32(S)];  w = w - step_size · u;  w = w - lr·wd · w

    and rounded to bfloat16 once, stochastically. The Triton epilogue evaluates the same expression.
    """
    if seed is None:
        projector.add_up_(W, U, state, alpha=-step_size * scale)
        if S is not None:
            W.add_(S.to(W.dtype), alpha=-step_size)
        apply_weight_decay_(W, lr, weight_decay)
        return
    if W.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding is defined for bfloat16 weights, not {W.dtype}")
    w = W.float()
    u = back_project(projector, U, state, W.dtype).float() * scale  # a new tensor: U is left as it is
    if S is not None:
        u.add_(S.float())
    w.sub_(step_size * u)
    w.sub_(lr * weight_decay * w)
    W.copy_(stochastic_round_to_bf16(w, seed))


def stochastic_round_to_bf16(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Round float32 ``x`` to bfloat16 stochastically: up (in magnitude) with probability equal to the
    fraction of a bfloat16 ulp that x lies above the value below it, so ``E[round(x)] = x``.

    Definition (shared with the Triton kernels): add a uniform random integer in [0, 2¹⁶) to the
    float32 bit pattern of x, then clear its low 16 bits. NaN stays NaN; values beyond the largest
    bfloat16 may round to ±inf. The random integers come from a ``torch.Generator`` seeded with
    ``seed`` on x's device (Triton draws them from Philox with the same seed: same distribution, not
    the same bits).
    """
    gen = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, device=x.device, dtype=torch.int32)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # -65536 == 0xFFFF0000 as int32
    rounded = bits.view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)
