"""Triton twin of :func:`gradproj.kernels.reference.apply_update`: the weight update as one epilogue pass.

``W ← W − step·scale·B(U) − s_res·S`` then ``W ← W − lr·wd·W``, evaluated in float32 per element and
rounded once to W's dtype: to nearest, or stochastically for bfloat16 weights when a seed is given.
B(U) comes from a cuBLAS GEMM (``projector.up``); S is absent, a dense tensor, or Fira's factored
:class:`~gradproj.kernels.reference.ScaledResidual` (D, per-row/column φ and the limiter's 1/k, read here,
so S itself is never written). One pass reads W, B(U) and S and writes W; the torch reference makes
three passes over W (GEMM, add of S, decay), each rounding to W's dtype.

When there is nothing for an epilogue to fuse (no S, round to nearest) and the projector keeps the
default dense bases, the whole update is a single ``addmm_`` with ``beta = 1 − lr·wd`` instead: cuBLAS
then reads and writes W once and nothing else full-size is touched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..projectors.base import Projector
from . import reference
from ._triton_common import LAUNCH, bf16_stochastic, device_of, store_rounded
from .reference import ScaledResidual

TILE_M, TILE_N = 32, 128  # 128 contiguous elements per row, 4096 per program


@triton.jit(do_not_specialize=["seed"])  # a new seed every step must not mean a new compilation
def _update_kernel(
    W,
    BU,
    S,
    PHI,
    INV_K,
    M,
    N,
    s_wm,
    s_wn,
    s_bm,
    s_bn,
    s_sm,
    s_sn,
    step,
    scale,
    res_step,
    decay,
    seed,
    HAS_S: tl.constexpr,
    HAS_PHI: tl.constexpr,
    PHI_AXIS: tl.constexpr,
    HAS_INV_K: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    w_ptrs = W + rows[:, None] * s_wm + cols[None, :] * s_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = scale * tl.load(BU + rows[:, None] * s_bm + cols[None, :] * s_bn, mask=mask, other=0.0).to(tl.float32)
    w = w - step * u
    if HAS_S:
        s = tl.load(S + rows[:, None] * s_sm + cols[None, :] * s_sn, mask=mask, other=0.0).to(tl.float32)
        if HAS_PHI:
            if PHI_AXIS == 0:
                s = s * tl.load(PHI + rows, mask=rows < M, other=0.0)[:, None]
            else:
                s = s * tl.load(PHI + cols, mask=cols < N, other=0.0)[None, :]
        if HAS_INV_K:
            s = s * tl.load(INV_K)
        w = w - res_step * s
    w = w - decay * w
    if STOCHASTIC:
        w = bf16_stochastic(w, seed, rows[:, None] * N + cols[None, :])
    store_rounded(w_ptrs, w, mask)


def _as_matrix(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a 2-D view (1-D and >2-D tensors flattened), or None when that needs a copy."""
    if t.dim() == 2:
        return t
    if not t.is_contiguous():
        return None
    return t.view(1, -1) if t.dim() < 2 else t.view(t.shape[0], -1)


def _add_up_scaled_(
    W: torch.Tensor, projector: Projector, state: dict, U: torch.Tensor, alpha: float, beta: float
) -> None:
    """``W ← beta·W + alpha·B(U)`` in one GEMM, for projectors using :meth:`Projector.add_up_`'s dense bases."""
    if projector.gemm_dtype_for(state) not in (None, W.dtype):  # proj_dtype: the GEMM in that dtype, then one add
        if beta != 1.0:
            W.mul_(beta)
        projector.add_up_(W, U, state, alpha)
        return
    X = U.to(W.dtype)
    basis = lambda key: projector.basis_tensor(state, key, W.dtype).to(W.dtype)  # noqa: E731  # dequantized if need be
    if projector.side == "right":
        W.addmm_(X, basis("proj"), beta=beta, alpha=alpha)
    elif projector.side == "left":
        W.addmm_(basis("proj"), X, beta=beta, alpha=alpha)
    else:
        W.addmm_(basis("proj_left"), X @ basis("proj_right"), beta=beta, alpha=alpha)


def apply_update(
    W: torch.Tensor,
    projector: Projector,
    state: dict,
    U: torch.Tensor,
    S,
    step_size: float,
    scale: float,
    lr: float,
    weight_decay: float,
    seed: int | None = None,
    residual_step: float | None = None,
) -> None:
    """``W -= step_size · scale · B(U) + s_res · S``, then ``W -= lr · wd · W``, in place (see the module doc);
    ``s_res`` is ``residual_step``, else ``step_size``."""
    decay = lr * weight_decay
    s_res = step_size if residual_step is None else residual_step
    if seed is not None and W.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding is defined for bfloat16 weights, not {W.dtype}")
    if seed is None and S is None and type(projector).add_up_ is Projector.add_up_:
        beta = 1.0 - decay  # W - decay·W after the update = beta · (W − step·scale·B(U))
        _add_up_scaled_(W, projector, state, U, alpha=-step_size * scale * beta, beta=beta)
        return
    W2 = _as_matrix(W)
    if W2 is None:  # a non-contiguous tensor of other than two dimensions: rare, let torch do it
        dense = S.materialize() if isinstance(S, ScaledResidual) else S
        return reference.apply_update(W, projector, state, U, dense, step_size, scale, lr, weight_decay, seed, s_res)
    BU = reference.back_project(projector, U, state, W.dtype).reshape(W2.shape)
    if not isinstance(S, ScaledResidual):
        S = None if S is None else ScaledResidual(S)
    D = S.D.reshape(W2.shape) if S is not None else BU  # BU: a placeholder pointer, not read
    M, N = W2.shape
    with device_of(W2):
        _update_kernel[(triton.cdiv(M, TILE_M), triton.cdiv(N, TILE_N))](
            W2,
            BU,
            D,
            S.phi if S is not None and S.phi is not None else BU,
            S.inv_k if S is not None and S.inv_k is not None else BU,
            M,
            N,
            W2.stride(0),
            W2.stride(1),
            BU.stride(0),
            BU.stride(1),
            D.stride(0),
            D.stride(1),
            float(step_size),
            float(scale),
            float(s_res),
            float(decay),
            0 if seed is None else int(seed),
            HAS_S=S is not None,
            HAS_PHI=S is not None and S.phi is not None,
            PHI_AXIS=S.axis if S is not None else 0,
            HAS_INV_K=S is not None and S.inv_k is not None,
            STOCHASTIC=seed is not None,
            BM=TILE_M,
            BN=TILE_N,
            **LAUNCH,
        )
