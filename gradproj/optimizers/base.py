"""The one optimizer every gradproj method is a preset of: torch.optim's interface over the engine.

:class:`ProjectedOptimizer` holds the param groups and the state and runs the step loop; the step of one
parameter, the schema of the options and every check are the engine's (:mod:`gradproj.optimizers.engine`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.optim import Optimizer

from .. import kernels
from ..inner import INNER_RULES, Adam, InnerRule
from ..sampling.sampler import restore_sampler
from ..state_layout import state_problem
from ..validation import refuse_unknown
from . import multi_tensor, timed_choices
from .engine import OPTIMIZER_OPTIONS, STATE_DTYPES, Engine
from .groups import refuse_constructor_rank
from .layerwise import LayerwiseStepper, check_layerwise_options

if TYPE_CHECKING:
    from ..sampling.sampler import LayerSampler

_DTYPE_NAMES = {v: k for k, v in STATE_DTYPES.items() if k is not None}


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
      frees the state of blocks it deactivates (unless built with ``keep_inactive_state=True``), and its
      state travels in ``state_dict()``.
    * ``stochastic_rounding``: ``False`` (default) or ``True`` to round bf16 weights stochastically after
      each update (unbiased, so updates below half a bf16 ulp are not lost); seeded from torch's RNG at
      the first step and kept in the state (see :func:`gradproj.kernels.rounding_seed`).
    * ``compile``: ``False`` (default), ``True`` or a dict of ``torch.compile`` arguments — run each
      parameter's per-step math (not the basis refresh) as one compiled graph; see
      :mod:`gradproj.optimizers.compiled`.

    DTensor parameters (FSDP2's ``fully_shard``) are stepped on each rank's rows; see
    :mod:`gradproj.optimizers.sharding`.
    * ``norm_growth_limit``: ``None`` (default) or γ >= 1 — limit every parameter's update norm to grow by
      at most γ per step (Fira's limiter on the whole update; see :mod:`gradproj.residual.limiter`).
    * ``layerwise``: step each parameter inside its post-accumulate-grad hook and free its gradient at
      once (:mod:`gradproj.optimizers.layerwise`); ``accumulation_steps``: micro-batches per update there.
    * ``max_grad_norm`` (also a group key): clip each parameter's gradient to this norm before its update.
    * ``foreach``: ``None`` (default: for CUDA parameters, and for CPU parameters of the shapes where it measured
      faster over their first regular steps), ``True`` or ``False`` — step the parameters whose step is a
      regular GaLore step together, in few kernel launches (:mod:`gradproj.optimizers.multi_tensor`).
    """

    inner_rule: ClassVar[type[InnerRule]] = Adam
    default_residual: ClassVar[str] = "none"
    default_moments_on_refresh: ClassVar[str] = "keep"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | None = 1e-3,  # None: the inner rule's own step size (GaLoreAdafactor's relative step)
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
        params = list(params)  # type: ignore[assignment]  # torch.optim takes a list too
        refuse_constructor_rank(list(params), options, type(self).__name__)
        if isinstance(extra_group_keys, str) or not all(isinstance(k, str) for k in extra_group_keys):
            raise TypeError(f"extra_group_keys = {extra_group_keys!r} must be a list of key names")
        #: the step of one parameter, the schema and the checks (gradproj.optimizers.engine)
        self.engine = Engine(self, self.inner_rule, frozenset(extra_group_keys))
        self._layerwise = LayerwiseStepper(self, accumulation_steps) if layerwise else None
        self.engine.layerwise = self._layerwise
        defaults: dict[str, Any] = {o.name: o.default for o in OPTIMIZER_OPTIONS}
        defaults.update(
            lr=lr,
            weight_decay=weight_decay,
            impl=impl,
            state_dtype=self._dtype_name(state_dtype),
            inner=self.inner_rule.name,
            residual=self.default_residual,
            moments_on_refresh=self.default_moments_on_refresh,
            **self.inner_rule.defaults,
        )
        refuse_unknown(options, self.engine.group_keys() - {"params"}, type(self).__name__)
        defaults.update(options)
        super().__init__(params, defaults)
        self.sampler = sampler
        if sampler is not None:
            sampler.attach(self)

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
        """Add a group; the schema's defaults are written into it and every option is checked
        (:meth:`Engine.validate_group`). A group may choose another inner rule than the preset's
        (``"inner": "adafactor"``): it then takes that rule's defaults, not the preset's."""
        inner = param_group.get("inner", self.engine.default_inner)
        preset_only: set[str] = set()  # the preset's rule's defaults, which do not belong in this group
        if inner != self.engine.default_inner and isinstance(inner, str):
            rule = INNER_RULES.get(inner)
            if rule is not None:
                param_group = {**rule.defaults, **param_group}
            preset_only = set(self.inner_rule.defaults) - set(param_group)
        super().add_param_group(param_group)
        group, index = self.param_groups[-1], len(self.param_groups) - 1
        for key in preset_only:
            group.pop(key, None)
        try:
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(f"param group {index}: a parameter of dtype {p.dtype} is not floating point")
            self.engine.validate_group(group, index)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        for p in group["params"]:
            self.engine.param_index.setdefault(id(p), len(self.engine.param_index))
        if self._layerwise is not None:
            self._layerwise.register(index, group)

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
        engine = self.engine
        for i, group in enumerate(self.param_groups):
            engine.validate_group(group, i)
        if self._layerwise is not None:  # the hooks stepped during backward; close the window
            self._layerwise.end_window(self)
        else:
            batch = multi_tensor.collect(self)  # foreach: regular GaLore steps, batched (multi_tensor.py)
            dense = multi_tensor.collect_dense(self)  # unprojected Adam: torch's fused AdamW kernel
            work = engine.gather(skip=batch.ids | dense.ids)
            if dense.ids:  # new state in parameter order, whichever path creates it
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None and p not in self.state:
                            self.state[p] = {}
            multi_tensor.run_dense(self, dense)
            multi_tensor.run(self, batch)
            timed = batch.timed  # foreach=None on the CPU: per-parameter steps timed against the batched ones
            for p, grad, group, plan in work:
                if plan.low_rank_grad is None:  # a projected-backward R was clipped when it was gathered
                    grad = kernels.reference.clip_by_norm(grad, group["max_grad_norm"])
                if timed and id(p) in timed:
                    start = time.perf_counter()
                    engine.step_param(p, grad, group, plan)
                    batch.time_param(p, time.perf_counter() - start)
                else:
                    engine.step_param(p, grad, group, plan)
            multi_tensor.finish(batch)
        if self.sampler is not None:
            self.sampler.step(self)  # may switch blocks (and free the state of those it deactivates)
        return loss

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        extra = self.extra_state()
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
        self.check_extra_state(state_dict.get("gradproj", {}))
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
        self.load_extra_state(state_dict.get("gradproj", {}))
        self.engine.forget_checks()
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
            what = (
                f"was written by a torch.optim optimizer (it has {', '.join(foreign)})" if foreign else "has no 'rank'"
            )
            message = (
                f"{where} {what}, while the optimizer's group {index} projects with rank={current.get('rank')}; "
                "loading it makes that group train unprojected (full-rank state) from here on"
            )
            if "rank" not in current or "rank" in options:
                message = f"{where} {what}; its torch-only options are dropped"
            if strict:
                raise ValueError(
                    f"{message}. Load a checkpoint of this gradproj optimizer, or pass strict=False to load it anyway"
                )
            warnings.warn(f"gradproj: {message}", stacklevel=4)
            options = {k: v for k, v in options.items() if k not in self._TORCH_ONLY_KEYS}
        group = {**self.defaults, **options, "params": current["params"]}
        self.engine.validate_group(group, index)
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
            plan = self.engine.plan(p, group)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        problem = state_problem(saved, self.engine.state_layout(p, group, plan), deep=True)
        if (
            problem is None
            and saved
            and plan.projector.refreshes
            and not plan.projector.has_basis(saved)
            and any(k in saved for k in plan.inner.state_keys)
        ):
            problem = "holds inner-rule state but no basis"
        if problem is not None:
            raise ValueError(
                f"{where}: the saved state {problem}. The checkpoint was written for another model, another "
                "parameter order or other group options (rank, proj_type, projector, inner rule); nothing was loaded"
            )
        return saved

    def extra_state(self) -> dict[str, Any]:
        """Optimizer-level state beyond per-parameter state (samplers, generators); tensors and scalars only."""
        extra: dict[str, Any] = {}
        if self.sampler is not None:
            extra["sampler"] = self.sampler.state_dict()
        choices = timed_choices.export(p for group in self.param_groups for p in group["params"])
        if choices:
            extra[timed_choices.KEY] = choices
        return extra

    def check_extra_state(self, extra: dict[str, Any]) -> None:
        """Raise before anything is loaded if the optimizer-level state cannot be restored."""
        if self.sampler is not None and "sampler" in extra:
            self.sampler.check_state_dict(extra["sampler"])
        if timed_choices.KEY in extra:
            timed_choices.check(extra[timed_choices.KEY])

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        restore_sampler(self, extra.get("sampler"))
        timed_choices.install(extra.get(timed_choices.KEY, {}))


def _to_device(value: Any, p: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device=p.device, copy=True)
    if isinstance(value, dict):
        return {k: _to_device(v, p) for k, v in value.items()}
    return value
