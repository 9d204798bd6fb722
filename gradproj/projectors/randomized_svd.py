"""Randomized SVD basis (Halko, Martinsson & Tropp 2011; GaLore 2 uses it at scale), docs/bases.md.

The top-r singular subspace of G is found by subspace iteration on a sketch of r + p vectors instead of a
full SVD: a few GEMMs with G and QR factorisations of tall-skinny matrices, which is where CPUs and GPUs
are fast, instead of LAPACK's bidiagonalisation. It is the default basis (q = 1, warm start): on gradients
recorded from a small LLaMA it captured ≥ 0.999 of the exact top-r energy, and on whole LLaMA models its
refresh cost a fraction of the SVD's (docs/bases.md); ``projector="svd"`` stays for galore-torch's exact bases.
"""

from __future__ import annotations

import torch

from ..options import Option, boolean, number
from ..state_layout import scalar_int
from . import lazy, seeding
from .base import Projector, scratch
from .linalg import extend_orthonormal, in_safe_range, orthonormalize, top_eigenvectors
from .quantized import BASIS_BITS_OPTION


def low_copy(A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``A`` cast to ``dtype`` in the buffer the ``proj_dtype`` GEMMs cast G into (:func:`~gradproj.projectors.base.
    scratch`, slot 0: a transient of :meth:`Projector.down`, never live outside it), laid out like A. A fresh
    multi-megabyte tensor would map new pages at each refresh, whose first-touch faults measured 2 ms of a
    warm 2736 x 1024 refresh's cast (0.7 ms into a reused buffer, 1 thread)."""
    if not A.is_contiguous() and A.t().is_contiguous():  # G transposed (a left basis): G's own shape and layout
        return scratch(A.t().shape, dtype, A.device, 0).t().copy_(A)
    return scratch(A.shape, dtype, A.device, 0).copy_(A)


def randomized_svd(
    G: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 1,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    left: bool = False,
    power_dtype: torch.dtype | None = None,
    solve_dtype: torch.dtype | None = torch.float32,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Approximate top-``rank`` singular vectors of ``G`` (m x n), computed in float32.

    Subspace iteration on k = rank + ``oversample`` vectors of G's row space (Halko et al., Alg. 4.4 on Gᵀ
    followed by the SVD of the small projected matrix)::

        Z = orth(Gᵀ Ω)                      Ω: m x k Gaussian (cold start), or
        Z = [start | orth(P Gᵀ Ω')]         the previous basis plus k - r fresh directions (warm start),
                                            P = I - start startᵀ (block Gram–Schmidt)
        repeat power_iters times:           Z = orth(Gᵀ (G Z))                  (one QR per iteration)
        Y = G Z  (m x k);  YᵀY = W Λ Wᵀ     (Rayleigh–Ritz on the k-dimensional subspace)
        V = Z W_r;  U = orth(Y W_r)         (U only when ``left``)

    2 + 2·power_iters GEMMs with G for a cold start (one fewer when warm), instead of an O(m n min(m, n))
    SVD. The error of the subspace shrinks like (σ_{k+1} / σ_i)^(2·power_iters + 1).

    Within an iteration G Z is not orthonormalized (Halko et al.'s Alg. 4.3 rather than 4.4): that QR of an
    m x k matrix was a third of a warm refresh's time on a 2048 x 768 gradient. What it would protect is the
    directions whose σ_i² falls below float32's rounding of σ_1² (σ_i < ~2.4e-4·σ_1), whose share of G's
    energy is below 6e-8 each; on spectra σ_i ∝ i^-0.5, i^-1, i^-2 (2048 x 768, rank 192, cold and warm) the
    captured energy agreed with the re-orthonormalized iteration's to 1e-7. G is rescaled only where its
    range needs it (:func:`~gradproj.projectors.linalg.in_safe_range`).

    A warm start with ``power_iters >= 1`` keeps the previous basis's columns as they are and orthonormalizes
    only the fresh ones against them (:func:`~gradproj.projectors.linalg.extend_orthonormal`): the next QR
    sees only the span, which is that of ``[start | Gᵀ Ω']`` either way, and the QR of the whole n x k block
    was a sixth of a warm refresh. With ``power_iters=0`` Z is the final basis's factor and gets the full QR.

    Args:
        start: the previous top right singular vectors, n x r' (r' <= k), as columns (warm start).
        left: also return the left singular vectors.
        power_dtype: the dtype of the power iteration's G Z (its product is used in float32; None: float32).
            Only that GEMM: its rounding error reaches the subspace multiplied by Gᵀ, which damps it in the
            directions of small σ_i. Rounding Gᵀ (G Z) as well (its output in bfloat16) moved the captured
            energy of gradients recorded from a small LLaMA by up to 3e-4; bfloat16 G Z alone by at most 1e-6
            there and on σ_i = i^-0.5, i^-1, i^-2 (docs/bases.md). The sketch and the Rayleigh–Ritz step's
            Y = G Z stay in float32. The projector passes bfloat16 at warm refreshes of a matrix whose
            projection GEMMs run in bfloat16.
        solve_dtype: the dtype of the k x k Rayleigh–Ritz eigensolver (float64 on failure; see
            :func:`~gradproj.projectors.linalg.top_eigenvectors`). Its rounding moves a Ritz vector by about
            eps·σ_1²/gap, which costs at most about k·eps·σ_1² of captured energy: below 2e-5 of it in float32
            for k <= 300, and measured ≤ 1e-6 against float64 (docs/bases.md).

    Returns:
        ``(U, Vh)``: U m x rank (or None), Vh rank x n, float32, rows of Vh (and columns of U) in canonical
        signs (largest-magnitude entry positive).
    """
    A = in_safe_range(G)  # rescaled (exactly) where YᵀY could overflow or underflow
    m, n = A.shape
    k = min(rank + oversample, m, n)
    low = None if power_dtype is None else low_copy(A, power_dtype)  # G in the power iteration's first GEMM
    if start is not None and start.shape[1] < k:
        fresh = A.t() @ torch.randn(m, k - start.shape[1], generator=generator, device=A.device)
        if power_iters > 0:  # only the span reaches the next QR: block Gram–Schmidt keeps it, at a fraction of the cost
            Z = extend_orthonormal(start, fresh)
        else:  # Z is the final basis's factor: orthonormal to the QR's precision, whatever start's rounding
            Z = orthonormalize(torch.cat([start.float(), fresh], dim=1))
    elif start is not None:
        Z = orthonormalize(start[:, :k].float())
    else:
        Z = orthonormalize(A.t() @ torch.randn(m, k, generator=generator, device=A.device))
    for _ in range(power_iters):
        AZ = A @ Z if low is None else (low @ Z.to(low.dtype)).float()
        Z = orthonormalize(A.t() @ AZ)
    del low
    Y = A @ Z
    _, W = top_eigenvectors(Y.t() @ Y, rank, solve_dtype)
    # Vh = (Z W)ᵀ, rank x n, orthonormal rows, formed row-major: the sign search then runs along rows and no
    # transposed copy is made
    Vh = W.t() @ Z.t()
    idx = Vh.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(Vh.gather(1, idx))
    signs[signs == 0] = 1
    Vh = Vh * signs
    U = orthonormalize(Y @ (W * signs.t())) if left else None  # A V = U S: QR with R >= 0 pairs U with V
    return U, Vh


class RandomizedSVDProjector(Projector):
    """Top-``rank`` singular vectors by randomized subspace iteration; same sides and keys as ``svd``.

    Group options: ``rsvd_oversample`` (p, extra sketch vectors, default 8), ``rsvd_power_iters`` (q,
    default 1), ``rsvd_warm_start`` (start from the previous basis, default True) and ``proj_seed``
    (default 0). The sketch's Gaussian matrix comes from a generator seeded by the parameter's seed and the
    step (see :mod:`gradproj.projectors.seeding`), never from the global RNG.
    """

    name = "randomized_svd"
    reusable = True
    orthonormal = True  # an isometry whose adjoint is down(): Fira's factored path applies
    options = (
        Option(
            "rsvd_oversample",
            8,
            "extra random directions beyond the rank (8 to 16 is typical)",
            number(integer=True, minimum=0),
        ),
        Option("rsvd_power_iters", 1, "power iterations (1 is usually enough)", number(integer=True, minimum=0)),
        Option("rsvd_warm_start", True, "start each refresh from the previous basis", boolean),
        seeding.SEED_OPTION,
        *lazy.OPTIONS,
        BASIS_BITS_OPTION,
    )

    def state_layout(self):
        return {**super().state_layout(), seeding.SEED_KEY: scalar_int()}

    def compute_basis(self, G, state, step):
        g = self.group
        seed = seeding.parameter_seed(state, g, self.param_index)
        warm = g["rsvd_warm_start"] and self.has_basis(state)
        # orient G so that the basis we keep is its right singular vectors (free from the iteration); a warm
        # start is the previous basis of that side as columns
        A = G.t() if self.side == "left" else G
        start = None
        if warm and self.side == "left":
            start = self.basis_tensor(state, "proj")  # m x r (dequantized if stored quantized)
        elif warm:
            start = self.basis_tensor(state, "proj" if self.side == "right" else "proj_right").t()  # n x r
        # a warm refresh's G Z in bfloat16 where the matrix's projection GEMMs run in it: proj_dtype="auto"'s
        # decision, measured on this machine for G times its basis (a GEMM of nearly the same width), or an explicit
        # "bfloat16", so that "auto" runs exactly the path it chose (it decides after the first, cold, refresh:
        # hence warm refreshes only). Never float16: G's range need not fit it
        low = warm and self.gemm_dtype_for(state) == torch.bfloat16
        try:
            U, Vh = randomized_svd(
                A,
                self.rank,
                oversample=g["rsvd_oversample"],
                power_iters=g["rsvd_power_iters"],
                generator=seeding.generator(seed, step, G.device),
                start=start,
                left=self.side == "full",
                power_dtype=torch.bfloat16 if low else None,
            )
        except torch.linalg.LinAlgError as err:
            return self.decomposition_failed("randomized SVD", err, state, step)
        dtype = G.dtype
        if self.side == "right":
            return {"proj": Vh.to(dtype)}
        if self.side == "left":
            return {"proj": Vh.t().to(dtype).contiguous()}
        assert U is not None  # randomized_svd returns U when asked for the left side (full)
        return {"proj_left": U.to(dtype).contiguous(), "proj_right": Vh.to(dtype)}
