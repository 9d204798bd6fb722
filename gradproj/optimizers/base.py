"""The one optimizer every gradproj method is a preset of.

For each parameter with a gradient, one step is::

    P        = projector.refresh(G) when t % T == 0 (or no basis yet)     # svd | identity | ...
    R        = projector.down(G)                                            # r x n or m x r
    U, s     = inner.update(R, state)                                       # Adam | ...; s = step size
    U, S     = residual.compute(G, R, U)                                    # Fira | FRUGAL | none
    U, S     = limit growth of ‖scale · B(U) + S‖ (group option norm_growth_limit)
    W       -= s · scale · projector.up(U) + s_res · S                      # s_res: s, or lr for FRUGAL;
    W       -= decay_lr · weight_decay · W                                  # ops.apply_update, full space

Parameters of groups without ``rank``, 1-D tensors, and matrices whose rank would cover the whole space
take the same path with the identity projector, ``scale`` 1 and no residual: exactly AdamW (for the Adam
inner rule) with GaLore's placement of the weight decay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.optim import Optimizer

from .. import kernels
from . import compiled, multi_tensor
from ..distributed.sharding import all_finite, is_dtensor, shard_plan
from ..inner import Adam, InnerRule, StepContext
from ..projectors import PROJ_TYPES, IdentityProjector, Projector, get_projector
from ..projectors.base import NonFiniteGradientError
from ..residual import NoResidual, Residual, get_residual, limit_update_growth, validate_norm_growth_limit
from ..sampling.sampler import restore_sampler
from .layerwise import LayerwiseStepper, check_layerwise_options

if TYPE_CHECKING:
    from ..sampling.sampler import LayerSampler

log = logging.getLogger("gradproj")

#: keys a param group may carry to select and configure the projection (beyond the inner rule's)
PROJECTION_KEYS = ("rank", "update_proj_gap", "scale", "alpha", "proj_type", "projector", "residual")
#: what happens to the inner rule's state when a refresh replaces the basis
MOMENT_RULES = ("keep", "reset", "project")
STATE_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in STATE_DTYPES.items() if k is not None}


@dataclass
class _Plan:
    """How one parameter is stepped, derived from its shape and group (never stored in state)."""

    shape2d: tuple[int, int] | None  # None: the update runs on the tensor's own shape (unprojected)
    projector: Projector
    residual: Residual
    scale: float
    ops: ModuleType  # the kernels module chosen by the group's impl for this tensor
    shard: Any = None  # DTensor (FSDP2) parameters: gradproj.distributed.sharding.ShardedStep
    fused: Any = None  # compile=True: gradproj.optimizers.compiled.CompiledTail


_UNPROJECTED_RESIDUAL = NoResidual()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ProjectedOptimizer(Optimizer):
    """Gradient-projection optimizer composed of a projector, an inner rule and a residual rule.

    Subclasses (the presets in :mod:`gradproj.optimizers.presets`) choose the inner rule and the default
    residual; param groups choose the projection through GaLore's keys ``rank``, ``update_proj_gap``,
    ``scale`` (alias ``alpha``), ``proj_type`` and the gradproj keys ``projector`` and ``residual``.

    Options common to every preset:

    * ``impl``: ``"auto"`` (default), ``"torch"`` or ``"triton"`` — which kernels run the fused parts.
    * ``state_dtype``: ``None`` (default: the parameter's dtype, as torch.optim does) or ``torch.float32``
      to keep optimizer state in fp32 for bf16/fp16 parameters.
    * ``sampler``: a :class:`gradproj.LayerSampler` (LISA / OwLore) stepped at the end of every step; it
      frees the state of blocks it deactivates, and its state travels in ``state_dict()``.
    * ``stochastic_rounding``: ``False`` (default) or ``True`` to round bf16 weights stochastically after
      each update (unbiased, so updates below half a bf16 ulp are not lost); seeded from torch's RNG at
      the first step and kept in the state (see :func:`gradproj.kernels.rounding_seed`).
    * ``compile``: ``False`` (default), ``True`` or a dict of ``torch.compile`` arguments — run each
      parameter's per-step math (not the basis refresh) as one compiled graph; see
      :mod:`gradproj.optimizers.compiled`.

    DTensor parameters (FSDP2's ``fully_shard``) are stepped on each rank's rows; see
    :mod:`gradproj.distributed.sharding`.
    * ``norm_growth_limit``: ``None`` (default) or γ >= 1 — limit every parameter's update norm to grow by
      at most γ per step (Fira's limiter on the whole update; see :mod:`gradproj.residual.limiter`).
    * ``layerwise``: step each parameter inside its post-accumulate-grad hook and free its gradient at
      once (:mod:`gradproj.optimizers.layerwise`); ``accumulation_steps``: micro-batches per update there.
    * ``max_grad_norm`` (also a group key): clip each parameter's gradient to this norm before its update.
    * ``foreach``: ``None`` (default: for CUDA parameters), ``True`` or ``False`` — step the parameters whose
      step is a regular GaLore step together, in few kernel launches (:mod:`gradproj.optimizers.multi_tensor`).
    """

    inner_rule: ClassVar[type[InnerRule]] = Adam
    default_residual: ClassVar[str] = "none"
    default_moments_on_refresh: ClassVar[str] = "keep"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
        sampler: LayerSampler | None = None,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        **options: Any,
    ):
        check_layerwise_options(layerwise, accumulation_steps)
        self._layerwise = LayerwiseStepper(self, accumulation_steps) if layerwise else None
        self._inner = self.inner_rule()
        defaults: dict[str, Any] = {
            "lr": lr,
            "weight_decay": weight_decay,
            "impl": impl,
            "state_dtype": self._dtype_name(state_dtype),
            "proj_type": "std",
            "projector": "svd",
            "residual": self.default_residual,
            "moments_on_refresh": self.default_moments_on_refresh,
            "stochastic_rounding": False,
            "compile": False,
            "norm_growth_limit": None,
            "max_grad_norm": None,
            "foreach": None,
        }
        defaults.update(self._inner.defaults)
        allowed = set(defaults) | set(PROJECTION_KEYS) | _registered_option_keys()
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected option(s) {unknown}; "
                f"valid options are {sorted(allowed)}"
            )
        defaults.update(options)
        self._warned: set[int] = set()
        self._param_index: dict[int, int] = {}  # id(p) -> position among all parameters (seeds random bases)
        super().__init__(params, defaults)
        self.sampler = sampler
        if sampler is not None:
            sampler.attach(self)

    # ------------------------------------------------------------------------------------ validation
    @staticmethod
    def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
        if dtype is None or isinstance(dtype, str):
            if dtype not in STATE_DTYPES:
                raise ValueError(f"state_dtype={dtype!r}: use None, torch.float32, torch.bfloat16 or torch.float16")
            return dtype
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"state_dtype={dtype}: use None, torch.float32, torch.bfloat16 or torch.float16")
        return _DTYPE_NAMES[dtype]

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group, index = self.param_groups[-1], len(self.param_groups) - 1
        try:
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(f"param group {index}: a parameter of dtype {p.dtype} is not floating point")
            self._validate_group(group, index)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        for p in group["params"]:
            self._param_index.setdefault(id(p), len(self._param_index))
        if self._layerwise is not None:
            self._layerwise.register(index, group)

    def _validate_group(self, group: dict, index: int) -> None:
        """Check a group's options; cheap enough to run before every step (no per-parameter work)."""
        where = f"param group {index}"
        self._inner.validate_lr(group, where)
        if not float(group["weight_decay"]) >= 0.0:
            raise ValueError(f"{where}: weight_decay = {group['weight_decay']} must be >= 0")
        if group["impl"] not in kernels.IMPLS:
            raise ValueError(f"{where}: impl = {group['impl']!r}; use one of {', '.join(kernels.IMPLS)}")
        if group["state_dtype"] not in STATE_DTYPES:
            raise ValueError(f"{where}: state_dtype = {group['state_dtype']!r}; use None, 'float32', 'bfloat16' or 'float16'")
        if not isinstance(group["stochastic_rounding"], bool):
            raise ValueError(f"{where}: stochastic_rounding = {group['stochastic_rounding']!r} must be True or False")
        clip = group["max_grad_norm"]
        if clip is not None and not (isinstance(clip, (float, int)) and not isinstance(clip, bool) and clip > 0):
            raise ValueError(f"{where}: max_grad_norm = {clip!r} must be a positive number (or None: no clipping)")
        self._inner.validate_group(group, where)
        compiled.validate(group["compile"], self._inner.name, where)
        if group["compile"] and group["stochastic_rounding"]:
            raise ValueError(
                f"{where}: compile=True and stochastic_rounding=True cannot be combined (the compiled step rounds "
                "to nearest); drop one of them"
            )
        validate_norm_growth_limit(group, where)
        multi_tensor.check_option(group["foreach"], where)

        rank = group.get("rank")
        if rank is None:
            stray = [k for k in ("update_proj_gap", "scale", "alpha") if k in group]
            if stray:
                raise ValueError(
                    f"{where} sets {stray} but no 'rank', so it would not be projected; "
                    "add 'rank' to project it, or drop those keys"
                )
            return
        if not _is_int(rank) or rank <= 0:
            raise ValueError(f"{where}: rank = {rank!r} must be a positive integer")
        gap = group.get("update_proj_gap")
        if gap is None:
            raise ValueError(
                f"{where} has 'rank' but no 'update_proj_gap'; add it (GaLore uses 200), "
                "or build the groups with gradproj.param_groups()"
            )
        if not _is_int(gap) or gap <= 0:
            raise ValueError(f"{where}: update_proj_gap = {gap!r} must be a positive integer")
        if "scale" not in group and "alpha" not in group:
            raise ValueError(
                f"{where} has 'rank' but no 'scale' (alpha); add it (GaLore's recipe uses 0.25; the effective "
                "lr of a projected matrix is lr * scale), or build the groups with gradproj.param_groups()"
            )
        if "scale" in group and "alpha" in group and float(group["scale"]) != float(group["alpha"]):
            raise ValueError(
                f"{where} sets both scale={group['scale']} and alpha={group['alpha']}; they are the same "
                "option (alpha is Fira's spelling): keep one"
            )
        if group["moments_on_refresh"] not in MOMENT_RULES:
            raise ValueError(
                f"{where}: moments_on_refresh = {group['moments_on_refresh']!r}; use one of {', '.join(MOMENT_RULES)}"
            )
        if group["moments_on_refresh"] == "project" and self._inner.state_transforms is None:
            raise ValueError(
                f"{where}: moments_on_refresh='project' is not available for the {self._inner.name!r} inner rule "
                "(it does not say how its state changes basis); use 'keep' or 'reset'"
            )
        if group["proj_type"] not in PROJ_TYPES:
            raise ValueError(f"{where}: proj_type = {group['proj_type']!r}; use one of {', '.join(PROJ_TYPES)}")
        try:
            projector_cls = get_projector(group["projector"])
            residual_cls = get_residual(group["residual"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        projector_cls.validate_group(group, where)
        residual_cls().validate_group(group, where)

    # ------------------------------------------------------------------------------------------ plan
    @staticmethod
    def _scale(group: dict) -> float:
        return float(group["scale"] if "scale" in group else group["alpha"])

    def _plan(self, p: torch.Tensor, group: dict) -> _Plan:
        ops = kernels.resolve(group["impl"], p)
        rank = group.get("rank")
        if rank is None or p.dim() < 2:
            return _Plan(None, IdentityProjector((0, 0), 0, "std", group), _UNPROJECTED_RESIDUAL, 1.0, ops)
        m, n = p.shape[0], p.numel() // p.shape[0]
        if rank >= min(m, n) and group["projector"] != "identity":
            if id(p) not in self._warned:
                self._warned.add(id(p))
                log.warning(
                    "gradproj: rank %d >= min(%d, %d) for a parameter of shape %s: no memory can be saved, "
                    "so it trains unprojected (full-rank inner rule, scale 1)",
                    rank, m, n, tuple(p.shape),
                )
            return _Plan(None, IdentityProjector((m, n), 0, "std", group), _UNPROJECTED_RESIDUAL, 1.0, ops)
        projector = get_projector(group["projector"])((m, n), rank, group["proj_type"], group)
        projector.param_index = self._param_index.get(id(p), 0)
        return _Plan((m, n), projector, get_residual(group["residual"])(), self._scale(group), ops)

    # ------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        try:
            return self._step(closure)
        except BaseException:
            if self._layerwise is not None:  # per-layer mode: the failed step's window is abandoned (layerwise.py)
                self._layerwise.abandon(self)
            raise

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            self._validate_group(group, i)
        if self._layerwise is not None:  # the hooks stepped during backward; close the window
            self._layerwise.end_window(self)
        else:
            batch = multi_tensor.collect(self)  # foreach: regular GaLore steps, batched (multi_tensor.py)
            work = self._gather(skip=batch.ids)
            multi_tensor.run(self, batch)
            for p, grad, group, plan in work:
                self._step_param(p, kernels.reference.clip_by_norm(grad, group["max_grad_norm"]), group, plan)
        if self.sampler is not None:
            self.sampler.step(self)  # may switch blocks: frees the state of those it deactivates
        return loss

    def _step_param(self, p: torch.Tensor, grad: torch.Tensor, group: dict, plan: _Plan) -> None:
        """Update one parameter: :meth:`_update`, or for a DTensor the same on this rank's rows."""
        if plan.shard is None:
            self._update(p, grad, group, plan)
        else:  # gradproj.distributed.sharding: local tensors in, DTensor state kept
            plan.shard.update(self, p, grad, group, plan)

    def _gather(self, skip: frozenset = frozenset()) -> list[tuple[torch.Tensor, torch.Tensor, dict, _Plan]]:
        """Collect (param, grad, group, plan) and reject bad input before any state or weight changes;
        parameters whose id is in ``skip`` are left out (the batched ``foreach`` step takes them)."""
        work = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and id(p) not in skip:
                    work.append((p, p.grad, group, self._prepare(gi, pi, p, p.grad, group)))
        return work

    def _prepare(self, gi: int, pi: int, p: torch.Tensor, grad: torch.Tensor, group: dict) -> _Plan:
        """Check one parameter's gradient and derive its plan; raises before anything is modified."""
        where = f"param group {gi}, parameter {pi} (shape {tuple(p.shape)})"
        if grad.is_sparse:
            raise ValueError(
                f"{where} has a sparse gradient; gradproj optimizers need dense gradients (use "
                "torch.optim.SparseAdam, or nn.Embedding(sparse=False))"
            )
        try:
            plan = self._plan(p, group)
        except ValueError as err:  # e.g. impl='triton' where it cannot run
            raise ValueError(f"{where}: {err}") from None
        if is_dtensor(p):
            plan = shard_plan(plan, p, group, self._inner, f"param group {gi}, parameter {pi}")
        if group["compile"]:  # torch.compile fuses the tail itself: it runs the torch ops
            plan.fused = compiled.CompiledTail(group["compile"])
            plan.ops = kernels.reference
        if plan.projector.refreshes and not plan.projector.has_basis(self.state[p]):
            if not all_finite(grad):
                raise NonFiniteGradientError(
                    f"{where}: the gradient is NaN/Inf at its first basis refresh, so no basis can be computed; "
                    "nothing was updated. Check the loss scale / data, or clip gradients before optimizer.step()."
                )
        return plan

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, plan: _Plan, state: dict | None = None) -> None:
        """One parameter's update: the whole method, top to bottom (for a sharded parameter, on its local rows)."""
        state = self.state[p] if state is None else state
        step = state.get("step", 0)
        ctx = StepContext(
            step=step + 1,
            ops=plan.ops if plan.shard is None else plan.shard.ops(plan.ops),
            state_dtype=STATE_DTYPES[group["state_dtype"]] or p.dtype,
            param=p,
            scale=plan.scale,
        )
        proj = plan.projector
        G = grad if plan.shape2d is None else grad.reshape(plan.shape2d)
        if proj.needs_refresh(state, step) and proj.refresh(G, state, step) and step > 0:
            self._on_basis_change(state, group, step, proj)
        R = proj.down(G, state)
        state["step"] = step + 1
        if plan.fused is not None and plan.fused.run(self, p, G, R, state, group, plan, ctx):
            return  # compile=True: the lines below ran as one compiled graph
        U, step_size = self._inner.update(R, state, group, ctx)
        U, S = plan.residual.compute(G, R, U, proj, state, group, ctx)
        U, S = limit_update_growth(U, S, proj, state, group, ctx)
        with _matrix_view(p, plan.shape2d) as W:  # W -= s·scale·B(U) + s_res·S;  W -= decay_lr·wd·W
            ctx.ops.apply_update(W, proj, state, U, S, step_size, ctx.scale,
                                 residual_step=plan.residual.step_size(group, step_size),
                                 lr=self._inner.decay_lr(group, state), weight_decay=group["weight_decay"],
                                 seed=kernels.rounding_seed(state, group["stochastic_rounding"], W.dtype))

    def _on_basis_change(self, state: dict, group: dict, step: int, proj: Projector) -> None:
        """Apply the group's ``moments_on_refresh`` rule after a refresh replaced an existing basis.

        ``"keep"`` (the reference behaviour) carries the moments over unchanged; ``"reset"`` drops them,
        so the inner rule starts afresh (with its own bias correction) in the new subspace; ``"project"``
        maps them into the new basis (:mod:`gradproj.projectors.change`).
        """
        if group["moments_on_refresh"] == "reset":
            self._inner.reset_state(state, step)
        elif group["moments_on_refresh"] == "project":
            self._inner.project_state(state, proj.basis_change(state))

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        extra = self._extra_state()
        if extra:
            sd["gradproj"] = extra
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping every state tensor's saved dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts all floating *and integer* state to a floating
        parameter's dtype (fp32 moments of a bf16 weight, int32 indices, uint8 quantized moments). Here
        every tensor only moves to the parameter's device. The incoming groups are validated first, so a
        bad checkpoint leaves the optimizer untouched.
        """
        saved_groups = state_dict["param_groups"]
        for i, (current, saved) in enumerate(zip(self.param_groups, saved_groups)):
            merged = {**current, **{k: v for k, v in saved.items() if k != "params"}}
            self._validate_group(merged, i)
        self._check_extra_state(state_dict.get("gradproj", {}))
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # options added after the checkpoint was written: their defaults
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        for key, saved in state_dict["state"].items():
            p = id_map.get(key)
            if p is not None:
                self.state[p] = {k: _to_device(v, p) for k, v in saved.items()}
        self._load_extra_state(state_dict.get("gradproj", {}))

    def _extra_state(self) -> dict[str, Any]:
        """Optimizer-level state beyond per-parameter state (samplers, generators); tensors and scalars only."""
        extra: dict[str, Any] = {}
        if self.sampler is not None:
            extra["sampler"] = self.sampler.state_dict()
        return extra

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        """Raise before anything is loaded if the optimizer-level state cannot be restored."""
        if self.sampler is not None and "sampler" in extra:
            self.sampler.check_state_dict(extra["sampler"])

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        restore_sampler(self, extra.get("sampler"))


def _to_device(value: Any, p: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device=p.device, copy=True)
    if isinstance(value, dict):
        return {k: _to_device(v, p) for k, v in value.items()}
    return value


class _matrix_view:
    """Context manager yielding ``p`` as an in-place-writable [m, n] matrix (a view when contiguous)."""

    def __init__(self, p: torch.Tensor, shape2d: tuple[int, int] | None):
        self.p, self.shape2d = p, shape2d
        self.copy: torch.Tensor | None = None

    def __enter__(self) -> torch.Tensor:
        if self.shape2d is None:
            return self.p
        if self.p.is_contiguous():
            return self.p.view(self.shape2d)
        self.copy = self.p.reshape(self.shape2d).clone()
        return self.copy

    def __exit__(self, *exc: object) -> None:
        if self.copy is not None and exc[0] is None:
            self.p.copy_(self.copy.view(self.p.shape))


def _registered_option_keys() -> set[str]:
    """Group keys that registered projectors and residual rules understand."""
    from ..projectors import PROJECTORS
    from ..residual import RESIDUALS

    keys: set[str] = set()
    for cls in chain(PROJECTORS.values(), RESIDUALS.values()):
        keys.update(getattr(cls, "defaults", {}) or {})
    return keys
