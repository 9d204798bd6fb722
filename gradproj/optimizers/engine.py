"""The engine: one definition of a parameter's step, shared by every mode.

For each parameter with a gradient, one step is::

    P        = projector.refresh(G) when t % T == 0 (or no basis yet)     # svd | identity | ...
               (refresh_stagger: t % T == matrix's offset; projectors/schedule.py)
    R        = projector.down(G)                                            # r x n or m x r
    U, s     = inner.update(R, state)                                       # group key inner: adam | ...
    U, S     = residual.compute(G, R, U)                                    # group key residual: fira | ...
    U, S     = limit growth of ‖scale · B(U) + S‖ (group option norm_growth_limit)
    W       -= s · scale · projector.up(U) + s_res · S                      # s_res: s, or lr for FRUGAL;
    W       -= decay_lr · weight_decay · W                                  # ops.apply_update, full space

Parameters of groups without ``rank``, 1-D tensors, and matrices whose rank would cover the whole space
take the same path with the identity projector, ``scale`` 1 and no residual: exactly AdamW (for the Adam
inner rule) with GaLore's placement of the weight decay.

:class:`Engine` is the public interface the step modes build on — the per-parameter loop of
``optimizer.step()``, per-layer stepping (:mod:`.layerwise`), the batched step (:mod:`.multi_tensor`), the
compiled tail (:mod:`.compiled`) and FSDP2's sharded step (:mod:`gradproj.optimizers.sharding`):

* :meth:`Engine.validate_group` — apply the schema to a param group (defaults, checks, unknown keys);
* :meth:`Engine.plan` / :meth:`Engine.prepare` — how one parameter is stepped, with every check that must
  pass before anything changes;
* :meth:`Engine.update` — one parameter's whole update; :meth:`Engine.refresh` /
  :meth:`Engine.on_basis_change` / :meth:`Engine.restart` — the basis and what happens to the state.

Every option is declared once (:data:`OPTIMIZER_OPTIONS`, :data:`PROJECTION_OPTIONS` and each axis's
``options``; see :mod:`gradproj.options`).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import kernels
from ..inner import INNER_RULES, InnerRule, StepContext
from ..options import ABSENT, Option, boolean, choice, number, option_names
from ..projectors import PROJ_TYPES, PROJECTORS, IdentityProjector, Projector, get_projector
from ..projectors import schedule as refresh_schedule
from ..projectors.base import PROJ_DTYPES, NonFiniteGradientError
from ..residual import RESIDUALS, NoResidual, Residual, get_residual, limit_update_growth
from ..residual.limiter import NORM_GROWTH_KEY, check_growth_limit
from ..state_layout import COMMON, Spec, scalar_int, state_problem
from ..validation import FOREIGN_GROUP_KEYS, refuse_unknown
from . import compiled, multi_tensor
from .sharding import all_finite, is_dtensor, shard_plan

if TYPE_CHECKING:
    from ..kernels.protocol import KernelOps
    from .base import ProjectedOptimizer

#: what happens to the inner rule's state when a refresh replaces the basis
MOMENT_RULES = ("keep", "reset", "project")
STATE_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _name(value: Any, name: str, where: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name} = {value!r} must be a name (a string)")


def _registered(registry: dict, what: str) -> Any:
    def check(value: Any, name: str, where: str) -> None:
        _name(value, name, where)
        if value not in registry:
            raise ValueError(f"{where}: unknown {what} {value!r}; available: {', '.join(sorted(registry))}")

    return check


def _positive_int(value: Any, name: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: {name} = {value!r} must be a positive integer")


def _state_dtype(value: Any, name: str, where: str) -> None:
    if not isinstance(value, (str, type(None))) or value not in STATE_DTYPES:
        raise ValueError(f"{where}: {name} = {value!r}; use None, 'float32', 'bfloat16' or 'float16'")


def _proj_dtype(value: Any, name: str, where: str) -> None:
    if not isinstance(value, (str, type(None))) or (value != "auto" and value not in PROJ_DTYPES):
        raise ValueError(
            f"{where}: {name} = {value!r}; use 'auto' (chosen per matrix by measurement), None (the parameter's "
            "dtype), 'bfloat16' or 'float16'"
        )


def _impl(value: Any, name: str, where: str) -> None:
    if not isinstance(value, str) or value not in kernels.IMPLS:
        raise ValueError(f"{where}: {name} = {value!r}; use one of {', '.join(kernels.IMPLS)}")


#: the options every gradproj optimizer reads from every group (``inner``'s and ``residual``'s defaults
#: are the preset's; ``lr`` is checked by the inner rule, which may allow None)
OPTIMIZER_OPTIONS: tuple[Option, ...] = (
    Option("lr", 1e-3, "learning rate (of a projected matrix: `lr · scale`)"),
    Option("weight_decay", 0.0, "decoupled weight decay, applied after the update", number(minimum=0.0)),
    Option("inner", "adam", "the update rule in the subspace (the preset's; any registered rule)"),
    Option(
        "projector",
        "randomized_svd",
        "the basis of projected groups (`'svd'` with `refresh_stagger=False`: galore-torch's, bit for bit)",
        _registered(PROJECTORS, "projector"),
    ),
    Option(
        "residual", "none", "what to do with the discarded gradient (the preset's)", _registered(RESIDUALS, "residual")
    ),
    Option("proj_type", "std", "the projected side (`std`: the longer side away)", choice(*PROJ_TYPES)),
    Option(
        "moments_on_refresh", "keep", "the inner state at a refresh: keep, reset or project it", choice(*MOMENT_RULES)
    ),
    Option(
        "refresh_stagger",
        True,
        "spread the matrices' basis refreshes over the `update_proj_gap` steps (matrix k of N at offset k·T/N) "
        "instead of refreshing all at one step (False: galore-torch's schedule)",
        boolean,
    ),
    Option("impl", "auto", "kernels of the fused parts: `auto`, `torch` or `triton`", _impl),
    Option("state_dtype", None, "dtype of the optimizer state (None: the parameter's)", _state_dtype),
    Option(
        "proj_dtype",
        "auto",
        "dtype of the projection GEMMs `down` and `up`: `auto` (bfloat16, or on a CPU with bfloat16 instructions "
        "float32 GEMMs with bfloat16 inputs, for a float32 matrix only where its projections take ≥ 0.1 ms and that "
        "measures ≥ 10 % faster on this machine; decided once, kept in the state), None (the parameter's), "
        "`bfloat16`, `float16`",
        _proj_dtype,
    ),
    Option("stochastic_rounding", False, "round bf16 weights stochastically after each update", boolean),
    Option("compile", False, "run the per-step math as one `torch.compile` graph (True or its arguments)"),
    Option(
        NORM_GROWTH_KEY,
        None,
        "limit each update's norm to grow by at most γ per step (None: off)",
        lambda v, name, where: check_growth_limit(v, name, where),
    ),
    Option(
        "max_grad_norm",
        None,
        "clip each parameter's gradient to this norm before its update (None: off)",
        number(minimum=0.0, exclusive=True, allow_none=True),
    ),
    Option(
        "foreach",
        None,
        "step regular GaLore steps batched (None: on CUDA, and on the CPU where it measures faster per shape)",
        lambda v, name, where: multi_tensor.check_option(v, where),
    ),
)

#: the keys that make a group projected; absent from unprojected groups (GaLore's keys)
PROJECTION_OPTIONS: tuple[Option, ...] = (
    Option("rank", ABSENT, "rank of the subspace; a group without it is not projected", _positive_int),
    Option("update_proj_gap", ABSENT, "steps between basis refreshes (GaLore uses 200)", _positive_int),
    Option(
        "scale",
        ABSENT,
        "multiplies the update of a projected matrix (GaLore uses 0.25)",
        number(minimum=0.0, exclusive=True, hint="the update of a projected matrix is multiplied by it"),
    ),
    Option(
        "alpha",
        ABSENT,
        "Fira's spelling of `scale`",
        number(minimum=0.0, exclusive=True, hint="the update of a projected matrix is multiplied by it"),
    ),
)
PROJECTION_KEYS = tuple(o.name for o in PROJECTION_OPTIONS)


@dataclass
class Plan:
    """How one parameter is stepped, derived from its shape and group (never stored in state)."""

    shape2d: tuple[int, int] | None  # None: the update runs on the tensor's own shape (unprojected)
    projector: Projector
    residual: Residual
    scale: float
    ops: KernelOps  # the kernel operations chosen by the group's impl for this tensor
    inner: InnerRule
    shard: Any = None  # DTensor (FSDP2) parameters: gradproj.optimizers.sharding.ShardedStep
    fused: Any = None  # compile=True: gradproj.optimizers.compiled.CompiledTail
    #: why the parameter's state no longer fits its group (rank, proj_type or projector changed): the update
    #: restarts it (basis and inner state) at this step; None when it fits
    restart: str | None = None
    #: a first basis computed while the step's input was checked, before anything changed; the update
    #: installs it instead of refreshing
    first_basis: dict | None = None
    #: R computed by the caller (gradproj.project_backward: the weight's gradient arrived projected, already
    #: clipped); the update then neither refreshes nor projects, and reads no full gradient
    low_rank_grad: torch.Tensor | None = None
    #: ``refresh_stagger``: the offset this matrix stores with its basis (gradproj.projectors.schedule)
    refresh_offset: int = 0
    #: ``adam_kernel="fused"`` with the torch reference's kernels on a projected matrix with weight decay, where the
    #: folded form measured faster for its shape: the decay rides in the back-projection GEMM as its beta
    #: (:func:`gradproj.kernels.reference.apply_update_decay_in_gemm`)
    fold_decay: bool = False

    @property
    def dense(self) -> bool:
        """An unprojected parameter stepped on its own tensor (not sharded)."""
        return self.shape2d is None and self.shard is None


_UNPROJECTED_RESIDUAL = NoResidual()


class Engine:
    """The step of a :class:`~gradproj.optimizers.base.ProjectedOptimizer`, one parameter at a time.

    ``optimizer.engine`` is the whole interface that the step modes use; none of them reaches into the
    optimizer itself.
    """

    def __init__(self, optimizer: ProjectedOptimizer, inner_rule: type[InnerRule], extra_group_keys: frozenset[str]):
        self._optimizer = weakref.ref(optimizer)
        #: the preset's inner rule (registered or not) and its name, the default of the group key ``inner``
        self.inner_rule = inner_rule
        self.default_inner = inner_rule.name
        self.extra_group_keys = extra_group_keys
        self._inners: dict[str, InnerRule] = {}
        self._warned: set = set()
        self._keys: tuple[tuple, frozenset[str]] | None = None
        #: id(group) -> (the group's options when last validated, a version number that changes with them)
        self._validated: dict[int, tuple[tuple, int]] = {}
        self._versions = 0
        #: id(p) -> (group version, shape) under which p's state was last found to fit its layout
        self._fits: dict[int, tuple[int, tuple[int, ...]]] = {}
        #: id(p) -> the parameter's position among all parameters (seeds random bases)
        self.param_index: dict[int, int] = {}
        #: id(p) -> (what its plan was derived from, the plan): reused while the group's options, the
        #: parameter's shape, dtype and device stay the same (copied per step: a step writes into its plan)
        self._plans: dict[int, tuple[tuple, Plan]] = {}
        #: per-layer stepping (gradproj.optimizers.layerwise.LayerwiseStepper), or None
        self.layerwise: Any = None
        #: gradproj.project_backward's handle (gradproj.optimizers.projected_backward), or None: its ``gather``
        #: adds the weights whose gradient arrived projected, with ``Plan.low_rank_grad`` set
        self.projected_backward: Any = None

    @property
    def optimizer(self) -> ProjectedOptimizer:
        opt = self._optimizer()
        assert opt is not None, "the optimizer of this engine no longer exists"
        return opt

    # ------------------------------------------------------------------------------------------ rules
    def inner(self, group: dict) -> InnerRule:
        """The inner rule of ``group`` (one instance per rule name; rules keep no per-parameter attributes)."""
        name = group.get("inner", self.default_inner)
        rule = self._inners.get(name)
        if rule is None:
            rule = self._inners[name] = (self.inner_rule if name == self.default_inner else INNER_RULES[name])()
        return rule

    @staticmethod
    def scale(group: dict) -> float:
        return float(group["scale"] if "scale" in group else group["alpha"])

    # ------------------------------------------------------------------------------------- validation
    def group_keys(self) -> frozenset[str]:
        """Every key a param group may hold: the declared options of the optimizer and of every registered
        axis, the keys LR schedulers and torch write, and the user's ``extra_group_keys``."""
        stamp = (len(PROJECTORS), len(RESIDUALS), len(INNER_RULES))
        if self._keys is None or self._keys[0] != stamp:
            keys = {o.name for o in OPTIMIZER_OPTIONS} | set(PROJECTION_KEYS)
            keys |= option_names(PROJECTORS.values()) | option_names(RESIDUALS.values())
            keys |= option_names([*INNER_RULES.values(), self.inner_rule])
            self._keys = (stamp, frozenset(keys | FOREIGN_GROUP_KEYS | self.extra_group_keys))
        return self._keys[1]

    def validate_group(self, group: dict, index: int) -> None:
        """Apply the schema to ``group``: write missing defaults, check every value, refuse unknown keys.

        Cheap enough to run before every step (no per-parameter work). Raises ``ValueError`` (``TypeError``
        for an unknown key) naming the group and the option.
        """
        where = f"param group {index}"
        seen = self._validated.get(id(group))
        if seen is not None and seen[0] == _fingerprint(group):  # nothing but lr changed since the last check
            self.inner(group).validate_lr(group, where)
            return
        self._check_group(group, where)
        self._versions += 1
        self._validated[id(group)] = (_fingerprint(group), self._versions)

    def group_version(self, group: dict) -> int:
        """A number that changes whenever a validated group's options (other than ``lr``) change."""
        seen = self._validated.get(id(group))
        return -1 if seen is None else seen[1]

    def forget_checks(self) -> None:
        """Check every group and every parameter's state in full at the next step (after a load)."""
        self._validated.clear()
        self._fits.clear()
        self._plans.clear()

    def _check_group(self, group: dict, where: str) -> None:
        refuse_unknown(group, self.group_keys(), where, "param-group key")
        for option in OPTIMIZER_OPTIONS:
            if option.name not in group:
                group[option.name] = self.default_inner if option.name == "inner" else option.default
            if option.check is not None:
                option.check(group[option.name], option.name, where)
        if group["inner"] != self.default_inner:
            _registered(INNER_RULES, "inner rule")(group["inner"], "inner", where)
        inner = self.inner(group)
        inner.apply_options(group, where)
        inner.validate_lr(group, where)
        inner.validate_group(group, where)
        compiled.validate(group["compile"], inner.name, where)
        if group["compile"] and group["stochastic_rounding"]:
            raise ValueError(
                f"{where}: compile=True and stochastic_rounding=True cannot be combined (the compiled step rounds "
                "to nearest); drop one of them"
            )
        if group.get("rank") is None:
            stray = [k for k in ("update_proj_gap", "scale", "alpha") if k in group]
            if stray:
                raise ValueError(
                    f"{where} sets {stray} but no 'rank', so it would not be projected; "
                    "add 'rank' to project it, or drop those keys"
                )
            return
        for option in PROJECTION_OPTIONS:
            if option.name in group:
                assert option.check is not None  # every projection option declares its check
                option.check(group[option.name], option.name, where)
        if "update_proj_gap" not in group:
            raise ValueError(
                f"{where} has 'rank' but no 'update_proj_gap'; add it (GaLore uses 200), "
                "or build the groups with gradproj.param_groups()"
            )
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
        if group["moments_on_refresh"] == "project" and inner.state_transforms is None:
            raise ValueError(
                f"{where}: moments_on_refresh='project' is not available for the {inner.name!r} inner rule "
                "(it does not say how its state changes basis); use 'keep' or 'reset'"
            )
        projector_cls, residual_cls = get_projector(group["projector"]), get_residual(group["residual"])
        if group.get("basis_bits") is not None and "basis_bits" not in projector_cls.defaults:
            quantizable = sorted(name for name, cls in PROJECTORS.items() if "basis_bits" in cls.defaults)
            raise ValueError(
                f"{where}: basis_bits = {group['basis_bits']!r} quantizes a dense basis, which projector="
                f"{group['projector']!r} does not store; use one of {', '.join(quantizable)}, or basis_bits=None"
            )
        if group["proj_dtype"] not in (None, "auto") and not projector_cls.dense_basis:
            dense = sorted(name for name, cls in PROJECTORS.items() if cls.dense_basis and cls.refreshes)
            raise ValueError(
                f"{where}: proj_dtype = {group['proj_dtype']!r} sets the dtype of the GEMMs with a stored dense "
                f"basis, which projector={group['projector']!r} does not keep; use one of {', '.join(dense)}, "
                "or proj_dtype=None / 'auto'"
            )
        projector_cls.apply_options(group, where)
        projector_cls.validate_group(group, where)
        if group.get("refresh", "fixed") != "fixed" and "refresh" not in projector_cls.defaults:
            raise ValueError(
                f"{where}: refresh={group['refresh']!r} applies to the SVD-family bases (svd, eigh, randomized_svd, "
                f"golore); projector={group['projector']!r} refreshes every update_proj_gap steps: drop refresh"
            )
        residual_cls.apply_options(group, where)
        residual_cls().validate_group(group, where)

    # ------------------------------------------------------------------------------------------ plan
    def plan(self, p: torch.Tensor, group: dict) -> Plan:
        """How ``p`` is stepped under ``group``: its 2-D shape, projector, residual, scale and kernels.

        Derived once per parameter and group version (:meth:`group_version`), then copied each step."""
        key = (self.group_version(group), id(group), p.shape, p.dtype, p.device, self.param_index.get(id(p), 0))
        cached = self._plans.get(id(p))
        if cached is None or cached[0] != key or key[0] < 0:
            plan = self._plan(p, group)
            if not plan.projector.reusable:
                return plan
            cached = self._plans[id(p)] = (key, plan)
        copy = object.__new__(Plan)  # a shallow copy (dataclasses.replace re-runs __init__ field by field)
        copy.__dict__.update(cached[1].__dict__)
        return copy

    def _plan(self, p: torch.Tensor, group: dict) -> Plan:
        ops = kernels.resolve(group["impl"], p)
        inner = self.inner(group)
        rank = group.get("rank")
        if rank is None or p.dim() < 2 or p.numel() == 0:
            return Plan(None, IdentityProjector((0, 0), 0, "std", group), _UNPROJECTED_RESIDUAL, 1.0, ops, inner)
        m, n = p.shape[0], p.numel() // p.shape[0]
        if rank >= min(m, n) and group["projector"] != "identity":
            key = ("full rank", rank, m, n)
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"gradproj: rank {rank} >= min({m}, {n}) for a parameter of shape {tuple(p.shape)}: no memory can "
                    "be saved, so it trains unprojected (full-rank inner rule, scale 1); lower the rank or leave "
                    "this matrix out of the projected group",
                    stacklevel=5,
                )
            return Plan(None, IdentityProjector((m, n), 0, "std", group), _UNPROJECTED_RESIDUAL, 1.0, ops, inner)
        projector = get_projector(group["projector"])((m, n), rank, group["proj_type"], group)
        projector.param_index = self.param_index.get(id(p), 0)
        plan = Plan((m, n), projector, get_residual(group["residual"])(), self.scale(group), ops, inner)
        plan.fold_decay = (
            group.get("adam_kernel") == "fused"
            and group["weight_decay"] != 0.0
            and ops.apply_update is kernels.reference.apply_update
            and not is_dtensor(p)  # FSDP2 steps local rows through its own ops (unfolded)
            and kernels.reference.decay_in_gemm_pays_for(p, plan.projector)
        )
        if group["refresh_stagger"] and projector.refreshes:
            matrices = [q for q in group["params"] if self._projected_matrix(q, group)]
            k = next(i for i, q in enumerate(matrices) if q is p)
            plan.refresh_offset = refresh_schedule.offset(k, len(matrices), projector.update_proj_gap)
        return plan

    @staticmethod
    def _projected_matrix(p: torch.Tensor, group: dict) -> bool:
        """Whether :meth:`_plan` projects ``p`` under ``group`` (a projected group's rank, not full rank)."""
        if p.dim() < 2 or p.numel() == 0:
            return False
        m, n = p.shape[0], p.numel() // p.shape[0]
        return group["rank"] < min(m, n) or group["projector"] == "identity"

    def state_layout(self, p: torch.Tensor, group: dict, plan: Plan) -> dict[str, Spec]:
        """Every state key ``p`` may hold under ``plan``, with its shape (see :mod:`gradproj.state_layout`)."""
        shape = tuple(p.shape) if plan.shape2d is None else tuple(plan.projector.low_rank_shape())
        return {
            **COMMON,
            "accum": Spec(shape),  # a layerwise accumulation window's summed low-rank gradient
            **plan.projector.state_layout(),
            **({refresh_schedule.OFFSET_KEY: scalar_int()} if plan.projector.refreshes else {}),
            **plan.inner.state_layout(shape, group),
            **plan.residual.state_layout(),
        }

    def gather(self, skip: frozenset = frozenset()) -> list[tuple[torch.Tensor, torch.Tensor, dict, Plan]]:
        """Collect (param, grad, group, plan) of every parameter with a gradient and reject bad input before any
        state or weight changes; parameters whose id is in ``skip`` are left out (the batched step takes them)."""
        work = []
        for gi, group in enumerate(self.optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and id(p) not in skip:
                    work.append((p, p.grad, group, self.prepare(gi, pi, p, p.grad, group)))
        if self.projected_backward is not None:
            work += self.projected_backward.gather(self)
        return work

    def prepare(self, gi: int, pi: int, p: torch.Tensor, grad: torch.Tensor, group: dict) -> Plan:
        """Check one parameter's gradient and state and derive its plan; raises before anything is modified.

        A first basis (or the basis of a restarted state) is computed here, so that a gradient it cannot be
        computed from raises before any parameter of the step is updated.
        """
        where = _Where(gi, pi, p)
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
            plan = self.plan(p, group)
        except ValueError as err:  # e.g. impl='triton' where it cannot run
            raise ValueError(f"{where}: {err}") from None
        state = self.optimizer.state.get(p, {})
        if state and not is_dtensor(p):
            # the state's layout follows from the group's options and the shape: checked again when they change
            fits = (self.group_version(group), tuple(p.shape))
            if self._fits.get(id(p)) != fits:
                plan.restart = state_problem(state, self.state_layout(p, group, plan))
                if plan.restart is None and fits[0] >= 0:
                    self._fits[id(p)] = fits
        if is_dtensor(p):
            plan = shard_plan(plan, p, group, plan.inner, f"param group {gi}, parameter {pi}")
        if group["compile"]:  # torch.compile fuses the tail itself: it runs the torch ops
            plan.fused = compiled.CompiledTail(group["compile"])
            plan.ops = kernels.reference  # type: ignore[assignment]  # a dense S only: see kernels.resolve
        proj = plan.projector
        if proj.refreshes and (plan.restart is not None or not proj.has_basis(state)):
            if plan.shard is not None:  # a sharded refresh talks to the other ranks: it runs in the update
                if not all_finite(grad):
                    raise NonFiniteGradientError(
                        f"{where}: the gradient is NaN/Inf at its first basis refresh, so no basis can be computed; "
                        "nothing was updated. Check the loss scale / data, or clip gradients before optimizer.step()."
                    )
            else:
                # the gradient the refresh in the update would see: clipped, except in a low-rank accumulation
                low_rank = self.layerwise is not None and self.layerwise.low_rank(plan)
                G = kernels.reference.clip_by_norm(grad, None if low_rank else group["max_grad_norm"])
                scratch = {"step": state.get("step", 0)} if plan.restart is not None else dict(state)
                assert plan.shape2d is not None  # a projector that refreshes: a projected matrix
                try:
                    proj.refresh(G.reshape(plan.shape2d), scratch, scratch.get("step", 0))
                except ValueError as err:
                    raise type(err)(f"{where}: {err}") from None
                plan.first_basis = {k: v for k, v in scratch.items() if state.get(k) is not v}
        return plan

    # ------------------------------------------------------------------------------------------ update
    def step_param(self, p: torch.Tensor, grad: torch.Tensor, group: dict, plan: Plan) -> None:
        """Update one parameter: :meth:`update`, or for a DTensor the same on this rank's rows."""
        if plan.shard is None:
            self.update(p, grad, group, plan)
        else:  # gradproj.optimizers.sharding: local tensors in, DTensor state kept
            plan.shard.update(self, p, grad, group, plan)

    def update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, plan: Plan, state: dict | None = None) -> None:
        """One parameter's update: the whole method, top to bottom (for a sharded parameter, on its local rows)."""
        state = self.optimizer.state[p] if state is None else state
        step = state.get("step", 0)
        if plan.restart is not None:
            self.restart(p, state, step, plan.restart, plan.inner)
        inner = plan.inner
        proj = plan.projector
        G = grad if plan.shape2d is None or grad.shape == plan.shape2d else grad.reshape(plan.shape2d)
        if plan.low_rank_grad is None:
            self.refresh(G, state, group, step, plan)
            R = proj.down(G, state)
        else:  # projected backward: R came from the backward pass, no refresh due (G is a meta placeholder)
            R = plan.low_rank_grad
        ctx = StepContext(
            step=step + 1,
            ops=plan.ops if plan.shard is None else plan.shard.ops(plan.ops),
            state_dtype=STATE_DTYPES[group["state_dtype"]] or p.dtype,
            param=p,
            scale=plan.scale,
            # the default dense projection returns a new tensor (a projector stand-in or the identity may not), and
            # no residual rule reads R after the inner update
            r_owned=R is not G
            and plan.low_rank_grad is None
            and plan.shard is None
            and type(proj).down is Projector.down
            and type(plan.residual) is NoResidual,
        )
        state["step"] = step + 1
        if plan.fused is not None and plan.fused.run(self, p, G, R, state, group, plan, ctx):
            return  # compile=True: the lines below ran as one compiled graph
        if plan.dense and multi_tensor.dense_step_applies(self.optimizer, p, grad, group, state):
            return multi_tensor.step_dense(self.optimizer, p, grad, group, state)  # torch's fused AdamW kernel
        if (  # a rule that steps the weight itself (the compiled 8-bit update): no U, one pass over W
            plan.dense
            and type(plan.residual) is NoResidual
            and group.get(NORM_GROWTH_KEY) is None
            and ctx.ops.apply_update is kernels.reference.apply_update
            and inner.step_weight(p.detach(), R, state, group, ctx)
        ):
            return
        U, step_size = inner.update(R, state, group, ctx)
        U, S = plan.residual.compute(G, R, U, proj, state, group, ctx)
        U, S = limit_update_growth(U, S, proj, state, group, ctx)
        with matrix_view(p, plan.shape2d) as W:  # W -= s·scale·B(U) + s_res·S;  W -= decay_lr·wd·W
            lr, wd = inner.decay_lr(group, state), group["weight_decay"]
            seed = kernels.rounding_seed(state, group["stochastic_rounding"], W.dtype)
            if (  # the decay as the GEMM's beta where the torch reference's kernels run the plain update
                plan.fold_decay
                and plan.shard is None
                and S is None
                and seed is None
                and kernels.reference.apply_update_decay_in_gemm(W, proj, state, U, step_size, ctx.scale, lr, wd)
            ):
                return
            ctx.ops.apply_update(
                W,
                proj,
                state,
                U,
                S,
                step_size,
                ctx.scale,
                residual_step=plan.residual.step_size(group, step_size),
                lr=lr,
                weight_decay=wd,
                seed=seed,
            )

    def refresh(self, G: torch.Tensor, state: dict, group: dict, step: int, plan: Plan) -> None:
        """Install the first basis computed in :meth:`prepare`, or refresh the basis when it is due."""
        proj = plan.projector
        if plan.first_basis is not None:
            state.update(plan.first_basis)
            plan.first_basis = None
        elif proj.needs_refresh(state, step) and proj.refresh(G, state, step) and step > 0:
            self.on_basis_change(state, group, step, proj, plan.inner)
        if proj.stagger and refresh_schedule.OFFSET_KEY not in state and proj.has_basis(state):
            # with the first basis (or at the first step with stagger of a state written without): kept from now on
            state[refresh_schedule.OFFSET_KEY] = plan.refresh_offset
        proj.previous = None  # the snapshot of the old basis served its refresh (the projector is reused)

    def restart(self, p: torch.Tensor, state: dict, step: int, why: str, inner: InnerRule) -> None:
        """Drop a parameter's state (basis, inner and residual state) that no longer fits its group, keeping its
        step count: the update then starts afresh in a new subspace, with its own bias correction."""
        key = ("restart", step)  # one warning for all the parameters of a step
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"gradproj: at step {step} the optimizer state of some parameters no longer fits their param group "
                f"(e.g. shape {tuple(p.shape)}: its state {why}; was the group's rank, proj_type, projector or inner "
                "rule changed?): their basis and moments restart at this step",
                stacklevel=5,
            )
        kept = {k: state[k] for k in ("sr_seed",) if k in state}
        state.clear()
        state.update(step=step, **kept)
        inner.reset_state(state, step)

    @staticmethod
    def on_basis_change(state: dict, group: dict, step: int, proj: Projector, inner: InnerRule) -> None:
        """Apply the group's ``moments_on_refresh`` rule after a refresh replaced an existing basis.

        ``"keep"`` (the reference behaviour) carries the moments over unchanged; ``"reset"`` drops them,
        so the inner rule starts afresh (with its own bias correction) in the new subspace; ``"project"``
        maps them into the new basis (:mod:`gradproj.projectors.change`).
        """
        if group["moments_on_refresh"] == "reset":
            inner.reset_state(state, step)
        elif group["moments_on_refresh"] == "project":
            inner.project_state(state, proj.basis_change(state))


class _Where:
    """The prefix "param group i, parameter j (shape ...)" of an error message, formatted only when one is raised."""

    __slots__ = ("gi", "p", "pi")

    def __init__(self, gi: int, pi: int, p: torch.Tensor):
        self.gi, self.pi, self.p = gi, pi, p

    def __str__(self) -> str:
        return f"param group {self.gi}, parameter {self.pi} (shape {tuple(self.p.shape)})"


_SCALARS = frozenset({int, float, str, bool, type(None)})


def _frozen(value: Any) -> Any:
    """``value`` as a comparable snapshot (containers copied, tensors by identity and version)."""
    if type(value) in _SCALARS:
        return value
    if isinstance(value, dict):
        return ("dict", tuple((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), value._version)
    return value


def _fingerprint(group: dict) -> tuple:
    """A group's options except ``params`` and ``lr`` (which schedulers change every step)."""
    return tuple((k, _frozen(v)) for k, v in group.items() if k not in ("params", "lr"))


class matrix_view:
    """Context manager yielding ``p`` as an in-place-writable [m, n] matrix (a view when contiguous)."""

    def __init__(self, p: torch.Tensor, shape2d: tuple[int, int] | None):
        self.p, self.shape2d = p, shape2d
        self.copy: torch.Tensor | None = None

    def __enter__(self) -> torch.Tensor:
        if self.shape2d is None or (self.p.shape == self.shape2d and self.p.is_contiguous()):  # [m, n] already
            return self.p
        if self.p.is_contiguous():
            return self.p.view(self.shape2d)
        self.copy = self.p.reshape(self.shape2d).clone()
        return self.copy

    def __exit__(self, *exc: object) -> None:
        if self.copy is not None and exc[0] is None:
            self.p.copy_(self.copy.view(self.p.shape))
