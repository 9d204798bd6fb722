"""The kernel operations the optimizer core calls, as one ``typing.Protocol``.

The readable core (inner rules, residual rules, the limiter, the outer step) never imports a backend: it
calls every fused or distribution-sensitive operation through ``ctx.ops`` (the object
:func:`gradproj.kernels.resolve` returns, wrapped by :class:`gradproj.optimizers.sharding.ShardedOps` for
an FSDP2 parameter). :class:`KernelOps` lists all of them; :data:`OPS` is their names. The torch reference
(:mod:`gradproj.kernels.reference`), the Triton module (:mod:`gradproj.kernels.triton_ops`) and
``ShardedOps`` each provide every one with these parameters (tests/test_kernel_protocol.py checks names,
order, kinds and defaults), so an operation added to one and not the others fails the tests.

Tensors come in two layouts, which matters only to the sharded wrapper: *full-size* tensors have the
parameter's (2-D) shape (G, W, a dense S; under FSDP2 this rank's rows of it), *low-rank* tensors are
shaped like R (R, ψ, the moments; under FSDP2 split by rows, by columns or replicated, as R is). An
operation's doc says which it takes. Reductions over a whole full-size matrix, or over its rows, combine
the ranks' partial results under FSDP2; elementwise operations and reductions within a row do not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeAlias, runtime_checkable

import torch

if TYPE_CHECKING:
    from ..projectors.base import Projector
    from .reference import ScaledResidual

    ResidualTerm: TypeAlias = torch.Tensor | ScaledResidual


@runtime_checkable
class KernelOps(Protocol):
    """Every operation the optimizer core calls through ``ctx.ops`` (see the module doc for the layouts)."""

    def accumulation_dtype(self, t: torch.Tensor) -> torch.dtype:
        """float32 for half-precision tensors, the tensor's own dtype otherwise: the dtype sums are taken in."""

    def safe_norm(
        self,
        x: torch.Tensor,
        dim: int | None = None,
        keepdim: bool = False,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Overflow-safe Euclidean norm of a full-size ``x``, whole or along ``dim``, in ``dtype`` (default:
        accumulation)."""

    def axis_norms(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """Overflow-safe norms of the rows (``axis=1``) or columns (``axis=0``) of a full-size 2-D ``x``, kept
        along ``axis``."""

    def low_rank_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Overflow-safe Euclidean norm (0-dim, accumulation dtype) of a whole low-rank tensor shaped like R."""

    def adam_update(
        self,
        R: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        beta1: float,
        beta2: float,
        eps: float,
    ) -> torch.Tensor:
        """Adam's moments updated in place from the low-rank R; returns ψ = m / (√v + eps), no bias correction."""

    def fira_residual(
        self,
        G: torch.Tensor,
        R: torch.Tensor,
        psi: torch.Tensor,
        projector: Projector,
        state: dict,
        alpha: float,
    ) -> ResidualTerm:
        """Fira's residual S = (G − α·B(R)) · φ with B(R) from ``projector`` (dense or factored S)."""

    def fira_scaled_residual(
        self,
        G: torch.Tensor,
        BR: torch.Tensor,
        psi: torch.Tensor,
        R: torch.Tensor,
        alpha: float,
        rank_axis: int,
    ) -> ResidualTerm:
        """Fira's residual S = (G − α·BR) · φ with φ = ‖ψ‖ / (‖R‖ + 1e-8) along ``rank_axis`` of R, given BR = B(R)."""

    def fira_residual_factors(
        self,
        G: torch.Tensor,
        R: torch.Tensor,
        psi: torch.Tensor,
        alpha: float,
        rank_axis: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fira's (φ, ‖(G − α·B(R)) · φ‖) for an orthonormal basis, without forming S; φ is laid out along G."""

    def norm_growth_divisor(self, norm: torch.Tensor, state: dict, key: str, gamma: float) -> torch.Tensor | None:
        """The limiter's divisor k for the (whole-matrix) ``norm``, updating ``state[key]``; None on the first step."""

    def limit_norm_growth_(self, S: ResidualTerm, state: dict, key: str, gamma: float) -> ResidualTerm:
        """The limiter applied to the full-size S: S / k with k from the norm of the whole S."""

    def apply_update(
        self,
        W: torch.Tensor,
        projector: Projector,
        state: dict,
        U: torch.Tensor,
        S: ResidualTerm | None,
        step_size: float,
        scale: float,
        lr: float,
        weight_decay: float,
        seed: int | None = None,
        residual_step: float | None = None,
    ) -> None:
        """The weight update in place: W −= step_size·scale·B(U) + s_res·S, then the decoupled decay."""

    def apply_weight_decay_(self, W: torch.Tensor, lr: float, weight_decay: float) -> None:
        """Decoupled weight decay in place: W −= lr · weight_decay · W."""


#: the names of the operations, in the order :class:`KernelOps` declares them
OPS: tuple[str, ...] = tuple(
    name for name, value in vars(KernelOps).items() if callable(value) and not name.startswith("_")
)

__all__ = ["OPS", "KernelOps"]
