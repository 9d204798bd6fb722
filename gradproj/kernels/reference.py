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


def fira_residual_factors(
    G: torch.Tensor,
    R: torch.Tensor,
    psi: torch.Tensor,
    alpha: float,
    rank_axis: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fira's scaling factors φ and the norm ‖(G - α·B(R)) · φ‖, without materialising the residual.

    Valid for a basis whose back-projection B is an isometry with adjoint ``down`` (orthonormal P and
    R = down(G)). Row by row (right projection; column by column for a left one) B(R)_i = R_i P, so
    ⟨G_i, B(R)_i⟩ = ‖R_i‖² = ‖B(R)_i‖² and::

        ‖G_i - α·B(R)_i‖² = ‖G_i‖² - (2α - α²)·‖R_i‖²

    φ has G's shape with size 1 along ``rank_axis``; both results are in :func:`accumulation_dtype`.
    """
    acc = accumulation_dtype(G)
    r_norm = norms(R, rank_axis, acc)
    phi = norms(psi, rank_axis, acc).div_(r_norm + 1e-8)
    residual_norm = norms(G, rank_axis, acc).square_().sub_(r_norm.square_(), alpha=2.0 * alpha - alpha * alpha)
    residual_norm.clamp_(min=0.0).sqrt_()
    return phi, torch.linalg.vector_norm(residual_norm.mul_(phi))


def norms(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Euclidean norms along ``dim`` (kept), in ``dtype``.

    On CPU ``vector_norm`` along a strided dim is ~4x slower than squaring a copy and summing, so a strided
    dim takes the latter.
    """
    if x.is_contiguous() and dim in (-1, x.dim() - 1):
        return torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=dtype)
    return (x if x.dtype == dtype else x.to(dtype)).square().sum(dim, keepdim=True).sqrt_()


def norm_growth_divisor(norm: torch.Tensor, state: dict, key: str, gamma: float) -> torch.Tensor | None:
    """Fira's norm-growth limiter on a norm: the divisor k for this step, on the device (no host sync).

    With a previous norm N in ``state[key]``: k = max(‖S‖ / (N + 1e-8), γ) / γ and N ← ‖S‖ / k (the
    norm after limiting). Without one (the first step) N ← ‖S‖ and ``None`` is returned: never limited.
    """
    prev = state.get(key)
    if prev is None:
        state[key] = norm.detach().clone()
        return None
    k = torch.clamp(norm / (prev + 1e-8), min=gamma) / gamma
    torch.div(norm, k, out=prev)
    return k


def limit_norm_growth_(S: torch.Tensor, state: dict, key: str, gamma: float) -> torch.Tensor:
    """The norm-growth limiter applied in place to ``S``: S ← S / k with k from :func:`norm_growth_divisor`."""
    k = norm_growth_divisor(torch.linalg.vector_norm(S, dtype=accumulation_dtype(S)), state, key, gamma)
    if k is not None:
        S.div_(k.to(S.dtype))
    return S


def apply_weight_decay_(W: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay in full space, after the update: W -= lr · wd · W (the reference's form)."""
    if weight_decay != 0.0:
        W.add_(W, alpha=-lr * weight_decay)
