"""Exact top-r subspace from the eigendecomposition of the Gram matrix (GGᵀ or GᵀG), ``projector="eigh"``.

The top-r eigenvectors of GᵀG are the top-r right singular vectors of G (and those of GGᵀ the left ones),
so this spans the same subspace as the SVD — to float accuracy of the leading vectors — for the price of
one GEMM and a symmetric eigensolver of size min(m, n) (for the standard side choice), several times
cheaper than LAPACK's SVD. Signs differ from the SVD's (eigh fixes none; gradproj makes them canonical),
and Adam is not rotation invariant, so only ``svd`` reproduces galore-torch's steps. The default basis is
``randomized_svd``, whose refresh measured cheaper still (docs/bases.md).

:func:`gram_bases` also serves a sharded refresh: the Gram matrix of a row-sharded G is the sum of the
shards' Gram matrices, so ranks can all-reduce it and call :func:`gradproj.projectors.linalg.top_eigenvectors`.
"""

from __future__ import annotations

import torch

from . import lazy
from .base import Projector
from .linalg import orthonormalize, top_eigenvectors, unit_scaled
from .quantized import BASIS_BITS_OPTION


def gram_bases(
    G: torch.Tensor, rank: int, left: bool, right: bool, solve_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Top-``rank`` singular vectors of G from a Gram matrix, float32: ``(U m x r or None, Vh r x n or None)``.

    One side: the eigenvectors of that side's Gram matrix. Both sides: the smaller Gram matrix gives one
    side, the other is orth(G V) (or orth(Gᵀ U)) with signs paired as in the SVD (G V = U S). G is rescaled
    first (:func:`~gradproj.projectors.linalg.unit_scaled`), so a large finite gradient cannot overflow the
    Gram matrix. ``solve_dtype``: the eigensolver's dtype (:func:`~gradproj.projectors.linalg.top_eigenvectors`).
    """
    A = unit_scaled(G)
    m, n = A.shape
    if right and (not left or n <= m):
        _, V = top_eigenvectors(A.t() @ A, rank, solve_dtype)
        U = orthonormalize(A @ V) if left else None
        return U, V.t().contiguous()
    _, U = top_eigenvectors(A @ A.t(), rank, solve_dtype)
    Vh = orthonormalize(A.t() @ U).t().contiguous() if right else None
    return U, Vh


class EighProjector(Projector):
    """The exact top-``rank`` singular subspace via ``torch.linalg.eigh`` of the Gram matrix; same sides and
    state keys as ``svd``. Options: the refresh schedule (``refresh``, :mod:`gradproj.projectors.lazy`) and
    ``basis_bits`` (quantized storage, :mod:`gradproj.projectors.quantized`)."""

    name = "eigh"
    reusable = True
    orthonormal = True  # an isometry whose adjoint is down(): Fira's factored path applies
    options = (*lazy.OPTIONS, BASIS_BITS_OPTION)
    #: the eigensolver's dtype (None: float64 up to 1024 x 1024, see ``top_eigenvectors``); a subclass may
    #: set float32, which benchmarks/refresh_stall.py and benchmarks/bases.py measure as ``eigh_fp32``
    solve_dtype: torch.dtype | None = None

    def compute_basis(self, G, state, step):
        left, right = self.side in ("left", "full"), self.side in ("right", "full")
        try:
            U, Vh = gram_bases(G, self.rank, left=left, right=right, solve_dtype=self.solve_dtype)
        except torch.linalg.LinAlgError as err:
            return self.decomposition_failed("eigendecomposition of the Gram matrix", err, state, step)
        dtype = G.dtype
        if self.side == "right":
            assert Vh is not None  # gram_bases returns the sides it was asked for
            return {"proj": Vh.to(dtype)}
        assert U is not None
        if self.side == "left":
            return {"proj": U.to(dtype).contiguous()}
        assert Vh is not None
        return {"proj_left": U.to(dtype).contiguous(), "proj_right": Vh.to(dtype)}
