"""Small dense linear-algebra pieces shared by the bases: orthonormalisation, canonical signs, Ritz steps."""

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


def top_eigenvectors(C: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``r`` leading eigenpairs of a symmetric PSD matrix ``C`` (k x k), largest first, as
    ``(values, vectors)`` with the vectors as columns in canonical signs. Solved in float64 when C is small
    (cheap, and the squared singular values of a Gram matrix span a wide range); falls back to float64 when
    a float32 solve fails to converge."""
    k = C.shape[0]
    work = C.double() if k <= 1024 else C
    try:
        values, vectors = torch.linalg.eigh(work)
    except torch.linalg.LinAlgError:
        values, vectors = torch.linalg.eigh(C.double())
    values = values.flip(0)[:r].to(C.dtype)
    vectors = vectors.flip(1)[:, :r].to(C.dtype).contiguous()
    return values, canonical_signs_(vectors, dim=0)
