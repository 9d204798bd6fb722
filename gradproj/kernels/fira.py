"""Triton twins of Fira's residual: per-row/column norm ratio, residual scaling and norm-growth limiter.

Fira's residual is ``S = ((G − α·B(R)) ⊙ φ) / k`` with φ = ‖ψ‖ / (‖R‖ + 1e-8) over the rank axis (one
factor per row of G for a right projection, per column for a left one) and k the limiter's factor,
which needs the norm of the whole of ``D ⊙ φ``. Here S is never written out:

1. ``D = G − α·B(R)`` is one cuBLAS ``addmm`` (the subtraction rides in the GEMM's epilogue);
2. ``_phi_kernel`` computes φ from ψ and R (small: m·r or r·n elements);
3. ``_scaled_sumsq_kernel`` reads D once and writes one partial ‖D ⊙ φ‖² per tile;
4. ``_limiter_kernel`` (a single program) sums the partials in a fixed order (deterministic, unlike
   atomics), computes k, updates the stored norm and writes 1/k, all on the device: no host sync;
5. the update epilogue (:mod:`gradproj.kernels.update`) reads D, φ and 1/k while it updates W.

The result of :func:`fira_residual` is a :class:`ScaledResidual`, which the same ops module's
``apply_update`` consumes; :meth:`ScaledResidual.materialize` gives the dense S (tests, other uses).
The factored path (orthonormal bases, float32) needs only norms along the rank axis: ``_axis_sumsq_kernel``
(:func:`axis_norms`) reads G once for :func:`fira_residual_factors`.

No square overflows: every sum of squares is of values divided by a power of two at their largest
magnitude (per row, tile or partial), and the partials are brought to a common power of two before they
are added. Powers of two scale exactly, so where nothing would have overflowed the sums have the bits of
the plain ones; a ×1e20 gradient spike gives finite norms, not inf (and then NaN in the limiter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..projectors.base import Projector
from . import reference
from ._triton_common import LAUNCH, device_of
from .reference import ScaledResidual

PHI_BLOCK_F, PHI_BLOCK_K = 32, 64  # factors per program x rank slice per loop iteration
TILE_M, TILE_N = 32, 128  # full-size tiles: 128 contiguous elements per row, 4096 per program
SUM_BLOCK = 1024


@triton.jit
def _range_scale(amax):
    """A power of two to divide values of magnitude <= ``amax`` by before squaring them: the largest power
    of two <= amax, clamped to [1, 2¹²⁶] (1 for inf/NaN). Values below 2 are never scaled (their squares
    cannot overflow), and dividing by a power of two is exact, so a sum of scaled squares times scale²
    has the bits of the plain sum whenever that did not overflow. 2¹²⁶ keeps 1/scale a normal float."""
    bits = amax.to(tl.int32, bitcast=True) & 0x7F800000  # the exponent field alone
    p = tl.minimum(bits.to(tl.float32, bitcast=True), 8.507059173023462e37)  # 2**126
    return tl.where((p > 1.0) & (bits != 0x7F800000), p, 1.0)


@triton.jit
def _rescaled_sumsq(acc, scale, x):
    """Add the squares of ``x`` (BLOCK_F x BLOCK_K) row by row to ``acc``, which holds sums of squares divided
    by ``scale``² (BLOCK_F); return the new (acc, scale). The scale only grows, by powers of two."""
    new = tl.maximum(scale, _range_scale(tl.max(tl.abs(x), axis=1)))
    q = scale * tl.div_rn(1.0, new)  # a power of two <= 1: exact
    xs = x * tl.div_rn(1.0, new)[:, None]
    return acc * q * q + tl.sum(xs * xs, axis=1), new


@triton.jit
def _phi_kernel(PSI, R, PHI, F, K, s_pf, s_pk, s_rf, s_rk, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = f < F
    acc_p = tl.zeros([BLOCK_F], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_F], dtype=tl.float32)
    scale_p = tl.full([BLOCK_F], 1.0, dtype=tl.float32)
    scale_r = tl.full([BLOCK_F], 1.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = fmask[:, None] & (k < K)[None, :]
        p = tl.load(PSI + f[:, None] * s_pf + k[None, :] * s_pk, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + f[:, None] * s_rf + k[None, :] * s_rk, mask=mask, other=0.0).to(tl.float32)
        acc_p, scale_p = _rescaled_sumsq(acc_p, scale_p, p)
        acc_r, scale_r = _rescaled_sumsq(acc_r, scale_r, r)
    phi = tl.div_rn(tl.sqrt_rn(acc_p) * scale_p, tl.sqrt_rn(acc_r) * scale_r + 1e-8)
    tl.store(PHI + f, phi, mask=fmask)


@triton.jit
def _scaled_sumsq_kernel(
    D,
    PHI,
    INV_K,
    PARTIAL,
    M,
    N,
    s_dm,
    s_dn,
    HAS_PHI: tl.constexpr,
    PHI_AXIS: tl.constexpr,
    HAS_INV_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(D + rows[:, None].to(tl.int64) * s_dm + cols[None, :] * s_dn, mask=mask, other=0.0).to(tl.float32)
    if HAS_PHI:
        if PHI_AXIS == 0:
            x = x * tl.load(PHI + rows, mask=rows < M, other=0.0)[:, None]
        else:
            x = x * tl.load(PHI + cols, mask=cols < N, other=0.0)[None, :]
    if HAS_INV_K:
        x = x * tl.load(INV_K)
    # one partial per tile: Σ (x / scale)² and its power-of-two scale (PARTIAL[P + tile]), so that no square
    # overflows; the limiter kernel brings the partials to a common scale
    scale = _range_scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0))
    x = x * tl.div_rn(1.0, scale)
    tile = pid_m * tl.num_programs(1) + pid_n
    tl.store(PARTIAL + tile, tl.sum(tl.sum(x * x, axis=1), axis=0))
    tl.store(PARTIAL + tl.num_programs(0) * tl.num_programs(1) + tile, scale)


@triton.jit
def _limiter_kernel(PARTIAL, P, PREV, INV_K, gamma, HAS_PREV: tl.constexpr, BLOCK: tl.constexpr):
    top = tl.full([BLOCK], 1.0, dtype=tl.float32)
    for i in range(0, P, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        top = tl.maximum(top, tl.load(PARTIAL + P + idx, mask=idx < P, other=1.0))
    top_all = tl.max(top, axis=0)
    inv_top = tl.div_rn(1.0, top_all)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, P, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        q = tl.load(PARTIAL + P + idx, mask=idx < P, other=1.0) * inv_top  # a power of two <= 1: exact
        acc += tl.load(PARTIAL + idx, mask=idx < P, other=0.0) * (q * q)
    norm = tl.sqrt_rn(tl.sum(acc, axis=0)) * top_all
    if HAS_PREV:
        # k = max(‖S‖ / (N + 1e-8), γ) / γ; N ← ‖S‖ / k, stored as γ·(N + 1e-8) when limiting (what it
        # equals): finite even when the ratio overflows (k = inf, 1/k = 0)
        prev = tl.load(PREV) + 1e-8
        k = tl.maximum(tl.div_rn(norm, prev), gamma) / gamma
        tl.store(PREV, tl.where(k > 1.0, prev * gamma, norm))
        tl.store(INV_K, tl.div_rn(1.0, k))
    else:  # the first step is never limited; remember its norm
        tl.store(PREV, norm)
        tl.store(INV_K, 1.0)


@triton.jit
def _axis_sumsq_kernel(X, SSQ, SCALE, M, N, s_m, s_n, AXIS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Per tile, one partial sum of squares per row (AXIS=1) or column (AXIS=0), with its power-of-two scale:
    partial p of row i (column j) is stored at [p, i] ([p, j]) of SSQ and SCALE."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * s_m + cols[None, :] * s_n, mask=mask, other=0.0).to(tl.float32)
    if AXIS == 1:
        scale = _range_scale(tl.max(tl.abs(x), axis=1))
        xs = x * tl.div_rn(1.0, scale)[:, None]
        tl.store(SSQ + pid_n * M + rows, tl.sum(xs * xs, axis=1), mask=rows < M)
        tl.store(SCALE + pid_n * M + rows, scale, mask=rows < M)
    else:
        scale = _range_scale(tl.max(tl.abs(x), axis=0))
        xs = x * tl.div_rn(1.0, scale)[None, :]
        tl.store(SSQ + pid_m * N + cols, tl.sum(xs * xs, axis=0), mask=cols < N)
        tl.store(SCALE + pid_m * N + cols, scale, mask=cols < N)


def axis_norms(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Euclidean norms of the rows (``axis=1``) or columns (``axis=0``) of a 2-D tensor, kept along ``axis``,
    in float32, overflow-safe: one read of ``x`` (tiles of partial sums of squares, each with a power-of-two
    scale), then a small combination of the partials in torch. Twin of
    :func:`gradproj.kernels.reference.axis_norms`, which other dtypes (float64) and shapes are handed to."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return reference.axis_norms(x, axis)
    M, N = x.shape
    grid = (triton.cdiv(M, TILE_M), triton.cdiv(N, TILE_N))
    parts, F = (grid[1], M) if axis == 1 else (grid[0], N)
    ssq = torch.empty(parts, F, dtype=torch.float32, device=x.device)
    scale = torch.empty(parts, F, dtype=torch.float32, device=x.device)
    with device_of(x):
        _axis_sumsq_kernel[grid](
            x, ssq, scale, M, N, x.stride(0), x.stride(1), AXIS=axis, BM=TILE_M, BN=TILE_N, **LAUNCH
        )
    top = scale.amax(0)
    q = scale / top  # powers of two <= 1: exact
    norms = ssq.mul_(q.square_()).sum(0).sqrt_().mul_(top)
    return norms[:, None] if axis == 1 else norms[None, :]


def fira_residual_factors(G, R, psi, alpha, rank_axis):
    """Twin of :func:`gradproj.kernels.reference.fira_residual_factors`, with the norms of G, R and ψ along the
    rank axis from :func:`axis_norms` (one pass over G, where the torch form needs several to be overflow-safe
    off the CPU)."""
    if G.dtype != torch.float32:
        return reference.fira_residual_factors(G, R, psi, alpha, rank_axis)
    g_norm, r_norm, psi_norm = (axis_norms(x, rank_axis) for x in (G, R, psi))
    phi, weighted = reference.fira_factors_from_norms(g_norm, r_norm, psi_norm, alpha)
    return phi, reference.safe_norm(weighted)


def residual_base(G: torch.Tensor, R: torch.Tensor, projector: Projector, state: dict, alpha: float) -> torch.Tensor:
    """``G − α·B(R)``: one ``addmm`` for the dense one-sided bases of :class:`Projector`, else via ``up``."""
    if type(projector).up is Projector.up and projector.side in ("left", "right"):
        P = projector.basis_tensor(state, "proj", G.dtype)  # dequantized if stored quantized (basis_bits)
        A, B = (R, P) if projector.side == "right" else (P, R)
        return torch.addmm(G, A.to(G.dtype), B.to(G.dtype), alpha=-alpha)
    return torch.add(G, projector.up(R, state).to(G.dtype), alpha=-alpha)


def norm_ratio(psi: torch.Tensor, R: torch.Tensor, rank_axis: int) -> torch.Tensor:
    """φ = ‖ψ‖ / (‖R‖ + 1e-8) over ``rank_axis`` of the low-rank tensors, as a float32 vector."""
    F, K = (R.shape[0], R.shape[1]) if rank_axis == 1 else (R.shape[1], R.shape[0])
    sp = psi.stride() if rank_axis == 1 else psi.stride()[::-1]
    sr = R.stride() if rank_axis == 1 else R.stride()[::-1]
    phi = torch.empty(F, dtype=torch.float32, device=R.device)
    with device_of(R):
        _phi_kernel[(triton.cdiv(F, PHI_BLOCK_F),)](
            psi,
            R,
            phi,
            F,
            K,
            sp[0],
            sp[1],
            sr[0],
            sr[1],
            BLOCK_F=PHI_BLOCK_F,
            BLOCK_K=PHI_BLOCK_K,
            **LAUNCH,
        )
    return phi


def fira_residual(G, R, psi, projector, state, alpha) -> ScaledResidual:
    """Fira's scaled residual for ``projector``, factored (see :class:`ScaledResidual`)."""
    rank_axis = projector.rank_axis()
    D = residual_base(G, R, projector, state, alpha)
    return ScaledResidual(D, norm_ratio(psi, R, rank_axis), axis=0 if rank_axis == 1 else 1)


def fira_scaled_residual(G, BR, psi, R, alpha, rank_axis) -> ScaledResidual:
    """Twin of :func:`gradproj.kernels.reference.fira_scaled_residual` (B(R) given), factored."""
    D = torch.add(G, BR.to(G.dtype), alpha=-alpha)
    return ScaledResidual(D, norm_ratio(psi, R, rank_axis), axis=0 if rank_axis == 1 else 1)


def limit_norm_growth_(S, state: dict, key: str, gamma: float) -> ScaledResidual:
    """Fira's norm-growth limiter on the device; ``S`` is a :class:`ScaledResidual` or a dense tensor.

    Same rule as :func:`gradproj.kernels.reference.limit_norm_growth_`: with a previous norm N in
    ``state[key]``, k = max(‖S‖ / (N + 1e-8), γ) / γ, S ← S / k, N ← ‖S‖ / k; without one N ← ‖S‖.
    """
    if not isinstance(S, ScaledResidual):
        S = ScaledResidual(S)
    D = S.D if S.D.dim() == 2 else S.D.reshape(1, -1)
    M, N = D.shape
    grid = (triton.cdiv(M, TILE_M), triton.cdiv(N, TILE_N))
    partial = torch.empty(2 * grid[0] * grid[1], dtype=torch.float32, device=D.device)  # sums, then scales
    prev = state.get(key)
    if prev is None:
        prev = state[key] = torch.zeros((), dtype=torch.float32, device=D.device)
        has_prev = False
    else:
        has_prev = True
    inv_k = torch.empty(1, dtype=torch.float32, device=D.device)
    with device_of(D):
        _scaled_sumsq_kernel[grid](  # absent factors: any pointer, never read
            D,
            partial if S.phi is None else S.phi,
            partial if S.inv_k is None else S.inv_k,
            partial,
            M,
            N,
            D.stride(0),
            D.stride(1),
            HAS_PHI=S.phi is not None,
            PHI_AXIS=S.axis,
            HAS_INV_K=S.inv_k is not None,
            BM=TILE_M,
            BN=TILE_N,
            **LAUNCH,
        )
        _limiter_kernel[(1,)](
            partial, grid[0] * grid[1], prev, inv_k, float(gamma), HAS_PREV=has_prev, BLOCK=SUM_BLOCK, **LAUNCH
        )
    if S.inv_k is not None:  # limiting an already limited residual: the factors compose
        inv_k = inv_k * S.inv_k
    S.inv_k = inv_k
    return S
