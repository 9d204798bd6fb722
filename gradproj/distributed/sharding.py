"""DTensor (FSDP2) parameters: each rank steps its own rows of every matrix.

FSDP2 (``torch.distributed.fsdp.fully_shard``) stores every parameter and its gradient as a DTensor
sharded on dim 0 (``Shard(0)``): rank j holds rows ``[o_j, o_j + m_j)`` of W and of G. A gradproj step
then runs on the local rows, with the few collectives the math needs (W is m x n, r the rank, k ranks,
b the bytes of one element)::

    side          basis P               R, moments              per step                 per refresh
    right (m>=n)  r x n, replicated     m x r, Shard(0)         nothing                  all-reduce of Σ Gᵢᵀ Gᵢ (n x n fp32)
    left  (m<n)   m x r, Shard(0)       r x n, replicated       all-reduce R (r x n)     all-gather G (m x n)
    full          Shard(0) / replicated r x r, replicated       all-reduce R (r x r)     all-gather G (m x n)
    unprojected   -                     like W, Shard(0)        nothing                  -

Fira adds one all-reduce of a float32 scalar per step (the norm of the limiter). Everything else (Adam,
Fira's scaling, the back-projection, weight decay) is row-local.

The refresh of a right projection never gathers G: its basis is the top-r eigenvectors of the Gram
matrix GᵀG = Σ Gᵢᵀ Gᵢ, which every rank sums with one all-reduce of n x n float32 values and
decomposes itself (``torch.linalg.eigh``). The eigenvectors span the same subspace as the right singular
vectors of ``torch.linalg.svd(G)`` but may differ in sign (and by a rotation inside a degenerate
eigenspace), so the trajectory equals the single-process one only up to those choices; set the group
key ``sharded_refresh="gather"`` to all-gather G and run the projector's own ``compute_basis`` on it,
which reproduces the single-process run to float tolerance. Left and full projections, and every
projector other than ``"svd"``, always use the gather path (the row-sharded U cannot be formed from a
Gram matrix without the n x n all-reduce, which costs more than gathering the m x n gradient when m < n).

Every rank computes replicated tensors (bases, R for left projections, Fira's limiter norm) from the same
all-reduced or all-gathered values, so they are bitwise identical across ranks. A projector that draws
random numbers must do so from a seed stored in the optimizer state or group (the same on every rank),
never from the process's global RNG. :func:`gradproj.distributed.check_replicated_state` verifies it.

State layout. The optimizer state of a sharded parameter holds DTensors, so it saves and loads with
``torch.distributed.checkpoint``: the inner rule's tensors (``InnerRule.state_keys``) are laid out like R;
the row-sharded bases ``proj`` / ``proj_left`` of left / full projections are ``Shard(0)``; every other
tensor is replicated.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from typing import Any

import torch
import torch.distributed as dist

from ..projectors.base import NonFiniteGradientError, Projector
from ..projectors.svd import SVDProjector

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


def is_dtensor(t: Any) -> bool:
    """True for a DTensor (checked without importing the DTensor package when no DTensor can exist)."""
    if not isinstance(t, torch.Tensor) or type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return False
    mod = sys.modules.get("torch.distributed.tensor") or sys.modules.get("torch.distributed._tensor")
    return mod is not None and isinstance(t, _dtensor_api()[0])


def all_finite(t: torch.Tensor) -> bool:
    """True when every element of ``t`` is finite; for a DTensor, on every rank (one all-reduce)."""
    if not is_dtensor(t):
        return bool(torch.isfinite(t).all())
    flag = torch.isfinite(t.to_local()).all().to(torch.int32).reshape(1)
    for dim in range(t.device_mesh.ndim):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=t.device_mesh.get_group(dim))
    return bool(flag.item())


class RowSharding:
    """Which rows of a DTensor parameter this rank holds, and the process group that holds the others.

    Accepts the layouts of FSDP2 and HSDP: on every mesh dimension ``Replicate()``, on at most one
    ``Shard(0)`` (rows split as ``torch.chunk`` does). Anything else raises ``ValueError``.
    """

    def __init__(self, p: torch.Tensor, where: str = "a parameter"):
        _, Replicate, Shard = _dtensor_api()
        mesh, placements = p.device_mesh, tuple(p.placements)
        shard_dims = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
        bad = [pl for pl in placements if not isinstance(pl, Replicate) and not (type(pl) is Shard and pl.dim == 0)]
        if bad or len(shard_dims) > 1:
            raise ValueError(
                f"{where} (shape {tuple(p.shape)}) is a DTensor with placements {placements}; gradproj supports "
                "Shard(0) on one mesh dimension and Replicate() on the others (FSDP2 / HSDP). Shard the "
                "parameter on dim 0 (fully_shard's default), or step it with a torch.optim optimizer."
            )
        self.mesh, self.placements = mesh, placements
        self.global_shape = tuple(p.shape)
        self.global_rows = p.shape[0] if p.dim() else 1
        self.rows = p.to_local().shape[0] if p.dim() else 1
        if shard_dims:
            d = shard_dims[0]
            self.group = mesh.get_group(d)
            self.world = mesh.size(d)
            self.index = mesh.get_local_rank(d)
        else:
            self.group, self.world, self.index = None, 1, 0
        self.chunk = math.ceil(self.global_rows / self.world) if self.world > 1 else self.global_rows
        self.offset = min(self.index * self.chunk, self.global_rows)
        if self.rows != max(0, min(self.chunk, self.global_rows - self.offset)):
            raise ValueError(
                f"{where}: local shard of {self.rows} rows does not follow torch.chunk's split of "
                f"{self.global_rows} rows over {self.world} ranks; gradproj needs FSDP2's even split"
            )

    @property
    def sharded(self) -> bool:
        return self.group is not None

    def rows_of(self, index: int) -> int:
        return max(0, min(self.chunk, self.global_rows - index * self.chunk))

    # ------------------------------------------------------------------------------------ collectives
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.sharded:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The full matrix from every rank's rows (rows padded to one chunk for the collective)."""
        if not self.sharded:
            return local
        pad = local.new_zeros((self.chunk,) + tuple(local.shape[1:]))
        pad[: local.shape[0]].copy_(local)
        out = local.new_empty((self.world * self.chunk,) + tuple(local.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, pad, group=self.group)
        parts = [out[i * self.chunk : i * self.chunk + self.rows_of(i)] for i in range(self.world)]
        return torch.cat(parts)

    # ---------------------------------------------------------------------------------------- layouts
    def row_dtensor(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` (this rank's rows of a tensor split like the parameter) as a DTensor."""
        shape = (self.global_rows,) + tuple(local.shape[1:])
        stride = _contiguous_stride(shape)
        return _dtensor_api()[0].from_local(local, self.mesh, self.placements, run_check=False, shape=shape, stride=stride)

    def replicated_dtensor(self, local: torch.Tensor) -> torch.Tensor:
        DTensor, Replicate, _ = _dtensor_api()
        placements = [Replicate()] * self.mesh.ndim
        return DTensor.from_local(local, self.mesh, placements, run_check=False,
                                  shape=local.shape, stride=local.stride())


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

    ``down`` of a left or full projection sums the ranks' partial products (one all-reduce of R);
    ``refresh`` computes the basis from the Gram matrix (right side of ``"svd"``) or from the gathered
    gradient (everything else). All other methods run the wrapped projector on the local rows.
    """

    def __init__(self, base: Projector, rows: RowSharding, method: str):
        self.base, self.rows, self.method = base, rows, method
        self.name = base.name
        self.m, self.n, self.rank, self.side = base.m, base.n, base.rank, base.side
        self.update_proj_gap, self.group = base.update_proj_gap, base.group
        self.refreshes = base.refreshes

    # shapes and schedule: the wrapped projector's, with this rank's rows
    def low_rank_shape(self) -> tuple[int, int]:
        return (self.rows.rows, self.rank) if self.side == "right" else self.base.low_rank_shape()

    def rank_axis(self) -> int:
        return self.base.rank_axis()

    def has_basis(self, state: dict) -> bool:
        return self.base.has_basis(state)

    def needs_refresh(self, state: dict, step: int) -> bool:
        return self.base.needs_refresh(state, step)

    # ----------------------------------------------------------------------------------------- refresh
    def all_finite(self, G: torch.Tensor) -> bool:
        """Whether the whole gradient is finite, agreed on by every rank (one all-reduce, at refreshes only)."""
        flag = torch.isfinite(G).all().to(torch.int32).reshape(1)
        if self.rows.sharded:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.rows.group)
        return bool(flag.item())

    def uses_gram(self) -> bool:
        return self.method == "gram" and type(self.base) is SVDProjector and self.side == "right"

    def compute_basis(self, G, state, step):
        if self.uses_gram():
            A = G.float().t() @ G.float()
            self.rows.all_reduce_(A)
            try:
                return {"proj": gram_top_eigenvectors(A, self.rank).to(G.dtype).contiguous()}
            except torch.linalg.LinAlgError as err:
                if self.has_basis(state):
                    log.warning("gradproj: eigh failed at step %d (%s); keeping the previous basis", step, err)
                    return None
                raise NonFiniteGradientError(
                    f"the eigendecomposition for a {self.m}x{self.n} gradient failed at its first refresh: {err}"
                ) from err
        # gather path: the wrapped projector on the whole gradient (and, for sides with row-sharded bases,
        # on the whole previous basis, for projectors that warm-start from it)
        full_state = dict(state)
        if self.side != "right":
            for key in ROW_BASIS_KEYS:
                if key in state:
                    full_state[key] = self.rows.all_gather_rows(state[key])
        bases = self.base.compute_basis(self.rows.all_gather_rows(G), full_state, step)
        if bases is None or self.side == "right":
            return bases
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
        R = self.base.down(G, state)
        if self.side == "right":
            return R
        return self.rows.all_reduce_(R.contiguous())  # Σ over ranks of Pᵢᵀ Gᵢ (r x n) or Pₗᵢᵀ Gᵢ Pᵣᵀ (r x r)

    def up(self, X: torch.Tensor, state: dict) -> torch.Tensor:
        return self.base.up(X, state)

    def add_up_(self, W: torch.Tensor, X: torch.Tensor, state: dict, alpha: float) -> None:
        self.base.add_up_(W, X, state, alpha)


# ------------------------------------------------------------------------------------- sharded kernels
class ShardedOps:
    """The kernel operations for a row-sharded parameter: row-local ones delegate to ``ops``; the ones that
    reduce over the whole matrix all-reduce their partial sums.

    An operation not listed here raises ``AttributeError``: a new fused operation must be classified
    (row-local, or given a sharded form below) before sharded parameters can use it.
    """

    #: operations whose result on a block of rows is that block of the whole result
    ROW_LOCAL = ("adam_update", "fira_scaled_residual", "apply_weight_decay_", "accumulation_dtype")

    def __init__(self, ops: Any, group: Any):
        self._ops, self._group = ops, group

    def __getattr__(self, name: str) -> Any:
        if name in ShardedOps.ROW_LOCAL:
            return getattr(self._ops, name)
        raise AttributeError(
            f"kernel operation {name!r} has no sharded form; add it to gradproj.distributed.sharding.ShardedOps "
            "(ROW_LOCAL if it works on any block of rows, else a method that all-reduces its partial sums)"
        )

    def limit_norm_growth_(self, S: torch.Tensor, state: dict, key: str, gamma: float) -> torch.Tensor:
        """Fira's limiter with the norm of the whole matrix (one all-reduce of a float32 scalar)."""
        acc = self._ops.accumulation_dtype(S)
        sq = torch.linalg.vector_norm(S, dtype=acc).square().reshape(1)
        if self._group is not None:
            dist.all_reduce(sq, group=self._group)
        norm = sq.sqrt().reshape(())
        prev = state.get(key)
        if prev is None:
            state[key] = norm
            return S
        k = torch.clamp(norm / (prev + 1e-8), min=gamma) / gamma
        S.div_(k.to(S.dtype))
        prev.copy_(norm / k)
        return S


@functools.lru_cache(maxsize=None)
def _sharded_ops(ops: Any, group: Any) -> ShardedOps:
    """One ShardedOps per (operations, process group): stable objects, so a compiled step guards on them once."""
    return ShardedOps(ops, group)


# ------------------------------------------------------------------------------------- the step's glue
class ShardedStep:
    """Runs :meth:`ProjectedOptimizer._update` on this rank's rows and keeps the state as DTensors."""

    def __init__(self, rows: RowSharding, projector: Projector, inner_keys: tuple[str, ...], projected: bool):
        self.rows, self.projector, self.inner_keys = rows, projector, tuple(inner_keys)
        self.projected = projected
        # R (and so the inner rule's state) is split by rows like W for right projections and unprojected
        # parameters, and replicated for left / full projections (R = Σ Pᵢᵀ Gᵢ)
        self.row_sharded_R = not projected or projector.side == "right"

    def ops(self, ops: Any) -> ShardedOps:
        return _sharded_ops(ops, self.rows.group)

    def update(self, optimizer: Any, p: torch.Tensor, grad: torch.Tensor, group: dict, plan: Any) -> None:
        state = optimizer.state[p]
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
        optimizer._update(p.to_local(), grad.to_local(), group, plan, local)
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
        if key in self.inner_keys:
            if not self.row_sharded_R:
                return rows.replicated_dtensor(local)
            if local.dim() == 0 or local.shape[0] != rows.rows:
                raise ValueError(
                    f"the inner rule's state {key!r} has shape {tuple(local.shape)}, not the {rows.rows} local rows "
                    f"of the low-rank gradient of a sharded {tuple(p.shape)} parameter; a row_separable inner rule "
                    "must keep its state shaped like R"
                )
            return rows.row_dtensor(local)
        if key in ROW_BASIS_KEYS and self.projected and self.projector.side != "right":
            return rows.row_dtensor(local)
        return rows.replicated_dtensor(local)


def shard_plan(plan: Any, p: torch.Tensor, group: dict, inner: Any, where: str) -> Any:
    """The plan of a DTensor parameter: local 2-D shape, the projector wrapped, the sharded step attached."""
    from dataclasses import replace

    rows = RowSharding(p, where)
    projected = plan.shape2d is not None
    row_sharded_R = not projected or plan.projector.side == "right"
    if rows.sharded and row_sharded_R and not getattr(inner, "row_separable", False):
        raise ValueError(
            f"{where} (shape {tuple(p.shape)}) is sharded by rows (FSDP) and its low-rank gradient would be "
            f"too, but the inner rule {type(inner).__name__} is not row_separable (its update of one row reads "
            "other rows); use DDP for this optimizer, or a left projection (proj_type='left') for this group"
        )
    projector = plan.projector
    if projected:
        method = group.get("sharded_refresh", "gram")
        if method not in SHARDED_REFRESH:
            raise ValueError(f"{where}: sharded_refresh = {method!r}; use one of {', '.join(SHARDED_REFRESH)}")
        projector = ShardedProjector(plan.projector, rows, method)
    local = p.to_local()
    shape2d = (local.shape[0], plan.shape2d[1]) if projected else None
    step = ShardedStep(rows, projector, getattr(inner, "state_keys", ()), projected)
    return replace(plan, shape2d=shape2d, projector=projector, shard=step)
