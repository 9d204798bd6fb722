"""Small dense linear-algebra pieces shared by the bases: orthonormalisation, canonical signs, Ritz steps, and
exact (power-of-two) rescaling of a gradient before it is squared."""

from __future__ import annotations

import torch


def canonical_signs_(B: torch.Tensor, dim: int) -> torch.Tensor:
    """Flip the sign of each basis vector (a column for ``dim=0`` vectors laid along dim 0, i.e. B is d x r;
    a row for ``dim=1``) so that its entry of largest magnitude is positive. Makes eigenvector and QR
    outputs independent of the solver's sign choice. In place; returns ``B``."""
    idx = B.abs().argmax(dim=dim, keepdim=True)
    signs = torch.sign(B.gather(dim, idx))
    signs[signs == 0] = 1
    return B.mul_(signs)


def orthonormalize(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``X`` (d x k, d >= k) by Householder QR, with the signs fixed so
    that R has a non-negative diagonal (Q then depends only on X, not on the LAPACK build)."""
    Q, R = torch.linalg.qr(X)
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    return Q * signs


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor: whether every element of ``t`` is finite (no NaN, no ±Inf).

    One reduction first: a sum with a NaN or Inf term is NaN or ±Inf, so a finite sum proves every element
    finite; only a sum that is not finite (a NaN/Inf element, or finite elements whose sum overflows) pays for
    the elementwise check. ``torch.isfinite(t).all()`` alone writes a bool tensor the size of t first (9-14 ms
    for a 2736 x 1024 gradient against ~1 ms for the sum, 1 thread). Half-precision tensors are summed in
    float32, where their sum cannot overflow unless an element is Inf."""
    s = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    finite = torch.isfinite(s)
    return finite if bool(finite) else torch.isfinite(t).all()


def extend_orthonormal(S: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``[S | Q]``: the columns of ``S`` (d x r, orthonormal) followed by an orthonormal basis ``Q`` of the part of
    ``X`` (d x p) orthogonal to them, so that the span is that of ``[S | X]`` (block Gram–Schmidt).

    X is projected off S twice (classical Gram–Schmidt twice: one pass leaves components of the order of
    eps·‖X‖/‖(I − S Sᵀ) X‖ in S's span, the second removes them, Giraud et al. 2005), then the small d x p block is
    orthonormalized by QR. Costs four thin GEMMs and a d x p QR instead of a d x (r + p) QR of the whole block;
    S is used as it is (not re-orthonormalized), so the result is as orthonormal as S is.
    """
    S = S.float()
    X = X.float()
    for _ in range(2):
        X = X - S @ (S.t() @ X)
    return torch.cat([S, orthonormalize(X)], dim=1)


def top_eigenvectors(
    C: torch.Tensor, r: int, solve_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``r`` leading eigenpairs of a symmetric PSD matrix ``C`` (k x k), largest first, as
    ``(values, vectors)`` with the vectors as columns in canonical signs. Solved in ``solve_dtype``, by default
    in float64 when C is small (cheap, and the squared singular values of a Gram matrix span a wide range) and
    in C's dtype otherwise; falls back to float64 when a lower-precision solve fails to converge or returns
    non-finite values."""
    k = C.shape[0]
    if solve_dtype is None:
        solve_dtype = torch.float64 if k <= 1024 else C.dtype
    work = C.to(solve_dtype)
    try:
        values, vectors = torch.linalg.eigh(work)
        if solve_dtype != torch.float64 and not bool(torch.isfinite(values).all()):
            raise torch.linalg.LinAlgError("non-finite eigenvalues")
    except torch.linalg.LinAlgError:
        values, vectors = torch.linalg.eigh(C.double())
    values = values.flip(0)[:r].to(C.dtype)
    vectors = vectors.flip(1)[:, :r].to(C.dtype).contiguous()
    return values, canonical_signs_(vectors, dim=0)


def power_of_two_scale(a: torch.Tensor) -> torch.Tensor:
    """The largest power of two <= ``a``, elementwise (1 where ``a`` is 0, subnormal, inf or NaN).

    Dividing by it is exact, so what is computed from the scaled values rounds exactly as it would have
    unscaled (unless that overflowed or underflowed): the scaling changes the range, not the bits.
    """
    bits = {torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}
    if a.dtype in bits:
        itype, mask = bits[a.dtype]
        p = (a.contiguous().view(itype) & mask).view(a.dtype)  # the exponent alone: sign and mantissa cleared
    else:
        p = torch.exp2(torch.floor(torch.log2(a.float()))).to(a.dtype)
    return torch.where(torch.isfinite(p) & (p > 0), p, torch.ones_like(p))


def unit_scaled(G: torch.Tensor) -> torch.Tensor:
    """``G`` in float32, divided by a power of two so that its largest magnitude lies in [1, 2).

    The Gram matrix G Gᵀ of a finite float32 gradient overflows once its entries pass ~1e19 (and loses
    them below ~1e-19); the entries of the rescaled G's Gram matrix are at most 4·min(m, n). The singular
    vectors do not change, and the division is exact, so an ordinary gradient gets the same basis up to the
    decomposition's rounding. An all-zero or non-finite G is returned unscaled.
    """
    A = G.float()
    return A / power_of_two_scale(torch.linalg.vector_norm(A, ord=float("inf")))


#: :func:`in_safe_range` leaves G unscaled when its largest magnitude lies in [2^-SAFE_LOG2, 2^SAFE_LOG2]
SAFE_LOG2 = 24


def in_safe_range(G: torch.Tensor) -> torch.Tensor:
    """``G`` in float32, rescaled by :func:`unit_scaled` only where its range needs it.

    For a randomized SVD, whose largest intermediate is of degree two in G (YᵀY and GᵀG Z, with orthonormal
    Z, sum at most m·n products of two entries): with the largest magnitude a in [2^-24, 2^24] those are at
    most 2^48·m·n (far below float32's 2^128 for any matrix that fits in memory), and the squares of the
    leading singular values (σ₁ >= a) at least 2^-48, far above the subnormal range, so no rescaling is
    needed and G is used as it is (no copy when it is already float32: the rescaling's extra pass over G
    costs as much as one of the sketch's GEMMs). Outside that range, or for a zero or non-finite G, it is
    :func:`unit_scaled`. Either way the vectors are the same up to the decomposition's rounding.
    """
    A = G.float()
    # one reduction over G, no temporary the size of G: over a transposed view (a left basis decomposes Gᵀ) torch's
    # aminmax first copies it to contiguous memory (9 ms against 0.9 ms for a 1024 x 2736 G, 1 thread), so the
    # reduction, which does not depend on the layout, runs over the contiguous transpose instead
    flat = A.t() if not A.is_contiguous() and A.t().is_contiguous() else A
    lo, hi = torch.aminmax(flat)
    a = float(torch.maximum(lo.abs(), hi.abs()))
    if 2.0**-SAFE_LOG2 <= a <= 2.0**SAFE_LOG2:
        return A
    return unit_scaled(A)
