"""DTensor (FSDP2) parameters: each rank steps its own rows of every matrix.

FSDP2 (``torch.distributed.fsdp.fully_shard``) stores every parameter and its gradient as a DTensor
sharded on dim 0 (``Shard(0)``): rank j holds rows ``[o_j, o_j + m_j)`` of W and of G. A gradproj step
then runs on the local rows, with the few collectives the math needs (W is m x n, r the rank, k ranks)::

    side          basis P                R and the moments      per step                     per refresh
    right (m>=n)  r x n, replicated      m x r, Shard(0)        nothing                      all-reduce GᵀG (n x n fp32)
    left  (m<n)   m x r, Shard(0)        r x n, Shard(1)        reduce-scatter R, gather ψ   all-gather G (m x n)
    full          Shard(0) + replicated  r x r, replicated      all-reduce R (r x r)         all-gather G (m x n)
    unprojected   -                      like W, Shard(0)       nothing                      -

A left projection's R = Pᵀ G = Σ_j P_jᵀ G_j sums the ranks' partial products; a reduce-scatter leaves
each rank the sum for its block of R's columns, the inner rule runs on that block, and one all-gather of
the result ψ (r x n) feeds the back-projection P_j ψ of the local rows. Reduce-scatter plus all-gather
move the bytes of one all-reduce, and the moments of a left projection are split k ways. Reductions over
the whole matrix (Fira's residual norm, the ``norm_growth_limit`` norm, a left projection's column norms of
G) gather the ranks' partial norms (:class:`ShardedOps`): per step one float per rank, and for Fira's
factored path on a left projection the n column norms of G, R and ψ. Everything else (Adam, Fira's
scaling, the back-projection, weight decay) is local.

The refresh of a right projection never gathers G: its basis is the top-r eigenvectors of the Gram
matrix GᵀG = Σ_j G_jᵀ G_j, which every rank sums with one all-reduce of n x n float32 values and
decomposes itself (``torch.linalg.eigh``). The eigenvectors span the same subspace as the right singular
vectors of ``torch.linalg.svd(G)`` but may differ in sign (and by a rotation inside a degenerate
eigenspace). Set the group key ``sharded_refresh="gather"`` to all-gather G and run the projector's own
``compute_basis`` on it instead, which reproduces the single-process run to float tolerance. Left and
full projections, and every projector other than ``"svd"``, always use the gather path (a Gram matrix
cannot give the row-sharded U without the n x n all-reduce, which costs more than gathering the m x n
gradient when m < n).

Replicated tensors (bases of right projections, R of full projections, the limiter norms) are computed
by every rank from the same all-reduced or all-gathered values, so they are bitwise identical across
ranks. A projector that draws random numbers must do so from a seed stored in the optimizer state or
group (the same on every rank), never from the process's global RNG.
:func:`gradproj.distributed.replicated_state_mismatches` verifies it.

State layout. The state of a sharded parameter holds DTensors, so it saves and loads with
``torch.distributed.checkpoint``: the inner rule's tensors (``InnerRule.state_keys``) are laid out like R
(``Shard(0)``, ``Shard(1)`` or replicated, as above); the bases ``proj`` / ``proj_left`` of left and full
projections are ``Shard(0)``; every other tensor is replicated.

Inner rules declare in ``InnerRule.shardable`` along which axes of R they can run on a block:
``"rows"`` (the update of a row reads only that row, and every state tensor has R's rows as dim 0) and
``"cols"`` (the same for columns and dim 1). Adam declares both. Right projections and unprojected
parameters need ``"rows"``; a left projection without ``"cols"`` falls back to a replicated R (an
all-reduce of r x n per step, moments replicated).
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist

from ..kernels import reference
from ..projectors.base import Projector
from ..projectors.linalg import finite_flag, power_of_two_scale
from ..projectors.svd import SVDProjector

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

log = logging.getLogger("gradproj")


def _dtensor_api():
    """``(DTensor, Replicate, Shard)``, imported on first use (the import costs ~0.5 s, and only a process
    that already made a DTensor needs it)."""
    try:  # torch >= 2.5
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import DTensor, Replicate, Shard
    return DTensor, Replicate, Shard


#: group key choosing how a sharded parameter's basis is refreshed
SHARDED_REFRESH = ("gram", "gather")
#: basis keys that hold dense matrices with the parameter's rows (sliced by rows for left / full sides)
ROW_BASIS_KEYS = ("proj", "proj_left")
DENSE_BASIS_KEYS = ("proj", "proj_left", "proj_right")


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    """True for a DTensor (checked without importing the DTensor package when no DTensor can exist)."""
    if not isinstance(t, torch.Tensor) or type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return False
    mod = sys.modules.get("torch.distributed.tensor") or sys.modules.get("torch.distributed._tensor")
    return mod is not None and isinstance(t, _dtensor_api()[0])


def all_finite(t: torch.Tensor) -> bool:
    """True when every element of ``t`` is finite; for a DTensor, on every rank (one all-reduce)."""
    if not is_dtensor(t):
        return bool(finite_flag(t))
    flag = finite_flag(t.to_local()).to(torch.int32).reshape(1)
    for dim in range(t.device_mesh.ndim):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=t.device_mesh.get_group(dim))
    return bool(flag.item())


class RowSharding:
    """Which rows of a DTensor parameter this rank holds, and the process group that holds the others.

    Accepts the layouts of FSDP2 and HSDP: on every mesh dimension ``Replicate()``, on at most one
    ``Shard(0)`` (rows split as ``torch.chunk`` does). Anything else raises ``ValueError``.
    """

    def __init__(self, p: DTensor, where: str = "a parameter"):
        _, Replicate, Shard = _dtensor_api()
        mesh, placements = p.device_mesh, tuple(p.placements)
        shard_dims = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
        bad = [  # Shard comes from _dtensor_api(), so mypy cannot narrow pl to it
            pl
            for pl in placements
            if not isinstance(pl, Replicate) and not (type(pl) is Shard and pl.dim == 0)  # type: ignore[attr-defined]
        ]
        if bad or len(shard_dims) > 1:
            raise ValueError(
                f"{where} (shape {tuple(p.shape)}) is a DTensor with placements {placements}; gradproj supports "
                "Shard(0) on one mesh dimension and Replicate() on the others (FSDP2 / HSDP). Shard the "
                "parameter on dim 0 (fully_shard's default), or step it with a torch.optim optimizer."
            )
        self.mesh, self.placements = mesh, placements
        self.global_rows = p.shape[0] if p.dim() else 1
        self.rows = p.to_local().shape[0] if p.dim() else 1
        if shard_dims:
            d = shard_dims[0]
            self.group: dist.ProcessGroup | None = mesh.get_group(d)
            self.world = mesh.size(d)
            self.index = mesh.get_local_rank(d)
        else:
            self.group, self.world, self.index = None, 1, 0
        self.chunk, self.offset, size = _split(self.global_rows, self.world, self.index)
        if self.rows != size:
            raise ValueError(
                f"{where}: local shard of {self.rows} rows does not follow torch.chunk's split of "
                f"{self.global_rows} rows over {self.world} ranks; gradproj needs FSDP2's even split"
            )

    @property
    def sharded(self) -> bool:
        return self.group is not None

    # ------------------------------------------------------------------------------------ collectives
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.sharded:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The full matrix from every rank's rows of a tensor split like the parameter."""
        return all_gather_rows(local, self.global_rows, self.group) if self.sharded else local

    def all_gather_cols(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """The full matrix from every rank's block of columns (``total`` columns in all)."""
        return all_gather_rows(local.t(), total, self.group).t() if self.sharded else local

    # ---------------------------------------------------------------------------------------- layouts
    def row_dtensor(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` (this rank's rows of a tensor split like the parameter) as a DTensor."""
        shape = (self.global_rows, *local.shape[1:])
        stride = _contiguous_stride(shape)
        return _dtensor_api()[0].from_local(
            local, self.mesh, self.placements, run_check=False, shape=shape, stride=stride
        )

    def col_dtensor(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """``local`` (this rank's block of columns of a 2-D tensor with ``total`` columns) as a DTensor."""
        DTensor, Replicate, Shard = _dtensor_api()
        placements = [Replicate() if isinstance(pl, Replicate) else Shard(1) for pl in self.placements]
        shape = (local.shape[0], total)
        return DTensor.from_local(
            local, self.mesh, placements, run_check=False, shape=shape, stride=_contiguous_stride(shape)
        )

    def replicated_dtensor(self, local: torch.Tensor) -> torch.Tensor:
        DTensor, Replicate, _ = _dtensor_api()
        placements = [Replicate()] * self.mesh.ndim
        return DTensor.from_local(
            local, self.mesh, placements, run_check=False, shape=local.shape, stride=local.stride()
        )


def _split(total: int, world: int, index: int) -> tuple[int, int, int]:
    """``(chunk, offset, size)`` of block ``index`` when ``total`` rows are split as ``torch.chunk`` does."""
    chunk = math.ceil(total / world) if world > 1 else total
    offset = min(index * chunk, total)
    return chunk, offset, max(0, min(chunk, total - offset))


def all_gather_rows(local: torch.Tensor, total: int, group: Any) -> torch.Tensor:
    """The whole tensor (``total`` rows) from every rank's block of rows (padded to one chunk for the collective)."""
    world, index = dist.get_world_size(group), dist.get_rank(group)
    chunk = _split(total, world, index)[0]
    pad = local.new_zeros((chunk, *local.shape[1:]))
    pad[: local.shape[0]].copy_(local)
    out = local.new_empty((world * chunk, *local.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, pad, group=group)
    return torch.cat([out[i * chunk : i * chunk + _split(total, world, i)[2]] for i in range(world)])


def reduce_scatter_rows(full: torch.Tensor, group: Any) -> torch.Tensor:
    """This rank's block of rows of the sum over ranks of ``full`` (padded to whole chunks for the collective)."""
    world, index = dist.get_world_size(group), dist.get_rank(group)
    total = full.shape[0]
    chunk, _, size = _split(total, world, index)
    pad = full.new_zeros((world * chunk, *full.shape[1:]))
    pad[:total].copy_(full)
    out = full.new_empty((chunk, *full.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.13
    scatter(out, pad, group=group)
    return out[:size]


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


# ---------------------------------------------------------------------------------------------- bases
def gram_top_eigenvectors(A: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` eigenvectors of the symmetric matrix ``A`` as rows (rank x n), largest first.

    For A = GᵀG these span the top right singular subspace of G, i.e. what ``svd(G).Vh[:rank]`` spans.
    Raises ``torch.linalg.LinAlgError`` only if float32 and float64 both fail.
    """
    try:
        _, vecs = torch.linalg.eigh(A.float())
    except torch.linalg.LinAlgError:
        log.warning("gradproj: float32 eigh of a %dx%d Gram matrix did not converge; retrying in float64", *A.shape)
        _, vecs = torch.linalg.eigh(A.double())
        vecs = vecs.float()
    return vecs[:, -rank:].flip(-1).t()


class ShardedProjector(Projector):
    """Wraps the group's projector for a row-sharded parameter: same bases and math, local rows in and out.

    ``down`` of a left projection reduce-scatters the ranks' partial products over R's columns (or
    all-reduces them, when ``split_cols`` is False), of a full one all-reduces them; ``up`` / ``add_up_``
    of a column-split R gather it first. ``refresh`` computes the basis from the Gram matrix (right side
    of ``"svd"``) or from the gathered gradient (everything else).
    """

    def __init__(self, base: Projector, rows: RowSharding, method: str, split_cols: bool):
        self.base, self.rows, self.method = base, rows, method
        self.split_cols = split_cols and base.side == "left" and rows.sharded
        # the wrapped projector's class attributes, per instance (mypy: ClassVars set through self)
        self.name = base.name  # type: ignore[misc]
        self.m, self.n, self.rank, self.side = base.m, base.n, base.rank, base.side
        self.update_proj_gap, self.group = base.update_proj_gap, base.group
        self.refreshes = base.refreshes  # type: ignore[misc]
        self.dense_basis = base.dense_basis  # type: ignore[misc]  # proj_dtype="auto" records as unsharded
        self.stagger = base.stagger  # refresh_stagger: the offset is stored by the engine (projectors.schedule)

    # shapes and schedule: the wrapped projector's, with this rank's rows
    def low_rank_shape(self) -> tuple[int, int]:
        if self.side == "right":
            return (self.rows.rows, self.rank)
        if self.split_cols:
            return (self.rank, _split(self.n, self.rows.world, self.rows.index)[2])
        return self.base.low_rank_shape()

    def rank_axis(self) -> int:
        return self.base.rank_axis()

    # the wrapped basis's: the fast paths of Fira and the limiter run sharded (a read-only property over
    # Projector's class attribute)
    @property
    def orthonormal(self) -> bool:  # type: ignore[override]
        return self.base.orthonormal

    def low_rank_factors(self, phi: torch.Tensor) -> torch.Tensor:
        """This rank's block of a left projection's per-column factors when R is split by columns."""
        if not self.split_cols:
            return phi
        _, offset, size = _split(self.n, self.rows.world, self.rows.index)
        return phi.narrow(-1, offset, size)

    def has_basis(self, state: dict) -> bool:
        return self.base.has_basis(state)

    def needs_refresh(self, state: dict, step: int) -> bool:
        return self.base.needs_refresh(state, step)

    # ----------------------------------------------------------------------------------------- refresh
    def all_finite(self, G: torch.Tensor) -> bool:
        """Whether the whole gradient is finite, agreed on by every rank (one all-reduce, at refreshes only)."""
        flag = finite_flag(G).to(torch.int32).reshape(1)
        if self.rows.sharded:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.rows.group)
        return bool(flag.item())

    # --------------------------------------------------------------------------------- change of basis
    @property  # a read-only property over Projector's class attribute
    def basis_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.base.basis_keys

    def basis_matrices(self, state: dict) -> dict[str, torch.Tensor]:
        return self.base.basis_matrices(state)

    def basis_change(self, state: dict):
        """The wrapped projector's change of basis; row-sharded bases are gathered whole first."""
        if self.side == "right" or not self.rows.sharded:
            self.base.previous = self.previous
            return self.base.basis_change(state)

        def whole(st: dict) -> dict:
            return {k: (self.rows.all_gather_rows(v) if k in ROW_BASIS_KEYS else v) for k, v in st.items()}

        self.base.previous = whole(self.previous)  # type: ignore[arg-type]  # set by the refresh before any change
        return self.base.basis_change(whole(state))

    def uses_gram(self) -> bool:
        return self.method == "gram" and type(self.base) is SVDProjector and self.side == "right"

    def compute_basis(self, G, state, step):
        if self.uses_gram():
            # scaled by a power of two of the whole matrix's largest entry, agreed on by every rank, so a large
            # finite gradient does not overflow the Gram matrix (the eigenvectors do not change)
            amax = torch.linalg.vector_norm(G.float(), ord=float("inf")).reshape(1)
            if self.rows.sharded:
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.rows.group)
            A = G.float() / power_of_two_scale(amax)
            A = A.t() @ A
            self.rows.all_reduce_(A)
            try:
                return {"proj": gram_top_eigenvectors(A, self.rank).to(G.dtype).contiguous()}
            except torch.linalg.LinAlgError as err:
                return self.decomposition_failed("eigendecomposition of the Gram matrix", err, state, step)
        # gather path: the wrapped projector on the whole gradient (and, for sides with row-sharded bases,
        # on the whole previous basis, for projectors that warm-start from it)
        G_full = self.rows.all_gather_rows(G)
        if self.side == "right":
            return self.base.compute_basis(G_full, state, step)
        full_state = dict(state)
        for key in ROW_BASIS_KEYS:
            if key in state:
                full_state[key] = self.rows.all_gather_rows(state[key])
        bases = self.base.compute_basis(G_full, full_state, step)
        for key, value in full_state.items():  # what the projector wrote into the state (seeds, counters)
            if key not in ROW_BASIS_KEYS:
                state[key] = value
        if bases is None:
            return None
        unknown = sorted(set(bases) - set(DENSE_BASIS_KEYS))
        if unknown:
            raise ValueError(
                f"projector {self.name!r} keeps its {self.side} basis as {unknown}, which gradproj cannot split "
                "by rows for a sharded (FSDP) parameter; use a projector with dense bases (e.g. 'svd'), or "
                "proj_type='right' for this group"
            )
        lo, hi = self.rows.offset, self.rows.offset + self.rows.rows
        return {k: (v[lo:hi].contiguous() if k in ROW_BASIS_KEYS else v) for k, v in bases.items()}

    # ------------------------------------------------------------------------------------- projections
    def down(self, G: torch.Tensor, state: dict) -> torch.Tensor:
        if self.split_cols:  # this rank's columns of Σ_j P_jᵀ G_j, computed transposed (n x r rows)
            return reduce_scatter_rows(G.t() @ state["proj"], self.rows.group).t()
        R = self.base.down(G, state)
        if self.side == "right":
            return R
        return self.rows.all_reduce_(R.contiguous())  # Σ over ranks of Pᵢᵀ Gᵢ (r x n) or Pₗᵢᵀ Gᵢ Pᵣᵀ (r x r)

    def _whole(self, X: torch.Tensor) -> torch.Tensor:
        return self.rows.all_gather_cols(X, self.n) if self.split_cols else X

    def up(self, X: torch.Tensor, state: dict) -> torch.Tensor:
        return self.base.up(self._whole(X), state)

    def add_up_(self, W: torch.Tensor, X: torch.Tensor, state: dict, alpha: float) -> None:
        self.base.add_up_(W, self._whole(X), state, alpha)


# ------------------------------------------------------------------------------------- sharded kernels
def _all_gather_stacked(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's ``t`` (same shape on every rank), stacked along a new dim 0 in rank order."""
    world = dist.get_world_size(group)
    out = t.new_empty((world * max(t.numel(), 1),))
    src = t.reshape(-1) if t.numel() else t.new_zeros(1)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, src.contiguous(), group=group)
    return out.reshape((world, -1))[:, : t.numel()].reshape((world, *t.shape))


def norm_over_ranks(norms: torch.Tensor, group: Any) -> torch.Tensor:
    """The norm over ranks of each entry of ``norms`` (each rank's norm of its part): √Σⱼ nⱼ², overflow-safe.

    The ranks' norms are all-gathered (one float per entry and rank) and combined by
    :func:`~gradproj.kernels.reference.safe_norm` in rank order, so every rank gets the same bits (the limiter
    state it feeds is replicated) and no square overflows in float32 (an all-reduce of squares would)."""
    if group is None:
        return norms
    return reference.safe_norm(_all_gather_stacked(norms, group), 0)


class ShardedOps:
    """The kernel operations (:class:`~gradproj.kernels.protocol.KernelOps`) for a row-sharded parameter.

    Full-size tensors are this rank's rows of the matrix; low-rank ones this rank's part of R (its rows for a
    right projection or an unprojected parameter, a block of columns for a split left projection, all of it
    when R is replicated). Elementwise operations and reductions within a row delegate to ``ops``; reductions
    over rows (whole-matrix norms, column norms) combine the ranks' partial norms (:func:`norm_over_ranks`),
    and column factors of a column-split R are all-gathered. Every operation of the protocol is defined here
    (tests/test_kernel_protocol.py): a new one must be given its sharded form before FSDP2 can use it.
    """

    def __init__(self, ops: Any, group: Any, split_cols: int | None, low_rank_sharded: bool = True):
        self._ops, self._group, self._cols = ops, group, split_cols  # R's column count when R is column-split
        self._low_rank_group = group if low_rank_sharded else None  # None: R replicated, its norms are whole

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"kernel operation {name!r} has no sharded form; add it to gradproj.kernels.protocol.KernelOps and "
            "define it on gradproj.optimizers.sharding.ShardedOps (delegating if it works on any block of rows, "
            "else combining the ranks' partial results)"
        )

    # ---------------------------------------------------------------- elementwise / within a row: delegated
    def accumulation_dtype(self, t):
        return self._ops.accumulation_dtype(t)

    def adam_update(self, R, exp_avg, exp_avg_sq, beta1, beta2, eps):
        return self._ops.adam_update(R, exp_avg, exp_avg_sq, beta1, beta2, eps)

    def norm_growth_divisor(self, norm, state, key, gamma):
        """A scalar rule on the whole matrix's norm (already combined over ranks): the same on every rank."""
        return self._ops.norm_growth_divisor(norm, state, key, gamma)

    def apply_update(
        self, W, projector, state, U, S, step_size, scale, lr, weight_decay, seed=None, residual_step=None
    ):
        """Row-local (the sharded projector gathers a column-split U before its back-projection)."""
        self._ops.apply_update(
            W, projector, state, U, S, step_size, scale, lr, weight_decay, seed=seed, residual_step=residual_step
        )

    def apply_weight_decay_(self, W, lr, weight_decay):
        self._ops.apply_weight_decay_(W, lr, weight_decay)

    # ------------------------------------------------------------------------------- norms over the ranks
    def safe_norm(self, x, dim=None, keepdim=False, dtype=None):
        """The norm of the whole full-size matrix (``dim=None``) or of its columns (``dim=0``) combines the
        ranks' norms; a norm within each row (``dim=1``) is local."""
        n = self._ops.safe_norm(x, dim, keepdim, dtype)
        if dim is not None and dim % max(x.dim(), 1) != 0:
            return n
        return norm_over_ranks(n, self._group)

    def axis_norms(self, x, axis):
        """Row norms (``axis=1``) are local; column norms (``axis=0``) combine the ranks' rows."""
        n = self._ops.axis_norms(x, axis)
        return n if axis == 1 else norm_over_ranks(n, self._group)

    def low_rank_norm(self, x):
        """Combined over ranks when R is split (by rows or columns); R replicated is whole on every rank."""
        return norm_over_ranks(self._ops.low_rank_norm(x), self._low_rank_group)

    # ------------------------------------------------------------------------------------------------ Fira
    def _column_factors(self, x: torch.Tensor) -> torch.Tensor:
        """A per-column vector of R (1 x local columns) for all n columns: gathered when R is column-split."""
        return x if self._cols is None else all_gather_rows(x.t(), self._cols, self._group).t()

    def fira_residual(self, G, R, psi, projector, state, alpha):
        """Fira's scaled residual on this rank's rows (always the torch form: the limiter below needs S dense)."""
        return self.fira_scaled_residual(G, projector.up(R, state), psi, R, alpha, projector.rank_axis())

    def fira_scaled_residual(self, G, BR, psi, R, alpha, rank_axis):
        """Fira's scaling; for a column-split R, the per-column factors φ are gathered (n values)."""
        if self._cols is None:
            return reference.fira_scaled_residual(G, BR, psi, R, alpha, rank_axis)
        phi = reference.safe_norm(psi, 0, keepdim=True) / (reference.safe_norm(R, 0, keepdim=True).to(psi.dtype) + 1e-8)
        phi = self._column_factors(phi)
        S = G - alpha * BR.to(G.dtype)
        return S * phi.to(S.dtype)

    def fira_residual_factors(self, G, R, psi, alpha, rank_axis):
        """Fira's factored path on this rank's rows. A right projection's rows (of G, R and ψ) each live on one
        rank: the local factors are exact and only the norm of the residual combines over ranks (a float per
        rank). A left projection's factors are per column: the column norms of G combine over ranks and those
        of R and ψ are gathered when R is column-split (n values each); every rank then computes φ (all n
        columns, laid out along G) and the norm itself, from the same values."""
        if self._group is None:
            return self._ops.fira_residual_factors(G, R, psi, alpha, rank_axis)
        if rank_axis == 1:
            phi, norm = self._ops.fira_residual_factors(G, R, psi, alpha, rank_axis)
            return phi, norm_over_ranks(norm, self._group)
        acc = reference.accumulation_dtype(G)
        g_norm = self.axis_norms(G, 0).to(acc)
        r_norm, psi_norm = (self._column_factors(self._ops.axis_norms(x, 0).to(acc)) for x in (R, psi))
        phi, weighted = reference.fira_factors_from_norms(g_norm, r_norm, psi_norm, alpha)
        return phi, reference.safe_norm(weighted)

    def limit_norm_growth_(self, S, state, key, gamma):
        """Fira's limiter with the norm of the whole matrix: the ranks' norms of their rows of S combine
        (:func:`norm_over_ranks`), so a spike cannot overflow, and every rank divides by the same k."""
        dense = S.materialize() if isinstance(S, reference.ScaledResidual) else S
        k = self.norm_growth_divisor(self.safe_norm(dense), state, key, gamma)
        if k is None:
            return S
        if isinstance(S, reference.ScaledResidual):
            return S.divided(k)
        return S.div_(k.to(S.dtype))


@functools.cache
def _sharded_ops(ops: Any, group: Any, split_cols: int | None, low_rank_sharded: bool) -> ShardedOps:
    """One ShardedOps per (operations, process group, layout): stable objects, so a compiled step guards on
    them once."""
    return ShardedOps(ops, group, split_cols, low_rank_sharded)


# ------------------------------------------------------------------------------------- the step's glue
class ShardedStep:
    """Runs :meth:`ProjectedOptimizer._update` on this rank's rows and keeps the state as DTensors."""

    def __init__(self, rows: RowSharding, projector: Projector, inner_keys: tuple[str, ...], projected: bool):
        self.rows, self.projector, self.inner_keys = rows, projector, tuple(inner_keys)
        self.projected = projected
        # how R (and so the inner rule's state) is laid out: split by rows like W (right projections and
        # unprojected parameters), split by columns (left projections), or replicated
        if not projected or projector.side == "right":
            self.layout = "rows"
        else:
            # projected: shard_plan passes a ShardedProjector
            self.layout = "cols" if projector.split_cols else "replicated"  # type: ignore[attr-defined]

    def ops(self, ops: Any) -> ShardedOps:
        return _sharded_ops(
            ops, self.rows.group, self.projector.n if self.layout == "cols" else None, self.layout != "replicated"
        )

    def update(self, engine: Any, p: DTensor, grad: DTensor, group: dict, plan: Any) -> None:
        state = engine.optimizer.state[p]
        local: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not is_dtensor(value):
                raise ValueError(
                    f"the optimizer state {key!r} of a sharded parameter of shape {tuple(p.shape)} is a plain "
                    "tensor; load the optimizer state of FSDP models with torch.distributed.checkpoint.state_dict."
                    "set_optimizer_state_dict (or gradproj.distributed.load_checkpoint)"
                )
            local[key] = value.to_local() if is_dtensor(value) else value
        before = {k: v for k, v in local.items() if isinstance(v, torch.Tensor)}
        engine.update(p.to_local(), grad.to_local(), group, plan, local)
        for key in [k for k in state if k not in local]:
            del state[key]
        for key, value in local.items():
            if not isinstance(value, torch.Tensor):
                state[key] = value
            elif before.get(key) is not value:
                state[key] = self.to_dtensor(key, value, p)

    def to_dtensor(self, key: str, local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if not rows.sharded:
            return rows.replicated_dtensor(local)
        if key in self.inner_keys and self.layout != "replicated":
            axis = 0 if self.layout == "rows" else 1
            expected = self.projector.low_rank_shape()[axis] if self.projected else rows.rows
            if local.dim() <= axis or local.shape[axis] != expected:
                raise ValueError(
                    f"the inner rule's state {key!r} has shape {tuple(local.shape)}, but R of this sharded "
                    f"{tuple(p.shape)} parameter has {expected} local {self.layout} on dim {axis}; a rule that "
                    f"declares {self.layout!r} in InnerRule.shardable must keep its state split like R"
                )
            return rows.row_dtensor(local) if axis == 0 else rows.col_dtensor(local, self.projector.n)
        if key in ROW_BASIS_KEYS and self.projected and self.projector.side != "right":
            return rows.row_dtensor(local)
        return rows.replicated_dtensor(local)


def shard_plan(plan: Any, p: DTensor, group: dict, inner: Any, where: str) -> Any:
    """The plan of a DTensor parameter: local 2-D shape, the projector wrapped, the sharded step attached."""
    from dataclasses import replace

    rows = RowSharding(p, where)
    projected = plan.shape2d is not None
    shardable = getattr(inner, "shardable", ())
    if rows.sharded and (not projected or plan.projector.side == "right") and "rows" not in shardable:
        raise ValueError(
            f"{where} (shape {tuple(p.shape)}) is sharded by rows (FSDP) and its low-rank gradient would be "
            f"too, but the inner rule {type(inner).__name__} cannot run on a block of rows (InnerRule.shardable "
            f"= {shardable}); use DDP for this optimizer, or proj_type='left' / 'full' for this group"
        )
    projector = plan.projector
    if projected and getattr(projector, "lazy", False):
        raise ValueError(
            f"{where}: refresh='lazy' is not available for sharded (FSDP2) parameters, whose ranks would each "
            "judge their own rows of the basis; use refresh='fixed' for this group, or DDP"
        )
    if projected and group.get("basis_bits") is not None:
        raise ValueError(
            f"{where} (shape {tuple(p.shape)}) is a DTensor (FSDP2) parameter, whose basis gradproj splits by rows; "
            "a quantized basis (basis_bits) cannot be split that way: use basis_bits=None for this group, or DDP"
        )
    if projected:
        method = group.get("sharded_refresh", "gram")
        if method not in SHARDED_REFRESH:
            raise ValueError(f"{where}: sharded_refresh = {method!r}; use one of {', '.join(SHARDED_REFRESH)}")
        projector = ShardedProjector(plan.projector, rows, method, split_cols="cols" in shardable)
    local = p.to_local()
    shape2d = (local.shape[0], plan.shape2d[1]) if projected else None
    step = ShardedStep(rows, projector, getattr(inner, "state_keys", ()), projected)
    return replace(plan, shape2d=shape2d, projector=projector, shard=step)
