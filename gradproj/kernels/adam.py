"""Triton twin of :func:`gradproj.kernels.reference.adam_update`: the low-rank Adam update in one pass.

Per element, in float32: ``m ← m + (1−β1)(r − m)``, ``v ← β2·v + (1−β2)·r²``, ``ψ = m / (√v + eps)``;
m and v are stored back in place and ψ into a new tensor, each rounded once to the state dtype. One
read of R, m, v and one write of m, v, ψ, against about fifteen tensor passes for the torch
reference (lerp, mul, addcmul, sqrt, add, div). Adam's bias correction is a scalar,
``√(1−β2^t) / (1−β1^t)``, folded into the step size by the caller (GaLore's form), so ψ is the
un-corrected direction Fira's scaling needs.

The per-element math is the separate ``adam_math`` so a quantized-state variant can reuse it: such a
kernel loads the 8-bit codes and per-block absmax of its own block (the launch block then equals the
quantization block), dequantizes to float32, calls ``adam_math`` and re-quantizes on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._triton_common import LAUNCH, device_of, store_rounded

BLOCK = 1024  # elements per program: 4 warps x 32 threads x 8 elements, 24 KiB of fp32 traffic


@triton.jit
def adam_math(r, m, v, one_minus_beta1, beta2, one_minus_beta2, eps):
    """float32 in, float32 out: the updated moments and ψ (IEEE-rounded sqrt and division, like torch)."""
    m = m + one_minus_beta1 * (r - m)  # torch.lerp's form for weights below 0.5
    v = v * beta2 + one_minus_beta2 * r * r
    psi = tl.div_rn(m, tl.sqrt_rn(v) + eps)
    return m, v, psi


@triton.jit
def _adam_kernel(R, M, V, PSI, numel, one_minus_beta1, beta2, one_minus_beta2, eps, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    m, v, psi = adam_math(r, m, v, one_minus_beta1, beta2, one_minus_beta2, eps)
    store_rounded(M + offs, m, mask)
    store_rounded(V + offs, v, mask)
    store_rounded(PSI + offs, psi, mask)


def adam_update(
    R: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """Update the moments in place and return ψ = m / (sqrt(v) + eps), without bias correction."""
    if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()) or exp_avg.shape != R.shape:
        return reference.adam_update(R, exp_avg, exp_avg_sq, beta1, beta2, eps)
    R = R.contiguous()  # a copy only for a transposed R (the CPU form of a left projection)
    psi = torch.empty_like(exp_avg)
    numel = exp_avg.numel()
    with device_of(R):
        _adam_kernel[(triton.cdiv(numel, BLOCK),)](
            R,
            exp_avg,
            exp_avg_sq,
            psi,
            numel,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            eps,
            BLOCK=BLOCK,
            **LAUNCH,
        )
    return psi
