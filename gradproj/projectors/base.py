"""The projector interface: how a gradient matrix enters and leaves its low-rank subspace.

A projector is a small, stateless strategy object built per parameter from the parameter's 2-D shape
and its param group. Everything it must remember between steps (the basis, DCT indices, a seed) lives
in the optimizer state dict of that parameter, as tensors or plain Python scalars, under the keys
named in :mod:`gradproj.optimizers.state_keys`. That keeps checkpoints loadable with
``torch.load(..., weights_only=True)``.

Sides (W is m x n, torch layout ``[out, in]``)::

    right:  R = G Pᵀ      (m x r),  B(X) = X P      with P r x n
    left:   R = Pᵀ G      (r x n),  B(X) = P X      with P m x r
    full:   R = Pₗᵀ G Pᵣᵀ (r x r),  B(X) = Pₗ X Pᵣ
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from typing import ClassVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..options import Configurable
from ..state_layout import INT, Spec
from . import lazy, quantized, schedule
from .change import BasisChange, snapshot_basis
from .linalg import finite_flag

log = logging.getLogger("gradproj")

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
#: the group option ``proj_dtype``'s explicit values: the dtype the two projection GEMMs (``down`` and ``up``) run
#: in (``"auto"``, the default, chooses per matrix: :meth:`Projector.decide_gemm_dtype`)
PROJ_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: ``proj_dtype="auto"``: the state key of a matrix's decision, an int indexing :data:`AUTO_CHOICES`
AUTO_KEY = "proj_dtype_auto"
#: what ``proj_dtype="auto"`` chooses between, as the dtype the projection GEMMs take their operands in: 0, the
#: parameter's dtype; 1, bfloat16 (both operands cast, the product rounded to bfloat16, as ``proj_dtype="bfloat16"``);
#: 2, bfloat16 inputs: the float32 GEMMs in oneDNN's bfloat16 math mode, which rounds the operands to bfloat16 as
#: it packs them and accumulates and returns float32 (the CPU, where available: :func:`bf16_inputs_available`)
AUTO_CHOICES: tuple[torch.dtype | None, ...] = (None, torch.bfloat16, torch.bfloat16)
#: the choice whose GEMMs run in float32 under oneDNN's bfloat16 math mode (:func:`bf16_input_gemms`)
AUTO_BF16_INPUTS = 2
#: how :func:`auto_decisions`, the log and the timings name each choice
AUTO_LABELS = ("float32", "bfloat16", "bfloat16 inputs")
#: ``proj_dtype="auto"`` gives up precision only where the float32 projection of the matrix (its ``down`` and
#: ``add_up_``) takes at least this long on this machine, measured (:meth:`Projector.decide_gemm_dtype`)
AUTO_MIN_SECONDS = 1e-4
#: ... and only where a low-precision path is measurably faster: at most this fraction of the float32 path's time
AUTO_MARGIN = 0.9
#: timed runs of each path (after one warm-up run); the best one counts
AUTO_RUNS = 3
#: each timed run of the comparison repeats its path until it lasts about this long (at most
#: :data:`AUTO_MAX_REPEATS` calls), so that a 10 % margin is ~100 µs of measured time whatever the matrix's size
AUTO_RUN_SECONDS = 1e-3
AUTO_MAX_REPEATS = 16
#: the devices ``proj_dtype="auto"`` times on (elsewhere it is the parameter's dtype)
CUDA_CPU = ("cpu", "cuda")
#: (m, n, rank, side, dtype, device, basis_bits) -> (the choice, float32 seconds, the faster low-precision path's
#: seconds or None): ``proj_dtype="auto"``'s measurements, once per process and shape (:func:`auto_decisions`)
_AUTO_DECISIONS: dict[tuple, tuple[int, float, float | None]] = {}
#: whether oneDNN's bfloat16 math mode takes effect for float32 GEMMs on the CPU in this process (probed once)
_BF16_INPUTS: dict[str, bool] = {}
#: a dense basis -> (its ``_version``, dtype, its copy in that dtype): the low-precision copy a ``proj_dtype`` GEMM
#: reads, cast once per refresh (a refresh writes the basis in place, which bumps its version). Keyed by the
#: tensor's identity and held weakly: derived, never part of the optimizer state or a checkpoint.
_GEMM_BASES = WeakIdKeyDictionary()


#: (shape, dtype, device, slot) -> a buffer the low-precision GEMM path reuses for G's cast (slot 0) and the
#: back-projection's product (slot 1): one per distinct matrix shape, never part of the state
_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device, slot: int) -> torch.Tensor:
    """A reused uninitialized tensor for a transient of the ``proj_dtype`` path (see :data:`_SCRATCH`).

    Allocating a fresh multi-megabyte tensor per matrix per step maps new pages each time (the allocator
    returns large blocks to the system), and their first-touch faults cost as much as the cast itself; the
    transients never outlive the call that fills them, so one buffer per shape serves every matrix. On the
    CPU only: elsewhere a fresh tensor (CUDA's caching allocator already reuses its blocks)."""
    if torch.compiler.is_compiling() or device.type != "cpu":  # CUDA's caching allocator already reuses blocks
        return torch.empty(shape, dtype=dtype, device=device)
    key = (tuple(shape), dtype, device, slot)
    buf = _SCRATCH.get(key)
    if buf is None:
        buf = _SCRATCH[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def gemm_basis(P: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``P`` in ``dtype``, cast at most once per version of ``P`` (:data:`_GEMM_BASES`)."""
    if P.dtype == dtype:
        return P
    if torch.compiler.is_compiling() or P.is_inference():  # a graph casts it itself; no version counter
        return P.to(dtype)
    cached = _GEMM_BASES.get(P)
    if cached is not None and cached[0] == P._version and cached[1] == dtype:
        return cached[2]
    low = P.to(dtype)
    _GEMM_BASES[P] = (P._version, dtype, low)
    return low


def auto_applies(group: dict) -> bool:
    """Whether ``proj_dtype="auto"`` may choose a low-precision GEMM for a matrix of ``group``: the group sets it,
    has no residual rule (Fira, FRUGAL and APOLLO form G − B(R), whose rounding error bfloat16 would make
    relative to G instead of the small residual) and no ``compile`` (the compiled tail runs the parameter's
    dtype). Elsewhere ``"auto"`` is the parameter's dtype."""
    return group.get("proj_dtype") == "auto" and group.get("residual", "none") == "none" and not group.get("compile")


def gemm_dtype(group: dict, state: dict) -> torch.dtype | None:
    """The dtype the projection GEMMs of a matrix with ``state`` in ``group`` run in; None: the operands' own.

    An explicit ``proj_dtype`` is used as given; ``"auto"`` is the decision stored in the state
    (:data:`AUTO_KEY`), the parameter's dtype until one is made or where :func:`auto_applies` does not hold."""
    value = group.get("proj_dtype")
    if value == "auto":
        if not auto_applies(group):  # checked first: a compiled graph then reads nothing of the state here
            return None
        code = state.get(AUTO_KEY)
        return None if code is None else AUTO_CHOICES[code]
    return PROJ_DTYPES.get(value)


def measure_seconds(label: str, run, device: torch.device, repeats: int = 1) -> float:
    """Seconds per call of ``run``: the best of :data:`AUTO_RUNS` timed runs of ``repeats`` calls each (after one
    untimed warm-up call, which also pays first-call costs such as the cast of the low-precision basis),
    synchronizing a CUDA device around each run. ``label`` names the path (:data:`AUTO_LABELS`)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    run()
    sync()
    best = float("inf")
    for _ in range(AUTO_RUNS):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def auto_decisions() -> dict[tuple, tuple[str, float, float | None]]:
    """What ``proj_dtype="auto"`` measured and chose in this process: (m, n, rank, side, dtype, device,
    basis_bits) -> (the choice's :data:`AUTO_LABELS` name; float32 seconds; the faster low-precision path's
    seconds, None where the float32 path was below :data:`AUTO_MIN_SECONDS` and nothing else was timed)."""
    return {k: (AUTO_LABELS[c], t32, tlow) for k, (c, t32, tlow) in _AUTO_DECISIONS.items()}


def _mkldnn_matmul():
    """torch's oneDNN matmul settings, where this torch has the ``fp32_precision`` switch (torch >= 2.9), else None."""
    settings = getattr(torch.backends.mkldnn, "matmul", None)
    return settings if settings is not None and hasattr(settings, "fp32_precision") else None


@contextlib.contextmanager
def bf16_input_gemms():
    """float32 GEMMs on the CPU inside this block run in oneDNN's bfloat16 math mode: operands rounded to
    bfloat16 as they are packed, products accumulated and returned in float32 (``torch.backends.mkldnn.matmul
    .fp32_precision = "bf16"``, what ``torch.set_float32_matmul_precision("medium")`` sets for the whole
    process). The previous setting is restored on exit. The switch is process-wide: a float32 CPU matmul that
    another Python thread runs at the same moment also takes bfloat16 inputs."""
    settings = _mkldnn_matmul()
    if settings is None:  # pragma: no cover - only reached through a stored decision on an older torch
        yield
        return
    before = settings.fp32_precision
    settings.fp32_precision = "bf16"
    try:
        yield
    finally:
        settings.fp32_precision = before


def bf16_inputs_available(device: torch.device) -> bool:
    """Whether :func:`bf16_input_gemms` changes float32 GEMMs on ``device`` in this process: the CPU, a torch with
    the switch and oneDNN, and a probe product (64 x 64, once per process) that comes out as the bfloat16-rounded
    operands' product rather than the float32 one (oneDNN runs float32 on CPUs without bfloat16 instructions).

    The probe's bound: the two candidates differ by the operands' rounding to bfloat16 (relative 2^-9 per
    operand, about 1e-3 of the product's scale here), while two float32 accumulations of the same operands
    differ by at most 64 roundings of 2^-24 (4e-6); 1e-4 separates them."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return False
    known = _BF16_INPUTS.get("cpu")
    if known is None:
        known = False
        if _mkldnn_matmul() is not None and torch.backends.mkldnn.is_available():
            g = torch.Generator().manual_seed(0)
            A, B = torch.rand(64, 64, generator=g), torch.rand(64, 64, generator=g)
            try:
                with bf16_input_gemms():
                    got = A @ B
            except RuntimeError:  # a build whose oneDNN refuses the mode
                got = A @ B
            rounded = A.bfloat16().float() @ B.bfloat16().float()
            scale = float((A.abs() @ B.abs()).max())
            known = float((got - rounded).abs().max()) < 1e-4 * scale < float((got - A @ B).abs().max())
        _BF16_INPUTS["cpu"] = known
    return known


class NonFiniteGradientError(ValueError):
    """Raised when the very first basis would have to be computed from a NaN/Inf gradient."""


class BasisDecompositionError(ValueError):
    """Raised when the decomposition that computes a parameter's very first basis fails (an SVD or
    eigensolver that does not converge), so that there is no previous basis to keep."""


class BasisRefreshWarning(RuntimeWarning):
    """Warned when a basis refresh keeps the previous basis (a NaN/Inf gradient, a failed decomposition).

    Python shows it once per cause; every occurrence, with the parameter's shape and the step, is also
    logged to the ``gradproj`` logger.
    """


def choose_side(m: int, n: int, proj_type: str) -> str:
    """Pick the projection side once, from the weight's shape (docs/algorithms.md, GaLore).

    ``std`` projects the longer side away (right when m >= n), ``reverse_std`` the other one; ``left``,
    ``right`` and ``full`` force a side. The side never depends on the shape of a low-rank tensor, which
    is what breaks the original ``reverse_std`` when rank >= min(m, n).
    """
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}; use one of {', '.join(PROJ_TYPES)}")


#: (m, n, r, dtype) -> whether ``Pᵀ G`` (True) or ``(Gᵀ P)ᵀ`` copied to a contiguous R (False) is the faster
#: left projection on this CPU; measured once per process and shape (:func:`left_layout`)
_LEFT_LAYOUT: dict[tuple, bool] = {}
#: the transposed form must be this much faster to be chosen (timing noise must not flip the choice)
LAYOUT_MARGIN = 0.9


def agree_across_ranks(value: int, device: torch.device) -> int:
    """``value`` as rank 0 measured it, on every rank of an initialized process group (itself otherwise).

    A choice made by timing (the left-projection layout, ``proj_dtype="auto"``) can come out differently in two
    processes; data-parallel replicas that round differently would drift apart, so in a distributed run rank
    0's measurement decides for all. Every rank reaches the same choice at the same point of the same step
    (the same shapes, in the same order, the first time each is seen), so the broadcast pairs up: this assumes
    data parallelism, where every rank steps the same projected matrices (docs/architecture.md).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    flag = torch.tensor([value], dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
    dist.broadcast(flag, src=0)
    return int(flag.item())


def left_layout(G: torch.Tensor, P: torch.Tensor) -> bool:
    """Whether ``Pᵀ G`` is the faster form of a left projection of ``G`` (m x n) on ``P`` (m x r) on the CPU.

    Both forms give a contiguous r x n R (the fused Adam kernel reads R as a flat buffer): ``Pᵀ G`` directly,
    or ``Gᵀ P`` (n x r) transposed and copied. Which GEMM layout MKL runs faster depends on the CPU (the
    transposed one was ~1.4x faster on an AMD EPYC, the plain one 1.2-1.3x faster on an Intel Xeon), so it is
    timed on the first projection of each shape and dtype (three runs of each, best of each) and cached for
    the process. The two forms round differently (a few ulps of R); one process always uses one of them, and
    in a distributed run every rank uses rank 0's (:func:`agree_across_ranks`).
    """
    key = (*G.shape, P.shape[1], G.dtype)
    plain = _LEFT_LAYOUT.get(key)
    if plain is None:
        best = {True: float("inf"), False: float("inf")}
        for _ in range(3):
            for form in (True, False):
                start = time.perf_counter()
                _ = P.t() @ G if form else (G.t() @ P).t().contiguous()
                best[form] = min(best[form], time.perf_counter() - start)
        plain = not best[False] < LAYOUT_MARGIN * best[True]
        plain = _LEFT_LAYOUT[key] = bool(agree_across_ranks(int(plain), G.device))
    return plain


def dense_down(G: torch.Tensor, P: torch.Tensor, side: str) -> torch.Tensor:
    """R for a dense one-sided basis P: ``G Pᵀ`` (right, P r x n) or ``Pᵀ G`` (left, P m x r), contiguous."""
    if side == "right":
        return G @ P.t()
    if G.device.type != "cpu" or torch.compiler.is_compiling() or left_layout(G, P):
        return P.t() @ G
    return (G.t() @ P).t().contiguous()


class Projector(Configurable):
    """Base class of every basis. Subclasses implement :meth:`compute_basis` and the key layout.

    The default :meth:`down` / :meth:`up` / :meth:`add_up_` work for bases stored as dense
    orthonormal matrices under ``proj`` (one side) or ``proj_left`` / ``proj_right`` (full).
    """

    name: ClassVar[str] = ""
    #: whether the basis is refreshed from the gradient (False for the identity)
    refreshes: ClassVar[bool] = True
    #: the group keys this projector reads (``options``, :mod:`gradproj.options`; ``defaults`` is derived)
    #: True when ``up`` is an isometry whose adjoint is ``down`` (an orthonormal basis with R = down(G)):
    #: then ‖B(X)‖ = ‖X‖ and ⟨B(X), G⟩ = ⟨X, down(G)⟩ row by row (right) or column by column (left), which
    #: lets residual rules and the norm-growth limiter skip materialising full-size tensors. Leave False
    #: for bases that are not orthonormal (a Gaussian random projection); the exact slower path then runs.
    orthonormal: ClassVar[bool] = False
    #: True when the basis is stored dense under ``proj`` (one side) and :meth:`down` / :meth:`up` /
    #: :meth:`add_up_` / :meth:`needs_refresh` are this class's: the batched ``foreach`` step then runs it with
    #: :func:`dense_down` and one GEMM per update. A subclass that stores or applies its basis otherwise sets False.
    #: A group with ``basis_bits`` stores it quantized instead (:meth:`stores_dense`).
    dense_basis: ClassVar[bool] = True
    #: the state keys that hold the basis (snapshotted before a refresh for ``moments_on_refresh="project"``)
    basis_keys: ClassVar[tuple[str, ...]] = ("proj", "proj_left", "proj_right", *quantized.QUANTIZED_KEYS)
    #: the parameter's position among the optimizer's parameters (set by the optimizer; seeds random bases)
    param_index: int = 0
    #: the basis state before the last refresh; kept only when ``moments_on_refresh="project"``
    previous: dict | None = None
    #: ``refresh="lazy"`` (set from the group; False for projectors built without :meth:`__init__`)
    lazy: bool = False
    #: ``refresh_stagger`` (set from the group): refresh at the matrix's own offset (:mod:`.schedule`)
    stagger: bool = False
    #: True when one instance may serve every step of a parameter (it keeps nothing between steps but
    #: :attr:`previous`, which the engine clears): the engine then builds it once per group version
    reusable: ClassVar[bool] = False

    @classmethod
    def stores_dense(cls, group: dict) -> bool:
        """Whether this projector keeps ``group``'s basis as a dense matrix under ``proj`` (:attr:`dense_basis`,
        and no ``basis_bits``) and may project in the parameter's dtype (``proj_dtype`` None or ``"auto"``; the
        batched ``foreach`` step then takes the matrices whose :func:`gemm_dtype` is the parameter's): what the
        batched step needs."""
        return cls.dense_basis and group.get("basis_bits") is None and group.get("proj_dtype") in (None, "auto")

    def gemm_dtype_for(self, state: dict) -> torch.dtype | None:
        """The dtype of this matrix's projection GEMMs (:func:`gemm_dtype`); None: the operands' own dtype."""
        group = getattr(self, "group", None)  # a subclass whose __init__ keeps no group: the operands' dtype
        return None if group is None else gemm_dtype(group, state)

    def bf16_inputs_for(self, state: dict) -> bool:
        """Whether this matrix's projection GEMMs run in float32 under :func:`bf16_input_gemms` (``"auto"``'s
        stored choice :data:`AUTO_BF16_INPUTS`)."""
        group = getattr(self, "group", None)
        return (
            group is not None
            and group.get("proj_dtype") == "auto"
            and state.get(AUTO_KEY) == AUTO_BF16_INPUTS
            and auto_applies(group)
        )

    def decides_gemm_dtype(self) -> bool:
        """Whether ``proj_dtype="auto"`` records a decision for this matrix (:meth:`decide_gemm_dtype`): the group
        sets it and the basis is a stored dense matrix (:attr:`dense_basis`; a regenerated or phase-switching
        basis's ``"auto"`` is the parameter's dtype without a record)."""
        return self.group.get("proj_dtype") == "auto" and self.dense_basis and not torch.compiler.is_compiling()

    def decide_gemm_dtype(self, G: torch.Tensor, state: dict) -> int:
        """``proj_dtype="auto"``: the GEMM dtype of this matrix, as an index into :data:`AUTO_CHOICES`.

        The parameter's dtype (0), without timing, where low precision does not apply: the group does not allow
        it (:func:`auto_applies`: a residual rule, ``compile``), G is not float32 on a CPU or CUDA device, or the
        projections are not this class's (FSDP2's sharded projector: ranks timing their own rows could decide
        differently).

        Otherwise timed once per process for each (m, n, rank, side, dtype, device, basis_bits), on the basis
        just computed: the float32 path (``down`` then ``add_up_`` into a scratch copy of G, as the step runs
        them), and where it is not below the floor (next), the bfloat16 path and, on a CPU where oneDNN's
        bfloat16 math mode takes effect (:func:`bf16_inputs_available`), the float32 path under it, then each
        once more (alternating blocks of :data:`AUTO_RUNS` runs, :func:`measure_seconds`, each run repeating its
        path for about :data:`AUTO_RUN_SECONDS`); each path's best counts.

        The policy: precision is given up only where the float32 projection of the matrix takes at least
        :data:`AUTO_MIN_SECONDS` (0.1 ms) on this machine, measured, and the faster low-precision path takes at
        most :data:`AUTO_MARGIN` (90 %) of that time; between the two, bfloat16 inputs win ties (their product
        is not rounded to bfloat16). The repeats make a 10 % margin ~100 µs of measured time, above the jitter
        of a loaded machine, so the choice reproduces from run to run; the floor keeps the projections that
        cost next to nothing (unit tests, the ``tiny`` model: a 48 x 80 matrix at rank 8 takes ~5 µs) in the
        parameter's dtype bit for bit on any CPU. No machine constant is involved: a CPU without fast bfloat16
        (no AVX-512-BF16 / AMX) measures it slower and keeps float32.
        """
        cls = type(self)
        own_gemms = cls.down is Projector.down and cls.add_up_ is Projector.add_up_  # not FSDP2's sharded ones
        if not (own_gemms and auto_applies(self.group) and G.dtype == torch.float32 and G.device.type in CUDA_CPU):
            return 0
        key = (self.m, self.n, self.rank, self.side, G.dtype, G.device, self.group.get("basis_bits"))
        known = _AUTO_DECISIONS.get(key)
        if known is not None:
            return known[0]
        W = G.clone()  # a scratch weight: the timed runs write into it

        def path(code: int):
            low = AUTO_CHOICES[code] if code != AUTO_BF16_INPUTS else None

            def run():
                with bf16_input_gemms() if code == AUTO_BF16_INPUTS else contextlib.nullcontext():
                    self._add_up(W, self._down(G, state, low), state, 1e-3, low)

            return run

        fp32 = measure_seconds(AUTO_LABELS[0], path(0), G.device)
        low_time = None
        code = 0
        if fp32 >= AUTO_MIN_SECONDS:
            # two alternating blocks of runs: a stretch of contention on a shared machine then slows every path
            lows = (1, AUTO_BF16_INPUTS) if bf16_inputs_available(G.device) else (1,)
            repeats = max(1, min(AUTO_MAX_REPEATS, math.ceil(AUTO_RUN_SECONDS / fp32)))
            best = {c: float("inf") for c in (0, *lows)}
            best[0] = fp32
            for block in range(2):
                for c in lows if block == 0 else (0, *lows):
                    best[c] = min(best[c], measure_seconds(AUTO_LABELS[c], path(c), G.device, repeats))
            fp32 = best[0]
            low_code = min(reversed(lows), key=best.__getitem__)  # a tie goes to bfloat16 inputs
            low_time = best[low_code]
            code = low_code if fp32 >= AUTO_MIN_SECONDS and low_time <= AUTO_MARGIN * fp32 else 0
        code = agree_across_ranks(code, G.device)  # data-parallel replicas must round alike: rank 0 decides
        if code == 0:  # the timed runs cached a bfloat16 copy of the basis that nothing will read
            for basis in ("proj", "proj_left", "proj_right"):
                if basis in state:
                    _GEMM_BASES.pop(state[basis], None)
        _AUTO_DECISIONS[key] = (code, fp32, low_time)
        log.info(
            "gradproj: proj_dtype='auto' for %dx%d rank %d (%s, %s on %s): float32 %.3f ms, low precision %s -> %s",
            self.m,
            self.n,
            self.rank,
            self.side,
            G.dtype,
            G.device,
            fp32 * 1e3,
            "not timed" if low_time is None else f"{low_time * 1e3:.3f} ms",
            AUTO_LABELS[code] if code else "the parameter's dtype",
        )
        return code

    def gemm_basis(self, state: dict, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The basis ``key`` in ``dtype`` for a ``proj_dtype`` GEMM: a dense basis's cached copy
        (:func:`gemm_basis`), or a quantized one dequantized straight into ``dtype``."""
        dense = state.get(key)
        return gemm_basis(dense, dtype) if dense is not None else self.basis_tensor(state, key, dtype)

    @classmethod
    def validate_group(cls, group: dict, where: str) -> None:
        """Checks across several options (each option's own check is in its declaration); raise
        ``ValueError`` naming ``where``."""

    def __init__(self, shape: tuple[int, int], rank: int, proj_type: str, group: dict):
        self.m, self.n = shape
        self.rank = rank
        self.side = choose_side(self.m, self.n, proj_type)
        self.update_proj_gap = int(group.get("update_proj_gap", 1) or 1)
        # the optimizer writes every option's default into its groups; a group built by hand gets them here
        self.group = group if all(k in group for k in self.defaults) else {**self.defaults, **group}
        self.lazy = lazy.enabled(self.group)  # each matrix keeps its own gap (gradproj.projectors.lazy)
        self.stagger = bool(self.group.get("refresh_stagger", False))

    # ----------------------------------------------------------------------------------------- shapes
    def low_rank_shape(self) -> tuple[int, int]:
        r = self.rank
        return {"right": (self.m, r), "left": (r, self.n), "full": (r, r)}[self.side]

    def rank_axis(self) -> int:
        """Axis of R that holds the rank: norms over it give one factor per row (right) / column (left)."""
        return 1 if self.side == "right" else 0

    def low_rank_factors(self, phi: torch.Tensor) -> torch.Tensor:
        """Factors of G along the axis R keeps (one per row of a right projection, per column of a left one,
        shaped to broadcast against G), restricted to the rows / columns R holds: ``phi`` itself, except for
        a sharded left projection whose R is this rank's block of columns (gradproj.optimizers.sharding)."""
        return phi

    def state_layout(self) -> dict[str, Spec]:
        """The state keys this projector owns and what they must look like (:mod:`gradproj.state_layout`)."""
        m, n, r = self.m, self.n, self.rank
        # proj_dtype="auto"'s decision (declared whatever the group's proj_dtype, so that changing the option
        # never restarts a state; an explicit value overrides it, None ignores it)
        auto = {AUTO_KEY: Spec(INT, bound=len(AUTO_CHOICES))}
        bits = self.group.get("basis_bits")
        if bits is not None:  # codes and scales (gradproj.projectors.quantized)
            if self.side != "full":
                return {**quantized.layout("proj", self.dense_shape("proj"), bits), **lazy.layout(self.group), **auto}
            left, right = "proj_left" + quantized.CODES, "proj_right" + quantized.CODES
            return {
                **quantized.layout("proj_left", (m, r), bits, requires=(right,)),
                **quantized.layout("proj_right", (r, n), bits, requires=(left,)),
                **lazy.layout(self.group),
                **auto,
            }
        if self.side == "full":
            return {
                "proj_left": Spec((m, r), requires=("proj_right",)),
                "proj_right": Spec((r, n), requires=("proj_left",)),
                **lazy.layout(self.group),
                **auto,
            }
        return {"proj": Spec((r, n) if self.side == "right" else (m, r)), **lazy.layout(self.group), **auto}

    def dense_shape(self, key: str) -> tuple[int, int]:
        """The shape of the dense basis ``key`` (``proj``, ``proj_left``, ``proj_right``)."""
        if key == "proj_left" or (key == "proj" and self.side == "left"):
            return (self.m, self.rank)
        return (self.rank, self.n)

    def basis_tensor(self, state: dict, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense basis ``key`` of ``state``: the stored matrix itself, or, for a quantized basis
        (``basis_bits``), a new matrix of ``dtype`` dequantized from its codes and scales."""
        dense = state.get(key)
        if dense is not None:
            return dense
        codes, scales = state[key + quantized.CODES], state[key + quantized.SCALES]
        return quantized.dequantize(codes, scales, self.dense_shape(key), dtype)

    # ---------------------------------------------------------------------------------------- refresh
    def has_basis(self, state: dict) -> bool:
        key = "proj" if self.side != "full" else "proj_left"
        return key in state or key + quantized.CODES in state

    def needs_refresh(self, state: dict, step: int) -> bool:
        """True with no basis, else at t % T == 0 (t counted before the increment), or with
        ``refresh_stagger`` at the matrix's own offset (:func:`gradproj.projectors.schedule.due`).

        T is ``update_proj_gap``, or with ``refresh="lazy"`` the matrix's own gap (``lazy_gap`` in its state).
        """
        gap = state.get(lazy.GAP_KEY, self.update_proj_gap) if self.lazy else self.update_proj_gap
        return not self.has_basis(state) or schedule.due(state, step, gap, self.stagger)

    def lazy_vectors(self, state: dict) -> list[torch.Tensor]:
        """The first vector of each side of the current basis (cloned), which ``refresh="lazy"`` compares
        across refreshes; an empty list where the lazy rule does not apply (no basis)."""
        return lazy.first_vectors(self.basis_matrices(state)) if self.has_basis(state) else []

    def refresh(self, G: torch.Tensor, state: dict, step: int) -> bool:
        """Recompute the basis from gradient matrix ``G``; return True when the basis changed.

        A non-finite gradient never reaches the decomposition: the previous basis is kept (with a
        :class:`BasisRefreshWarning`), or, when there is no previous basis, :class:`NonFiniteGradientError` is
        raised (the optimizer checks this before it modifies anything). A decomposition that fails is
        handled the same way by :meth:`decomposition_failed`, with :class:`BasisDecompositionError`.
        """
        if not self.all_finite(G):
            if self.has_basis(state):
                self._keep_previous_basis(
                    "a non-finite gradient (NaN/Inf) at a basis refresh",
                    "Check the loss scale and the data, or clip gradients with max_grad_norm",
                    step,
                )
                return False
            raise NonFiniteGradientError(
                f"the gradient of a {self.m}x{self.n} parameter is NaN/Inf at its first basis refresh "
                f"(step {step}); no previous basis exists to fall back on. Check the loss scale / data, "
                "or clip gradients before optimizer.step()."
            )
        if self.group.get("moments_on_refresh") == "project" and self.has_basis(state):
            self.previous = snapshot_basis(state, self.basis_keys)
        before = self.lazy_vectors(state) if self.lazy else None
        bases = self.compute_basis(G, state, step)
        if bases is None:  # the projector chose to keep the previous basis
            return False
        if self.group.get("basis_bits") is not None:
            bases = quantized.quantize_bases(bases, self.group["basis_bits"])
        for key, value in bases.items():
            old = state.get(key)
            if old is not None and old.shape == value.shape and old.dtype == value.dtype:
                old.copy_(value)
            else:
                state[key] = value
        if AUTO_KEY not in state and self.decides_gemm_dtype():  # proj_dtype="auto": decided once, then kept
            state[AUTO_KEY] = self.decide_gemm_dtype(G, state)
        if before is not None:
            after = self.lazy_vectors(state)
            if after:
                lazy.record(state, self.group, self.update_proj_gap, before, after)
            else:  # a basis the lazy rule does not apply to (GoLore's random phase): the fixed gap again
                for key in lazy.KEYS:
                    state.pop(key, None)
        return True

    def compute_basis(self, G: torch.Tensor, state: dict, step: int) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def decomposition_failed(self, what: str, err: Exception, state: dict, step: int) -> None:
        """What :meth:`compute_basis` does when its decomposition (``what``, e.g. ``"SVD"``) raised ``err``:
        ``return self.decomposition_failed(...)`` keeps the previous basis (returns None, with a
        :class:`BasisRefreshWarning`), or raises :class:`BasisDecompositionError` at the first refresh, when
        there is no previous basis."""
        fix = "clip gradients with max_grad_norm if they are extreme or degenerate"
        if self.name != "svd":
            fix += ", or use projector='svd', which retries a failed float32 SVD in float64"
        if not self.has_basis(state):
            raise BasisDecompositionError(
                f"the {what} of the gradient of a {self.m}x{self.n} parameter failed at its first basis refresh "
                f"(step {step}), so there is no previous basis to keep: {err}. To fix it, {fix}."
            ) from err
        self._keep_previous_basis(f"the {what} failed at a basis refresh", f"If it persists, {fix}", step, err)
        return None

    def _keep_previous_basis(self, cause: str, advice: str, step: int, err: Exception | None = None) -> None:
        """Report that a refresh keeps the previous basis: a warning whose text names only the cause (so Python
        shows it once per cause) and a log record with the parameter's shape, the step and the error."""
        warnings.warn(
            f"gradproj: {cause}; keeping the previous basis. {advice}. Each occurrence is logged to the "
            "'gradproj' logger.",
            BasisRefreshWarning,
            stacklevel=2,
        )
        log.warning(
            "gradproj: %s (%dx%d, step %d)%s; keeping the previous basis",
            cause,
            self.m,
            self.n,
            step,
            f": {err}" if err is not None else "",
        )

    def all_finite(self, G: torch.Tensor) -> bool:
        """Whether ``G`` has no NaN/Inf (a sharded projector answers for the whole matrix, on every rank)."""
        return bool(finite_flag(G))

    # -------------------------------------------------------------------------------- change of basis
    def basis_matrices(self, state: dict) -> dict[str, torch.Tensor]:
        """The dense orthonormal basis of each projected side, for a state (or a snapshot of one).

        ``{"left": P}`` with P m x r for a left projection, ``{"right": P}`` with P r x n for a right one,
        both for ``full``. Projectors that store something else than the dense basis (DCT indices, a
        seed) override this to rebuild it.
        """
        if self.side == "full":
            return {"left": self.basis_tensor(state, "proj_left"), "right": self.basis_tensor(state, "proj_right")}
        return {self.side: self.basis_tensor(state, "proj")}

    def basis_change(self, state: dict) -> BasisChange:
        """The change of coordinates from the basis before the last refresh (``self.previous``) to the current
        one: c_new = T c_old, with T = P_newᵀ P_old for a left basis and P_new P_oldᵀ for a right basis."""
        if self.previous is None:
            raise RuntimeError(
                "basis_change() needs the basis before the refresh; it is kept only when moments_on_refresh='project'"
            )
        return BasisChange.between(self.basis_matrices(self.previous), self.basis_matrices(state))

    # ------------------------------------------------------------------------------------ projections
    # a quantized basis (``basis_bits``) is dequantized into the dtype of the other operand of each GEMM.
    # With ``proj_dtype`` the GEMM runs in that dtype (both operands cast, the basis once per refresh; torch
    # accumulates in float32 and rounds the product to that dtype), and its result returns to the dtype of G / X.
    def down(self, G: torch.Tensor, state: dict) -> torch.Tensor:
        if self.bf16_inputs_for(state):
            with bf16_input_gemms():
                return self._down(G, state, None)
        return self._down(G, state, self.gemm_dtype_for(state))

    def _down(self, G: torch.Tensor, state: dict, low: torch.dtype | None) -> torch.Tensor:
        """R = down(G) with the GEMMs in ``low`` (None: G's dtype)."""
        if low is not None and low != G.dtype:
            Gl = scratch(G.shape, low, G.device, 0).copy_(G)
            if self.side == "full":
                R = self.gemm_basis(state, "proj_left", low).t() @ Gl @ self.gemm_basis(state, "proj_right", low).t()
            else:
                R = dense_down(Gl, self.gemm_basis(state, "proj", low), self.side)
            return R.to(G.dtype)
        if self.side == "full":
            P_left, P_right = (self.basis_tensor(state, k, G.dtype) for k in ("proj_left", "proj_right"))
            return P_left.t() @ G @ P_right.t()
        return dense_down(G, self.basis_tensor(state, "proj", G.dtype), self.side)

    def up(self, X: torch.Tensor, state: dict) -> torch.Tensor:
        if self.bf16_inputs_for(state):
            with bf16_input_gemms():
                return self._up_plain(X, state)
        low = self.gemm_dtype_for(state)
        if low is not None and low != X.dtype:
            return self._up_low(X.to(low), state, low).to(X.dtype)
        return self._up_plain(X, state)

    def _up_plain(self, X: torch.Tensor, state: dict) -> torch.Tensor:
        """``B(X)`` with the GEMMs in X's dtype."""
        if self.side == "right":
            return X @ self.basis_tensor(state, "proj", X.dtype)
        if self.side == "left":
            return self.basis_tensor(state, "proj", X.dtype) @ X
        return self.basis_tensor(state, "proj_left", X.dtype) @ X @ self.basis_tensor(state, "proj_right", X.dtype)

    def _up_low(self, X: torch.Tensor, state: dict, low: torch.dtype) -> torch.Tensor:
        """``B(X)`` in the GEMM dtype ``low`` (X already in it)."""
        if self.side == "right":
            return X @ self.gemm_basis(state, "proj", low)
        if self.side == "left":
            return self.gemm_basis(state, "proj", low) @ X
        return self.gemm_basis(state, "proj_left", low) @ X @ self.gemm_basis(state, "proj_right", low)

    def add_up_(self, W: torch.Tensor, X: torch.Tensor, state: dict, alpha: float) -> None:
        """``W += alpha · B(X)`` in place, as one fused GEMM where the layout allows it (with a low-precision
        ``proj_dtype``: the GEMM in that dtype, then one add into W, since torch 2.13 has no mixed-dtype
        ``addmm_`` and no ``out_dtype`` GEMM on the CPU)."""
        if self.bf16_inputs_for(state):
            with bf16_input_gemms():
                self._add_up(W, X, state, alpha, None)
            return
        self._add_up(W, X, state, alpha, self.gemm_dtype_for(state))

    def _add_up(self, W: torch.Tensor, X: torch.Tensor, state: dict, alpha: float, low: torch.dtype | None) -> None:
        """:meth:`add_up_` with the GEMM in ``low`` (None: W's dtype)."""
        if low is not None and low != W.dtype and self.side in ("left", "right"):
            # the product into a reused buffer: a fresh m x n tensor per matrix per step costs page faults
            Xl, P = X.to(low), self.gemm_basis(state, "proj", low)
            out = scratch(W.shape, low, W.device, 1)
            if self.side == "right":
                torch.mm(Xl, P, out=out)
            else:
                torch.mm(P, Xl, out=out)
            W.add_(out, alpha=alpha)
            return
        if low is not None and low != W.dtype:
            W.add_(self._up_low(X.to(low), state, low), alpha=alpha)
            return
        X = X.to(W.dtype)
        basis = lambda key: self.basis_tensor(state, key, W.dtype).to(W.dtype)  # noqa: E731  # a one-line local helper
        if self.side == "right":
            W.addmm_(X, basis("proj"), alpha=alpha)
        elif self.side == "left":
            W.addmm_(basis("proj"), X, alpha=alpha)
        else:
            W.addmm_(basis("proj_left"), X @ basis("proj_right"), alpha=alpha)


class IdentityProjector(Projector):
    """No projection: R = G and B(X) = X. Used for 1-D tensors, for matrices whose rank covers the whole
    space, for groups without ``rank``, and by ``projector="identity"``."""

    name = "identity"
    refreshes = False
    orthonormal = True
    reusable = True

    def __init__(self, shape: tuple[int, int], rank: int, proj_type: str, group: dict):
        self.m, self.n = shape
        self.rank = min(shape)
        self.side = "right"  # Fira's factors, if any, are then one per row
        self.update_proj_gap = 1
        self.group = group

    def low_rank_shape(self) -> tuple[int, int]:
        return (self.m, self.n)

    def state_layout(self) -> dict[str, Spec]:
        return {}

    def has_basis(self, state: dict) -> bool:
        return True

    def needs_refresh(self, state: dict, step: int) -> bool:
        return False

    def down(self, G: torch.Tensor, state: dict) -> torch.Tensor:
        return G

    def up(self, X: torch.Tensor, state: dict) -> torch.Tensor:
        return X

    def add_up_(self, W: torch.Tensor, X: torch.Tensor, state: dict, alpha: float) -> None:
        W.add_(X.to(W.dtype), alpha=alpha)
