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
import warnings
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
from ..state_layout import COMMON, Spec, state_problem
from ..validation import FOREIGN_GROUP_KEYS, check_bool, check_number, is_number, refuse_unknown
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
    #: why the parameter's projected state no longer fits its group (rank, proj_type or projector changed):
    #: the update restarts it (basis and inner state) at this step; None when it fits
    restart: str | None = None
    #: a first basis computed while the step's input was checked, before anything changed; the update
    #: installs it instead of refreshing
    first_basis: dict | None = None


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
        extra_group_keys: Iterable[str] = (),
        **options: Any,
    ):
        check_layerwise_options(layerwise, accumulation_steps)
        if isinstance(extra_group_keys, str) or not all(isinstance(k, str) for k in extra_group_keys):
            raise TypeError(f"extra_group_keys = {extra_group_keys!r} must be a list of key names")
        self._extra_group_keys = frozenset(extra_group_keys)
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
        refuse_unknown(options, set(defaults) | set(PROJECTION_KEYS) | _registered_option_keys(), type(self).__name__)
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
        refuse_unknown(group, self._group_keys(), where, "param-group key")
        self._inner.validate_lr(group, where)
        check_number(group["weight_decay"], "weight_decay", where, minimum=0.0)
        if group["impl"] not in kernels.IMPLS:
            raise ValueError(f"{where}: impl = {group['impl']!r}; use one of {', '.join(kernels.IMPLS)}")
        if not isinstance(group["state_dtype"], (str, type(None))) or group["state_dtype"] not in STATE_DTYPES:
            raise ValueError(f"{where}: state_dtype = {group['state_dtype']!r}; use None, 'float32', 'bfloat16' or 'float16'")
        check_bool(group["stochastic_rounding"], "stochastic_rounding", where)
        check_number(group["max_grad_norm"], "max_grad_norm", where, minimum=0.0, exclusive=True, allow_none=True,
                     hint="None means no clipping")
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
        for key in ("scale", "alpha"):
            if key in group:
                check_number(group[key], key, where, minimum=0.0, exclusive=True,
                             hint="the update of a projected matrix is multiplied by it (GaLore uses 0.25)")
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
        for key in ("projector", "residual", "proj_type"):
            if not isinstance(group[key], str):
                raise ValueError(f"{where}: {key} = {group[key]!r} must be a name (a string)")
        if group["proj_type"] not in PROJ_TYPES:
            raise ValueError(f"{where}: proj_type = {group['proj_type']!r}; use one of {', '.join(PROJ_TYPES)}")
        try:
            projector_cls = get_projector(group["projector"])
            residual_cls = get_residual(group["residual"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        projector_cls.validate_group(group, where)
        residual_cls().validate_group(group, where)

    def _group_keys(self) -> frozenset[str]:
        """Every key a param group may hold: options, projection keys, registered axes' options, keys that
        LR schedulers and torch write, and the user's ``extra_group_keys``."""
        from ..projectors import PROJECTORS
        from ..residual import RESIDUALS

        stamp = (len(PROJECTORS), len(RESIDUALS), len(self.defaults))
        cached = getattr(self, "_group_keys_cache", None)
        if cached is None or cached[0] != stamp:
            keys = frozenset(self.defaults) | set(PROJECTION_KEYS) | _registered_option_keys()
            cached = self._group_keys_cache = (stamp, keys | FOREIGN_GROUP_KEYS | self._extra_group_keys)
        return cached[1]

    # ------------------------------------------------------------------------------------------ plan
    @staticmethod
    def _scale(group: dict) -> float:
        return float(group["scale"] if "scale" in group else group["alpha"])

    def _plan(self, p: torch.Tensor, group: dict) -> _Plan:
        ops = kernels.resolve(group["impl"], p)
        rank = group.get("rank")
        if rank is None or p.dim() < 2 or p.numel() == 0:
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

    def _state_layout(self, p: torch.Tensor, group: dict, plan: _Plan) -> dict[str, Spec]:
        """Every state key ``p`` may hold under ``plan``, with its shape (see :mod:`gradproj.state_layout`)."""
        shape = tuple(p.shape) if plan.shape2d is None else tuple(plan.projector.low_rank_shape())
        return {
            **COMMON,
            "accum": Spec(shape),  # a layerwise accumulation window's summed low-rank gradient
            **plan.projector.state_layout(),
            **self._inner.state_layout(shape, group),
            **plan.residual.state_layout(),
        }

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
        if grad.shape != p.shape:
            raise ValueError(
                f"{where}: its gradient has shape {tuple(grad.shape)}; a gradient must have its parameter's shape "
                "(check what was assigned to .grad)"
            )
        try:
            plan = self._plan(p, group)
        except ValueError as err:  # e.g. impl='triton' where it cannot run
            raise ValueError(f"{where}: {err}") from None
        state = self.state.get(p, {})
        if state and not is_dtensor(p):
            plan.restart = state_problem(state, self._state_layout(p, group, plan))
        if is_dtensor(p):
            plan = shard_plan(plan, p, group, self._inner, f"param group {gi}, parameter {pi}")
        if group["compile"]:  # torch.compile fuses the tail itself: it runs the torch ops
            plan.fused = compiled.CompiledTail(group["compile"])
            plan.ops = kernels.reference
        proj = plan.projector
        if proj.refreshes and (plan.restart is not None or not proj.has_basis(state)):
            if plan.shard is not None:  # a sharded refresh talks to the other ranks: it runs in the update
                if not all_finite(grad):
                    raise NonFiniteGradientError(
                        f"{where}: the gradient is NaN/Inf at its first basis refresh, so no basis can be computed; "
                        "nothing was updated. Check the loss scale / data, or clip gradients before optimizer.step()."
                    )
            else:  # compute the first basis now, so that a failure raises before any parameter is stepped
                # the gradient the refresh in the update would see: clipped, except in a low-rank accumulation
                clip = None if self._layerwise is not None and self._layerwise.low_rank(plan) else group["max_grad_norm"]
                G = kernels.reference.clip_by_norm(grad, clip).reshape(plan.shape2d)
                scratch = {"step": state.get("step", 0)} if plan.restart is not None else dict(state)
                try:
                    proj.refresh(G, scratch, scratch["step"] if "step" in scratch else 0)
                except ValueError as err:
                    raise type(err)(f"{where}: {err}") from None
                plan.first_basis = {k: v for k, v in scratch.items() if state.get(k) is not v}
        return plan

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, plan: _Plan, state: dict | None = None) -> None:
        """One parameter's update: the whole method, top to bottom (for a sharded parameter, on its local rows)."""
        state = self.state[p] if state is None else state
        step = state.get("step", 0)
        if plan.restart is not None:
            self._restart(p, state, step, plan.restart)
        ctx = StepContext(
            step=step + 1,
            ops=plan.ops if plan.shard is None else plan.shard.ops(plan.ops),
            state_dtype=STATE_DTYPES[group["state_dtype"]] or p.dtype,
            param=p,
            scale=plan.scale,
        )
        proj = plan.projector
        G = grad if plan.shape2d is None else grad.reshape(plan.shape2d)
        self._refresh(G, state, group, step, plan)
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

    def _refresh(self, G: torch.Tensor, state: dict, group: dict, step: int, plan: _Plan) -> None:
        """Install the first basis computed in :meth:`_prepare`, or refresh the basis when it is due."""
        proj = plan.projector
        if plan.first_basis is not None:
            state.update(plan.first_basis)
            plan.first_basis = None
        elif proj.needs_refresh(state, step) and proj.refresh(G, state, step) and step > 0:
            self._on_basis_change(state, group, step, proj)

    def _restart(self, p: torch.Tensor, state: dict, step: int, why: str) -> None:
        """Drop a parameter's projected state (basis, inner and residual state) that no longer fits its group,
        keeping its step count: the update then starts afresh in a new subspace, with its own bias correction."""
        key = ("restart", step)  # one warning for all the parameters of a step
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"gradproj: at step {step} the optimizer state of some parameters no longer fits their param group "
                f"(e.g. shape {tuple(p.shape)}: its state {why}; was the group's rank, proj_type or projector "
                "changed?): their basis and moments restart at this step",
                stacklevel=4,
            )
        kept = {k: state[k] for k in ("sr_seed",) if k in state}
        state.clear()
        state.update(step=step, **kept)
        self._inner.reset_state(state, step)

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

    def load_state_dict(self, state_dict: dict[str, Any], *, strict: bool = True) -> None:
        """Load a state dict, keeping every state tensor's saved dtype; check all of it first.

        ``torch.optim.Optimizer.load_state_dict`` casts all floating *and integer* state to a floating
        parameter's dtype (fp32 moments of a bf16 weight, int32 indices, uint8 quantized moments). Here
        every tensor only moves to the parameter's device. Before anything is loaded, the incoming groups are
        validated like groups passed to the constructor, and every parameter's state is checked against its
        parameter and (incoming) group: keys, shapes, kinds, DCT index ranges (:mod:`gradproj.state_layout`).
        A bad checkpoint raises ``ValueError`` and leaves the optimizer untouched.

        As in torch.optim, the incoming groups' options replace the current ones. A state dict written by a
        ``torch.optim`` optimizer (e.g. ``AdamW``) would turn every projected group into an unprojected one: that
        raises unless ``strict=False``, which loads it with a warning (its torch-only options are dropped).
        """
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("load_state_dict: expected an optimizer state dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"load_state_dict: the state dict has {len(saved_groups)} param groups, this optimizer "
                f"{len(self.param_groups)}; build the optimizer with the groups it was saved with"
            )
        groups = [self._incoming_group(i, saved, strict) for i, saved in enumerate(saved_groups)]
        self._check_extra_state(state_dict.get("gradproj", {}))
        params = {}  # saved id -> (group index, position, parameter)
        for gi, (current, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for pi, (key, p) in enumerate(zip(saved["params"], current["params"])):
                params[key] = (gi, pi, p)
        state = {}
        for key, saved in state_dict["state"].items():
            if key not in params:
                raise ValueError(
                    f"load_state_dict: the state dict holds state for parameter {key!r}, which none of its param "
                    "groups lists"
                )
            gi, pi, p = params[key]
            state[key] = self._incoming_state(gi, pi, p, groups[gi], saved)
        torch_groups = [{**g, "params": saved["params"]} for g, saved in zip(groups, saved_groups)]
        super().load_state_dict({"state": {}, "param_groups": torch_groups})
        for group in self.param_groups:  # options added after the checkpoint was written: their defaults
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        for key, saved in state.items():
            gi, pi, p = params[key]
            self.state[p] = {k: _to_device(v, p) for k, v in saved.items()}
        self._load_extra_state(state_dict.get("gradproj", {}))
        if self._layerwise is not None:  # a window open before the load belongs to the old state
            self._layerwise._new_window()

    #: options of torch.optim's Adam-family optimizers that gradproj does not have
    _TORCH_ONLY_KEYS = frozenset({"amsgrad", "maximize", "capturable", "fused", "decoupled_weight_decay"})

    def _incoming_group(self, index: int, saved: dict, strict: bool) -> dict:
        """The group a checkpoint's group ``index`` becomes: its options over the defaults, validated."""
        where = f"load_state_dict: param group {index}"
        current = self.param_groups[index]
        if len(saved.get("params", ())) != len(current["params"]):
            raise ValueError(
                f"{where} holds {len(saved.get('params', ()))} parameters, the optimizer's {len(current['params'])}; "
                "build the optimizer with the groups it was saved with"
            )
        options = {k: v for k, v in saved.items() if k != "params"}
        foreign = sorted(self._TORCH_ONLY_KEYS & set(options))
        if foreign or ("rank" in current and "rank" not in options):
            what = (f"was written by a torch.optim optimizer (it has {', '.join(foreign)})" if foreign
                    else "has no 'rank'")
            message = (f"{where} {what}, while the optimizer's group {index} projects with rank={current.get('rank')}; "
                       "loading it makes that group train unprojected (full-rank state) from here on")
            if "rank" not in current or "rank" in options:
                message = f"{where} {what}; its torch-only options are dropped"
            if strict:
                raise ValueError(f"{message}. Load a checkpoint of this gradproj optimizer, or pass strict=False to "
                                 "load it anyway")
            warnings.warn(f"gradproj: {message}", stacklevel=4)
            options = {k: v for k, v in options.items() if k not in self._TORCH_ONLY_KEYS}
        group = {**self.defaults, **options, "params": current["params"]}
        self._validate_group(group, index)
        return group

    def _incoming_state(self, gi: int, pi: int, p: torch.Tensor, group: dict, saved: Any) -> dict:
        """A checkpoint's state of one parameter, checked against the parameter and its incoming group."""
        where = f"load_state_dict: param group {gi}, parameter {pi} (shape {tuple(p.shape)})"
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: its state is a {type(saved).__name__}, expected a dict")
        saved = dict(saved)
        step = saved.get("step")
        if isinstance(step, torch.Tensor) and step.numel() == 1:  # torch.optim keeps the step as a tensor
            saved["step"] = int(step.item())
        try:
            plan = self._plan(p, group)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        problem = state_problem(saved, self._state_layout(p, group, plan), deep=True)
        if problem is None and saved and plan.projector.refreshes and not plan.projector.has_basis(saved) and any(
                k in saved for k in self._inner.state_keys):
            problem = "holds inner-rule state but no basis"
        if problem is not None:
            raise ValueError(
                f"{where}: the saved state {problem}. The checkpoint was written for another model, another "
                "parameter order or other group options (rank, proj_type, projector, inner rule); nothing was loaded"
            )
        return saved

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
