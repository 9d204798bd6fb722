"""``foreach``: the regular GaLore step of many matrices at once, in few kernel launches.

The per-parameter step (:meth:`ProjectedOptimizer._update`) issues about ten kernel launches per matrix
plus the Python around them. On a GPU a LLaMA-sized matrix needs some 20 µs of memory-bound work, far less
than that host overhead, so a whole-model step ends up bound by the host. With the optimizer option
``foreach`` the parameters for which a step is plain GaLore (below) are stepped together instead:

    R_i   = down(G_i)                        per matrix, or one torch.bmm per chunk of small matrices
    m_i, v_i ← Adam on R_i                   torch._foreach_* ops over the chunk
    U_i   = m_i / (√v_i + eps)                torch._foreach_* ops
    W_i  -= s_i · scale · B(U_i)             one addmm_ per matrix, or one baddbmm_ per chunk of small ones
    W_i  -= lr · wd · W_i                     torch._foreach_add_ over the chunk (Triton impl: in the GEMM)

with the same arithmetic, the same state keys and the same dtypes as the per-parameter path, so the state
dict is the same whichever path ran and a checkpoint resumes on either. What remains per matrix for large
matrices is two GEMM launches (the projections, which read and write the full-size tensors once, as the
per-parameter path does); on CUDA small matrices are stacked (copies of their gradients and weights, the
weights copied back after one ``baddbmm_``) because for them a launch costs more than the traffic it saves.
The moments are updated with the torch reference's multi-tensor ops in the state dtype
(:func:`gradproj.kernels.reference.adam_update`'s arithmetic) whatever the ``impl``: for float32 state
that is also the Triton kernel's arithmetic; for bfloat16 / float16 state each op rounds, where the
per-matrix kernel rounds once (float32 copies of every moment to round once measured slower on an H100
than the per-matrix path). The weight update follows the ``impl``: the reference's ``addmm_`` then decay,
or Triton's single GEMM with the decay folded in as ``beta = 1 − lr·wd``.

When it is used (``foreach=None``, the default: CUDA parameters, as torch.optim's default, and CPU buckets
for which it measured faster over their first regular steps, :func:`cpu_choice`; ``True``: always; ``False``:
never): for a parameter with a gradient, in a group without
``max_grad_norm``, ``norm_growth_limit``, ``compile`` or ``stochastic_rounding``, with residual ``none``,
the Adam inner rule (not 8-bit, not Adafactor), a non-tensor ``lr``, and a projector that keeps GaLore's
dense one-sided basis in state (``svd``, ``eigh``, ``randomized_svd``, or any registered projector that
does not override :class:`Projector`'s projections and refresh rule) with projections in the parameter's dtype
(``proj_dtype`` None, or ``"auto"`` where the matrix decided so), when the parameter is a contiguous
plain tensor (not a DTensor) projected on the left or right side, its gradient has its dtype and its state
holds a basis and moments of the expected shapes, and this step does not refresh the basis. Everything
else — Fira, FRUGAL, 1-D tensors, unprojected matrices, refresh steps — takes the per-parameter path for
that step, unchanged; a parameter rejoins the batched path at its next regular step.

Grouping and memory: eligible matrices are bucketed by (param group, device, shape, side, parameter
dtype, state dtype, kernels module, step size) and every bucket is cut into chunks whose transient
tensors (the low-rank R and U, and for stacked small matrices the stacked gradients and weights) stay below
:data:`CHUNK_BYTES`; a chunk holds at least one matrix. On CUDA, matrices with at most
:data:`BATCHED_GEMM_MAX_NUMEL` elements use the stacked (``torch.bmm``) projections; on the CPU every
matrix has its own GEMMs (:data:`BATCHED_GEMM_DEVICES`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import kernels
from ..inner.adam import Adam, bias_corrected_lr
from ..inner.adam import fused as fused_adam
from ..projectors import get_projector, schedule
from ..projectors.base import choose_side, dense_down, gemm_dtype
from ..projectors.lazy import GAP_KEY as LAZY_GAP
from ..residual import get_residual
from .sharding import is_dtensor

if TYPE_CHECKING:
    from ..kernels.protocol import KernelOps
    from .base import ProjectedOptimizer

#: upper bound on the transient bytes of one chunk (low-rank R and U; stacked gradients and weights for small
#: matrices on CUDA). A chunk holds at least one matrix, so a single larger matrix still runs (alone).
CHUNK_BYTES = 512 << 20
#: matrices with at most this many elements are projected with one torch.bmm per chunk (gradients stacked)
#: instead of one GEMM per matrix; above it the per-matrix GEMMs' memory traffic dominates their launches.
BATCHED_GEMM_MAX_NUMEL = 1 << 21
#: devices where small matrices take the stacked form. Not the CPU: there a launch is cheap and the fresh
#: stacked buffers (page faults on every allocation) cost more than the calls they save (docs/benchmarks.md).
BATCHED_GEMM_DEVICES = ("cuda",)


def _stacked(device: torch.device, numel: int, count: int) -> bool:
    return count > 1 and numel <= BATCHED_GEMM_MAX_NUMEL and device.type in BATCHED_GEMM_DEVICES


def check_option(value: object, where: str) -> None:
    """The ``foreach`` option must be None (auto), True or False."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(
            f"{where}: foreach = {value!r}; use None (batched step for CUDA parameters), True (always, also on "
            "the CPU) or False (never)"
        )


def _projector_is_dense(group: dict) -> bool:
    cls = get_projector(group["projector"])
    return cls.refreshes and cls.stores_dense(group)  # a quantized basis (basis_bits) is not dense


def _group_eligible(opt: ProjectedOptimizer, group: dict) -> bool:
    """Group-level conditions of the batched step (checked once per group and step)."""
    return (
        group["foreach"] is not False
        and opt.engine.inner(group).batched
        and group.get("rank") is not None
        and get_residual(group["residual"]).batched
        and group["norm_growth_limit"] is None
        and group["max_grad_norm"] is None
        and not group["compile"]
        and not group["stochastic_rounding"]
        and isinstance(group["lr"], (int, float))
        and group["proj_type"] != "full"
        and _projector_is_dense(group)
    )


@dataclass
class _Item:
    p: torch.Tensor
    grad: torch.Tensor
    state: dict


@dataclass
class _Bucket:
    group: dict
    shape2d: tuple[int, int]
    side: str
    ops: KernelOps
    step_size: float
    items: list[_Item] = field(default_factory=list)
    #: ``foreach=None`` on the CPU while the two paths are being timed: the key the batched run is recorded under
    trial: tuple | None = None


@dataclass
class _DenseBucket:
    """Unprojected parameters of one group, device and dtype whose Adam has taken the same number of steps."""

    group: dict
    t: int  # the Adam step count after this update (since the moments were started)
    items: list[_Item] = field(default_factory=list)


@dataclass
class Batch:
    """The eligible parameters of one step, bucketed; nothing has been modified yet."""

    buckets: list[_Bucket] = field(default_factory=list)
    ids: frozenset = frozenset()
    #: id(p) -> choice key of the parameters that the per-parameter path steps this time as a timing trial of the
    #: CPU choice (:func:`cpu_choice`); the step loop times them (:meth:`time_param`) and :func:`finish` records them
    timed: dict[int, tuple] = field(default_factory=dict)
    elapsed: dict[tuple, float] = field(default_factory=dict)

    def time_param(self, p: torch.Tensor, seconds: float) -> None:
        key = self.timed[id(p)]
        self.elapsed[key] = self.elapsed.get(key, 0.0) + seconds


@dataclass
class DenseBatch:
    """The unprojected Adam parameters of one step that torch's fused AdamW kernel steps (:func:`collect_dense`)."""

    buckets: list[_DenseBucket] = field(default_factory=list)
    ids: frozenset = frozenset()


def collect(opt: ProjectedOptimizer) -> Batch:
    """Find the parameters whose step this time is a regular GaLore step in a ``foreach`` group."""
    buckets: dict[tuple, _Bucket] = {}
    for group in opt.param_groups:
        if not _group_eligible(opt, group):
            continue
        rank, gap, auto = group["rank"], int(group["update_proj_gap"]), group["foreach"] is None
        lazy = group.get("refresh") == "lazy"  # each matrix's own gap (gradproj.projectors.lazy)
        stagger = bool(group.get("refresh_stagger", False))
        ops_cache: dict[tuple, KernelOps | None] = {}
        for p in group["params"]:
            g = p.grad
            state = opt.state.get(p)
            if g is None or not state or (auto and p.device.type not in ("cuda", "cpu")):
                continue
            step = state.get("step", 0)
            ea, eas, proj = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("proj")
            own_gap = state.get(LAZY_GAP, gap) if lazy else gap
            if schedule.due(state, step, own_gap, stagger) or ea is None or eas is None or proj is None:
                continue  # a refresh step (the per-parameter path computes the new basis), or no Adam state
            if stagger and schedule.OFFSET_KEY not in state:
                continue  # stagger switched on for a state written without: the per-parameter path stores its offset
            if gemm_dtype(group, state) is not None:
                continue  # proj_dtype="auto" chose a low-precision GEMM for this matrix: the per-matrix path
            if g.is_sparse or p.dim() < 2 or g.dtype != p.dtype or g.shape != p.shape or not p.is_contiguous():
                continue
            m, n = p.shape[0], p.numel() // p.shape[0]
            if rank >= min(m, n) or is_dtensor(p):
                continue
            side = choose_side(m, n, group["proj_type"])
            low, basis = ((m, rank), (rank, n)) if side == "right" else ((rank, n), (m, rank))
            dev = p.device
            if (
                ea.shape != low
                or eas.shape != low
                or ea.dtype != eas.dtype
                or not ea.is_floating_point()
                or proj.shape != basis
                or proj.dtype != p.dtype
                or ea.device != dev
                or proj.device != dev
            ):
                continue
            okey = (dev, p.dtype)
            if okey not in ops_cache:
                try:
                    ops_cache[okey] = kernels.resolve(group["impl"], p)
                except ValueError:  # impl='triton' where it cannot run: the per-parameter path raises it
                    ops_cache[okey] = None
            ops = ops_cache[okey]
            if ops is None:
                continue
            step_size = bias_corrected_lr(group, step + 1 - state.get("inner_start", 0))  # Adam.step_size
            key = (id(group), dev, (m, n), side, p.dtype, ea.dtype, id(ops), step_size)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _Bucket(group, (m, n), side, ops, step_size)
            bucket.items.append(_Item(p, g, state))
    kept: list[_Bucket] = []
    timed: dict[int, tuple] = {}
    for bucket in buckets.values():
        if bucket.group["foreach"] is None and bucket.items[0].p.device.type == "cpu":
            key = _choice_key(bucket)
            choice = _CPU_CHOICE.get(key)
            if choice is None:  # still timing: the form with fewer trials runs this time
                trials = _CPU_TRIALS.setdefault(key, {True: [], False: []})
                if len(trials[True]) > len(trials[False]):
                    timed.update((id(it.p), key) for it in bucket.items)
                    continue
                bucket.trial = key
            elif not choice:
                continue
        kept.append(bucket)
    return Batch(kept, frozenset(id(it.p) for b in kept for it in b.items), timed)


#: ``foreach=None`` on the CPU: a bucket's (shape, side, dtypes, matrices, Adam kernel, decay, threads) -> whether
#: the batched step measured faster than the per-parameter path; chosen once per process (:func:`cpu_choice`)
_CPU_CHOICE: dict[tuple, bool] = {}
#: the same keys -> the times of the regular steps measured so far, batched (True) and per parameter (False)
_CPU_TRIALS: dict[tuple, dict[bool, list[float]]] = {}
#: regular steps each path is timed for before the choice (the fastest of each counts)
CPU_TRIALS = 3
log = logging.getLogger("gradproj")


def _choice_key(bucket: _Bucket) -> tuple:
    first = bucket.items[0]
    decay = bucket.group["weight_decay"] != 0.0
    fused = fused_adam(bucket.group, bucket.ops)
    return (
        bucket.shape2d,
        bucket.side,
        first.p.dtype,
        first.state["exp_avg"].dtype,
        len(bucket.items),
        fused,
        decay,
        torch.get_num_threads(),
    )


def cpu_choice(key: tuple) -> bool | None:
    """Whether buckets of ``key`` are batched under ``foreach=None`` on the CPU; None while still being timed.

    On the CPU a kernel launch is cheap, so what the batched step saves is the per-parameter path's Python
    around each matrix, and what it costs is locality: the per-parameter path consumes each R (and ψ) while the
    GEMM has just left it in cache, the batched one computes all of a chunk's Rs first. Small matrices gain,
    large ones can lose (llama_20m's blocks against llama_60m's on an Intel Xeon, docs/benchmarks.md). The
    two paths give the same bits (tests/test_foreach.py), so each bucket's first regular steps alternate
    between them, timed, and after :data:`CPU_TRIALS` of each the faster is kept for the process.
    """
    return _CPU_CHOICE.get(key)


def _record(key: tuple, batched: bool, seconds: float) -> None:
    trials = _CPU_TRIALS.setdefault(key, {True: [], False: []})
    trials[batched].append(seconds)
    if len(trials[True]) >= CPU_TRIALS and len(trials[False]) >= CPU_TRIALS and key not in _CPU_CHOICE:
        _CPU_CHOICE[key] = min(trials[True]) <= min(trials[False])
        log.debug(
            "gradproj: foreach=None on the CPU: %d matrices of %s %s batched %.3f ms, per parameter %.3f ms: %s",
            key[4],
            key[0],
            key[1],
            1e3 * min(trials[True]),
            1e3 * min(trials[False]),
            "batched" if _CPU_CHOICE[key] else "per parameter",
        )


def finish(batch: Batch) -> None:
    """Record the per-parameter timing trials of a completed step (:meth:`Batch.time_param`)."""
    for key, seconds in batch.elapsed.items():
        _record(key, False, seconds)


#: state keys an unprojected Adam parameter may hold (anything else: a layout the per-parameter path restarts)
_DENSE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "inner_start", "sr_seed"})


def _dense_group(opt: ProjectedOptimizer, group: dict) -> bool:
    """Group-level conditions of the fused AdamW step of unprojected parameters."""
    inner = opt.engine.inner(group)
    return (
        isinstance(inner, Adam)
        and type(inner).update is Adam.update
        and type(inner).step_size is Adam.step_size
        and group.get("adam_kernel", "fused") == "fused"
        and group["norm_growth_limit"] is None
        and not group["stochastic_rounding"]
        and isinstance(group["lr"], (int, float))
        and group["state_dtype"] is None
        and all(0.0 <= b < 1.0 for b in group["betas"])  # bias corrections that are not 0
    )


def _dense_param(p: torch.Tensor, g: torch.Tensor, group: dict, state: dict) -> bool:
    """Parameter-level conditions of the fused AdamW step (the group's: :func:`_dense_group`)."""
    if (group.get("rank") is not None and p.dim() >= 2) or p.numel() == 0:
        return False
    if g.is_sparse or g.dtype != p.dtype or g.shape != p.shape or not (p.is_contiguous() and g.is_contiguous()):
        return False
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16) or is_dtensor(p) or not set(state) <= _DENSE_KEYS:
        return False
    ea, eas = state.get("exp_avg"), state.get("exp_avg_sq")
    if ea is None or eas is None:
        return ea is None and eas is None
    if not all(t.shape == p.shape and t.dtype == p.dtype and t.device == p.device for t in (ea, eas)):
        return False
    if not (ea.is_contiguous() and eas.is_contiguous()):
        return False
    try:  # the Triton kernels (fused already) run through the per-parameter path
        return kernels.resolve(group["impl"], p).adam_update is kernels.reference.adam_update
    except ValueError:  # impl='triton' where it cannot run: the per-parameter path raises it
        return False


def dense_step_applies(opt: ProjectedOptimizer, p: torch.Tensor, g: torch.Tensor, group: dict, state: dict) -> bool:
    """Whether an unprojected parameter's Adam step is :func:`step_dense`'s (torch's fused AdamW kernel)."""
    return _dense_group(opt, group) and _dense_param(p, g, group, state)


def collect_dense(opt: ProjectedOptimizer) -> DenseBatch:
    """The unprojected parameters (groups without ``rank``, tensors of fewer than 2 dimensions) that torch's
    fused AdamW kernel steps (``adam_kernel="fused"``, the default): contiguous plain tensors with the
    reference kernels (the CPU, or ``impl="torch"``), a gradient of their dtype, and no state or Adam state of
    their own shape and dtype. Everything else takes the per-parameter path."""
    buckets: dict[tuple, _DenseBucket] = {}
    for group in opt.param_groups:
        if group["compile"] or not _dense_group(opt, group):
            continue  # compile=True: the compiled tail steps it (its eager steps take step_dense)
        for p in group["params"]:
            g = p.grad
            state = opt.state.get(p) or {}
            if g is None or not _dense_param(p, g, group, state):
                continue
            g = kernels.reference.clip_by_norm(g, group["max_grad_norm"])  # as the per-parameter loop does
            t = state.get("step", 0) + 1 - state.get("inner_start", 0)
            key = (id(group), p.device, p.dtype, t)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _DenseBucket(group, t)
            bucket.items.append(_Item(p, g, state))
    return DenseBatch(list(buckets.values()), frozenset(id(it.p) for b in buckets.values() for it in b.items))


def step_dense(opt: ProjectedOptimizer, p: torch.Tensor, g: torch.Tensor, group: dict, state: dict) -> None:
    """One unprojected parameter's step by torch's fused AdamW kernel, from :meth:`Engine.update` (the
    per-layer path, and compile=True's eager steps), which has counted the step in ``state`` already."""
    _step_dense(opt, _DenseBucket(group, state["step"] - state.get("inner_start", 0), [_Item(p, g, state)]), False)


def _step_dense(opt: ProjectedOptimizer, bucket: _DenseBucket, count: bool = True) -> None:
    """Adam with GaLore's arithmetic (Adam.update, then decoupled decay after the update) by torch's fused
    AdamW kernel. GaLore adds eps to √v and folds both bias corrections into the step size; torch adds eps to
    √v / √(1−β2^t). The two are the same function when torch is given eps / √(1−β2^t): then torch's update
    lr/(1−β1^t) · m / (√v/√(1−β2^t) + eps/√(1−β2^t)) = lr·√(1−β2^t)/(1−β1^t) · m / (√v + eps), rounded
    differently (within a few ulps of the update). The decay runs after the update, as in the reference, folded
    into the kernel's own decay (below)."""
    group = bucket.group
    for it in bucket.items:
        if "exp_avg" not in it.state:
            it.state = opt.state[it.p] if it.state is not opt.state.get(it.p) else it.state
            it.state["exp_avg"] = torch.zeros_like(it.p, memory_format=torch.contiguous_format)
            it.state["exp_avg_sq"] = torch.zeros_like(it.p, memory_format=torch.contiguous_format)
    Ws = [it.p.detach() for it in bucket.items]
    beta1, beta2 = group["betas"]
    lr, t = float(group["lr"]), bucket.t
    step = torch.tensor(float(t), dtype=torch.float32, device=Ws[0].device)
    decay = lr * group["weight_decay"]
    # The decay after the update, (1 − d)·(W − lr·ψ̂) with d = lr·wd, is torch's decay before it, W·(1 − lr'·wd') −
    # lr'·ψ̂, with lr' = lr·(1 − d) and wd' = wd / (1 − d): the same function in the one pass, rounded differently.
    folded = 0.0 < decay < 1.0
    torch._fused_adamw_(
        Ws,
        [it.grad for it in bucket.items],
        [it.state["exp_avg"] for it in bucket.items],
        [it.state["exp_avg_sq"] for it in bucket.items],
        [],
        [step] * len(Ws),
        lr=lr * (1.0 - decay) if folded else lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=group["weight_decay"] / (1.0 - decay) if folded else 0.0,
        eps=group["eps"] / math.sqrt(1.0 - beta2**t),
        amsgrad=False,
        maximize=False,
    )
    if decay != 0.0 and not folded:  # kernels.reference.apply_weight_decay_, after the update
        torch._foreach_add_(Ws, Ws, alpha=-decay)
    if count:
        for it in bucket.items:
            it.state["step"] = it.state.get("step", 0) + 1


def run_dense(opt: ProjectedOptimizer, batch: DenseBatch) -> None:
    """Step every parameter of ``batch`` with torch's fused AdamW kernel, one call per bucket."""
    for bucket in batch.buckets:
        _step_dense(opt, bucket)


def run(opt: ProjectedOptimizer, batch: Batch) -> None:
    """Step every parameter of ``batch``: the per-parameter path's math, a chunk of matrices at a time."""
    for bucket in batch.buckets:
        start = time.perf_counter()
        for chunk in _chunks(bucket):
            _step_chunk(opt, bucket, chunk)
        if bucket.trial is not None:
            _record(bucket.trial, True, time.perf_counter() - start)


def _chunks(bucket: _Bucket) -> list[list[_Item]]:
    m, n = bucket.shape2d
    first = bucket.items[0]
    psize, ssize = first.p.element_size(), first.state["exp_avg"].element_size()
    low = first.state["exp_avg"].numel()
    per = low * (2 * psize + 3 * ssize)  # R, R in the state dtype, √v + eps / U, U in the weight's dtype
    if _stacked(first.p.device, m * n, len(bucket.items)):
        per += 2 * m * n * psize + first.state["proj"].numel() * psize  # stacked G and W, stacked bases
    size = max(1, CHUNK_BYTES // per)
    return [bucket.items[i : i + size] for i in range(0, len(bucket.items), size)]


def _adam_directions(group: dict, ops: KernelOps, Rs: list, ms: list, vs: list) -> list[torch.Tensor]:
    """Adam.update's directions over a chunk: torch's fused kernel for the matrices where the per-parameter
    path runs it (``adam_kernel="fused"``, :func:`gradproj.inner.adam.fused`), the reference's ops for the
    others, so that either path gives each matrix the same bits."""
    (beta1, beta2), eps = group["betas"], group["eps"]
    use_fused = fused_adam(group, ops)
    picks = [use_fused and kernels.reference.fused_adam_applies(R, m, v) for R, m, v in zip(Rs, ms, vs)]
    out: list = [None] * len(Rs)
    ref = kernels.reference
    for flag in (True, False):
        idx = [i for i, f in enumerate(picks) if f is flag]
        if not idx:
            continue
        args = ([Rs[i] for i in idx], [ms[i] for i in idx], [vs[i] for i in idx], beta1, beta2, eps)
        if not flag:
            res = ref.adam_update_foreach(*args)
        elif Rs[0].device.type == "cpu":  # the Rs are this step's projections: ψ is written over them
            res = ref.adam_update_fused_(*args)
        else:
            res = ref.adam_update_fused(*args)
        for i, U in zip(idx, res):
            out[i] = U
    return out


def _step_chunk(opt: ProjectedOptimizer, bucket: _Bucket, items: list[_Item]) -> None:
    group, side = bucket.group, bucket.side
    m, n = bucket.shape2d
    Ws = [it.p.view(m, n) for it in items]
    Gs = [it.grad.reshape(m, n) for it in items]
    Ps = [it.state["proj"] for it in items]
    ms = [it.state["exp_avg"] for it in items]
    vs = [it.state["exp_avg_sq"] for it in items]
    for it in items:
        it.state["step"] = it.state.get("step", 0) + 1
    batched = _stacked(Ws[0].device, m * n, len(items))
    if not batched and Ws[0].device.type == "cpu":
        return _step_streamed(opt, bucket, Ws, Gs, Ps, ms, vs)
    P = torch.stack(Ps) if batched else None

    # R = down(G): Projector.down, matrix by matrix or as one batched product
    if batched:
        assert P is not None
        G = torch.stack(Gs)
        R = torch.bmm(G, P.transpose(1, 2)) if side == "right" else torch.bmm(P.transpose(1, 2), G)
        del G
        Rs = list(R.to(ms[0].dtype).unbind(0))
    else:
        Rs = [dense_down(G, Pm, side) for G, Pm in zip(Gs, Ps)]
        if Rs[0].dtype != ms[0].dtype:
            Rs = list(torch.stack(Rs).to(ms[0].dtype).unbind(0))

    # Adam in the subspace: the ops module's adam_update over the chunk
    # kernels.reference.adam_update's ops, also under impl="triton": for float32 state that is the Triton
    # kernel's arithmetic; for bf16 / fp16 state each op rounds to the state dtype (as impl="torch" does)
    # where the kernel rounds once. Reproducing the single rounding here took float32 copies of all the
    # moments, which measured slower on an H100 than the per-matrix kernels (docs/benchmarks.md).
    Us = _adam_directions(group, bucket.ops, Rs, ms, vs)
    del Rs

    # W -= s·scale·B(U);  W -= lr·wd·W   (the ops module's apply_update without residual or rounding seed)
    alpha = -bucket.step_size * opt.engine.scale(group)
    decay = group["lr"] * group["weight_decay"]
    X = torch.stack(Us).to(Ws[0].dtype) if (batched or Us[0].dtype != Ws[0].dtype) else None
    Xs = Us if X is None else list(X.unbind(0))
    fused_decay = _decay_in_gemm(bucket, decay, Ws[0], Xs[0], Ps[0])
    beta = 1.0 - decay if fused_decay else 1.0
    if batched:  # the weights stacked, so the update is one fused baddbmm_ as the per-matrix addmm_ is
        assert X is not None and P is not None
        Wst = torch.stack(Ws)
        Wst.baddbmm_(*((X, P) if side == "right" else (P, X)), beta=beta, alpha=alpha * beta)
        if not fused_decay and decay != 0.0:
            Wst.add_(Wst, alpha=-decay)
        torch._foreach_copy_(Ws, list(Wst.unbind(0)))
        return
    for W, Xm, Pm in zip(Ws, Xs, Ps):
        W.addmm_(*((Xm, Pm) if side == "right" else (Pm, Xm)), beta=beta, alpha=alpha * beta)
    if not fused_decay and decay != 0.0:
        torch._foreach_add_(Ws, Ws, alpha=-decay)


def _decay_in_gemm(bucket: _Bucket, decay: float, W: torch.Tensor, X: torch.Tensor, P: torch.Tensor) -> bool:
    """Whether the decay rides in the back-projection GEMM as beta: Triton's apply_update always; the reference's
    with adam_kernel="fused" where that is the faster form for this shape (the per-parameter path's choice,
    kernels.reference.apply_update_decay_in_gemm)."""
    return bucket.ops.apply_update is not kernels.reference.apply_update or (
        decay != 0.0
        and bucket.group.get("adam_kernel") == "fused"
        and kernels.reference.decay_in_gemm_pays(W, *((X, P) if bucket.side == "right" else (P, X)))
    )


def _step_streamed(opt: ProjectedOptimizer, bucket: _Bucket, Ws: list, Gs: list, Ps: list, ms: list, vs: list) -> None:
    """The per-matrix form on the CPU, one matrix at a time: down, Adam, up, as the per-parameter path orders
    them (each R and ψ is consumed while the GEMM has just left it in cache), without that path's Python per
    matrix. The same ops on the same tensors as :meth:`Engine.update`, so the same bits."""
    group, side = bucket.group, bucket.side
    alpha = -bucket.step_size * opt.engine.scale(group)
    decay = group["lr"] * group["weight_decay"]
    fused_decay = None
    use_fused = fused_adam(group, bucket.ops)
    (beta1, beta2), eps = group["betas"], group["eps"]
    ref = kernels.reference
    for W, G, P, m, v in zip(Ws, Gs, Ps, ms, vs):
        R = dense_down(G, P, side)
        R = R if R.dtype == m.dtype else R.to(m.dtype)
        if use_fused and ref.fused_adam_applies(R, m, v):  # _adam_directions of one matrix
            (U,) = ref.adam_update_fused_([R], [m], [v], beta1, beta2, eps)
        else:
            (U,) = ref.adam_update_foreach([R], [m], [v], beta1, beta2, eps)
        X = U if U.dtype == W.dtype else U.to(W.dtype)
        if fused_decay is None:
            fused_decay = _decay_in_gemm(bucket, decay, W, X, P)
        beta = 1.0 - decay if fused_decay else 1.0
        W.addmm_(*((X, P) if side == "right" else (P, X)), beta=beta, alpha=alpha * beta)
        if not fused_decay and decay != 0.0:
            W.add_(W, alpha=-decay)


__all__ = [
    "BATCHED_GEMM_DEVICES",
    "BATCHED_GEMM_MAX_NUMEL",
    "CHUNK_BYTES",
    "Batch",
    "DenseBatch",
    "check_option",
    "collect",
    "collect_dense",
    "dense_step_applies",
    "run",
    "run_dense",
    "step_dense",
]
