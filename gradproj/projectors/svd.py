"""Exact SVD basis — GaLore's (docs/algorithms.md, GaLore).

With ``refresh_stagger=False`` it reproduces galore-torch's bases and refresh steps bit for bit (the parity
tests pin both); the default basis is ``randomized_svd`` with stagger, whose refresh is several times
cheaper and spread over the gap (docs/bases.md).
"""

from __future__ import annotations

import logging

import torch

from ..options import Option, choice
from . import lazy
from .base import Projector
from .quantized import BASIS_BITS_OPTION

log = logging.getLogger("gradproj")


def singular_triplets(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` of the thin SVD of ``G`` in float32 (S descending), retried in float64 if LAPACK/cuSOLVER
    fails to converge.

    Raises ``torch.linalg.LinAlgError`` only if both attempts fail.
    """
    try:
        return torch.linalg.svd(G.float(), full_matrices=False)
    except torch.linalg.LinAlgError:
        log.warning("gradproj: float32 SVD of a %dx%d gradient did not converge; retrying in float64", *G.shape)
        U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        return U.float(), S.float(), Vh.float()


def top_singular_vectors(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U, Vh`` of :func:`singular_triplets` (the singular values dropped)."""
    U, _, Vh = singular_triplets(G)
    return U, Vh


class SVDProjector(Projector):
    """``U, S, Vh = svd(G.float())``; keep the top ``rank`` singular vectors of the chosen side, cast to the
    parameter dtype. Refreshed when ``t % update_proj_gap == 0`` (t before its increment)."""

    name = "svd"
    orthonormal = True
    reusable = True
    options = (
        Option(
            "sharded_refresh",
            "gram",
            "FSDP2 only: refresh a right projection from the all-reduced Gram matrix "
            "(`'gram'`) or the gathered gradient (`'gather'`)",
            choice("gram", "gather"),
        ),
        *lazy.OPTIONS,
        BASIS_BITS_OPTION,
    )

    def compute_basis(self, G, state, step):
        try:
            U, Vh = top_singular_vectors(G)
        except torch.linalg.LinAlgError as err:
            return self.decomposition_failed("SVD", err, state, step)
        r, dtype = self.rank, G.dtype
        if self.side == "right":
            return {"proj": Vh[:r].to(dtype).contiguous()}
        if self.side == "left":
            return {"proj": U[:, :r].to(dtype).contiguous()}
        return {"proj_left": U[:, :r].to(dtype).contiguous(), "proj_right": Vh[:r].to(dtype).contiguous()}
