"""Pure-torch reference implementations of the fused operations.

These are the CPU path and the test oracle of every accelerated kernel: a Triton kernel must compute the
same function as its twin here. Each function is written to read like the math in ALGORITHMS.md.
"""

from __future__ import annotations

import torch


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


def clip_by_norm(g: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """``g · min(1, max_norm / (‖g‖ + 1e-6))`` as a new tensor (``g`` itself when ``max_norm`` is None).

    The formula of ``torch.nn.utils.clip_grad_norm_`` applied to one tensor; the norm is taken in float32
    for half-precision tensors, and the coefficient stays on the device (no host synchronisation).
    """
    if max_norm is None:
        return g
    norm = torch.linalg.vector_norm(g, dtype=accumulation_dtype(g))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return g * coef.to(g.dtype)
