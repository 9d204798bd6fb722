"""Per-layer stepping: every parameter is updated inside its post-accumulate-grad hook, during backward.

``layerwise=True`` registers ``register_post_accumulate_grad_hook`` on every parameter of the optimizer,
frozen ones included (a hook costs nothing until its parameter trains, so a block that a
:class:`gradproj.LayerSampler` activates later, or a layer unfrozen by hand, is stepped during backward like
the others). When autograd has finished a parameter's gradient, the hook runs that parameter's whole update
(:meth:`ProjectedOptimizer._update`) and sets ``p.grad = None`` at once, so the full gradients of the model
never coexist: at any moment at most one is alive (the one being consumed). The training loop does not
change::

    loss.backward()      # each parameter is stepped as soon as its gradient is complete
    opt.step()           # closes the step: handles what the hooks left (see below), schedulers see a step
    opt.zero_grad()

**Gradient accumulation** (``accumulation_steps=k``): call ``backward`` k times, then ``opt.step()``, as in
normal mode. A projected matrix (whose step needs only its projection R) projects each micro-batch gradient
as soon as it is complete and adds it to a low-rank buffer (state key ``accum``, fp32 for half-precision
weights), then frees it; the update runs in the k-th micro-batch's hook, from the summed projection. The
basis refresh (every ``update_proj_gap`` steps) happens in the *first* micro-batch of the window and sees
only that micro-batch's full gradient: it is the only full gradient of the window that ever exists.
Everything else — unprojected tensors (R = G, so a buffer would be as large as the gradient) and projected
matrices whose step needs the full gradient (a residual such as Fira's) — accumulates in ``p.grad`` as in
normal mode and is stepped in the k-th hook, exactly as normal mode steps it.

``opt.step()`` closes the window: it steps every parameter whose window is still open (a parameter that
missed the last micro-batches, a gradient set by hand) and resets the counters. More than k backward
passes between two ``step()`` calls raise ``RuntimeError``.

**Clipping.** ``torch.nn.utils.clip_grad_norm_`` between backward and step sees no gradients in this mode
(they are already consumed). Use the optimizer's ``max_grad_norm`` instead: it clips *each parameter's*
gradient to that norm just before its update — a global norm cannot be known before the first parameter
is updated without a second backward pass. The clipped tensor is the gradient the update consumes: the
full gradient, or for low-rank accumulation the summed projection R (‖R‖ ≤ ‖G‖, so the clip never bites
harder than on G). ``max_grad_norm`` has the same per-parameter meaning in normal mode, so both modes
follow the same trajectory.

Stacks that clip with a global norm between backward and step (transformers' ``Trainer`` with its default
``max_grad_norm=1.0``, accelerate's ``Accelerator.clip_grad_norm_``, Lightning's ``gradient_clip_val``) find
no gradients, clip nothing and report a gradient norm of 0.0; the optimizer cannot see that call. Turn their
clipping off and give the optimizer ``max_grad_norm`` (``gradproj.integrations.transformers.create_optimizer``
does this for ``Trainer``).

**No GradScaler.** torch's ``GradScaler`` (fp16 loss scaling) unscales and inf-checks gradients between
backward and step, but here they are consumed during backward, still scaled. The optimizer therefore declares
``_step_supports_amp_scaling``, so ``scaler.step(opt)`` reaches ``opt.step()`` (instead of torch's "No inf
checks were recorded"), and ``step()`` raises ``RuntimeError`` with the fix: train in bf16 autocast or fp32
without a scaler, or use ``layerwise=False``. The updates of the first window (done during its backward) have
already seen the scaled gradients by then; nothing can detect the scaler earlier.

**Errors.** Group options are validated at the first hook of a window; if they are bad, the hooks stand
aside for the rest of the window (gradients stay in ``p.grad``) and ``opt.step()`` raises the error before
anything changes. A parameter's own bad gradient (sparse, NaN at its first refresh) is left in ``p.grad``
and ``opt.step()`` raises. Any error — ``step()`` raising, or a hook raising out of ``backward()`` — abandons
the window (:meth:`LayerwiseStepper.abandon`): parameters updated in it stay updated (the update *is* the
backward pass), every other parameter is left bit-identical to before the window (weights and state; a
basis refreshed at the window's first micro-batch is restored), gradients not consumed stay in ``p.grad``.
After ``zero_grad()`` the next window trains as a fresh optimizer given the same weights and state would.

With ``accumulation_steps=1`` every parameter is stepped by the same ``_update`` call on the same
gradient as in normal mode, so the trajectory is bit-identical (tests check it for every optimizer).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch

from ..kernels.reference import accumulation_dtype, clip_by_norm
from ..residual.base import NoResidual

if TYPE_CHECKING:
    from .base import ProjectedOptimizer
    from .engine import Plan as _Plan

log = logging.getLogger("gradproj")

#: state key of the low-rank sum of the current window's projected micro-batch gradients
ACCUM = "accum"
#: state key of the number of micro-batches of the current window a parameter has seen
ACCUM_COUNT = "accum_count"


def check_layerwise_options(layerwise: Any, accumulation_steps: Any) -> None:
    if not isinstance(layerwise, bool):
        raise TypeError(f"layerwise = {layerwise!r} must be True or False")
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps = {accumulation_steps!r} must be a positive integer")
    if accumulation_steps > 1 and not layerwise:
        raise ValueError(
            f"accumulation_steps = {accumulation_steps} applies to layerwise=True; in normal mode accumulate as "
            "usual (call backward() several times before optimizer.step())"
        )


class _Projected:
    """Stands in for a projector when the window's gradient was projected micro-batch by micro-batch:
    :meth:`down` returns the summed projection, no refresh happens (it happened at the window's start)."""

    def __init__(self, projector: Any, R: torch.Tensor):
        self._projector, self._R = projector, R

    def needs_refresh(self, state: dict, step: int) -> bool:
        return False

    def down(self, G: torch.Tensor, state: dict) -> torch.Tensor:
        return self._R

    def __getattr__(self, name: str) -> Any:  # up, add_up_, rank_axis, side, ...
        return getattr(self._projector, name)


def _register_hook(p: torch.Tensor, hook: Any) -> Any:
    """``p.register_post_accumulate_grad_hook(hook)``, also for a parameter frozen now; None for a tensor
    that can never require grad (an inference tensor), which needs no hook.

    torch refuses to register a hook on a tensor that does not require grad, but the hook is stored on the
    tensor and fires whenever it later trains; so a frozen parameter is unfrozen just for the registration.
    """
    if p.requires_grad:
        return p.register_post_accumulate_grad_hook(hook)
    try:
        p.requires_grad_(True)
    except RuntimeError:
        return None
    try:
        return p.register_post_accumulate_grad_hook(hook)
    finally:
        p.requires_grad_(False)


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class LayerwiseStepper:
    """The hooks and per-window bookkeeping of ``layerwise=True`` (owned by the optimizer).

    It holds the optimizer only through a weak reference; the hooks are removed when the optimizer is
    garbage-collected.
    """

    def __init__(self, optimizer: ProjectedOptimizer, accumulation_steps: int):
        self._optimizer = weakref.ref(optimizer)
        self.accumulation_steps = accumulation_steps
        self._index: dict[int, tuple[int, int]] = {}  # id(param) -> (group index, index in group)
        self._handles: list = []
        weakref.finalize(optimizer, _remove_hooks, self._handles)
        self._stepped: set[int] = set()  # params updated in the current window
        self._saved: dict[int, dict] = {}  # id(param) -> its state before the refresh at this window's start
        self._checked = False  # groups validated for the current window
        self._suspended = False  # a group was invalid: hooks stand aside until step() succeeds
        self._window_max = 0  # most micro-batches any parameter saw in the current window
        self._warned_short = False
        # torch's GradScaler then calls step() with `grad_scale` / `found_inf` set on the optimizer (instead of
        # unscaling gradients that no longer exist), so end_window can refuse it with a clear message
        setattr(optimizer, "_step_supports_amp_scaling", True)  # noqa: B010 - not an attribute of torch's Optimizer

    def register(self, group_index: int, group: dict) -> None:
        for i, p in enumerate(group["params"]):
            self._index[id(p)] = (group_index, i)
            handle = _register_hook(p, self._hook)
            if handle is not None:
                self._handles.append(handle)

    # ------------------------------------------------------------------------------------ during backward
    def _hook(self, p: torch.Tensor) -> None:
        opt = self._optimizer()
        if opt is None or self._suspended or p.grad is None or id(p) not in self._index:
            return
        try:
            with torch.no_grad():
                if not self._checked:
                    try:
                        for i, group in enumerate(opt.param_groups):
                            opt.engine.validate_group(group, i)
                    except (ValueError, TypeError):
                        self._suspended = True  # optimizer.step() raises the same error, before anything changes
                        return
                    self._checked = True
                gi, pi = self._index[id(p)]
                group = opt.param_groups[gi]
                try:
                    plan = opt.engine.prepare(gi, pi, p, p.grad, group)
                except ValueError:
                    return  # the gradient stays in p.grad; optimizer.step() raises with this parameter unchanged
                self._consume(opt, p, group, plan, last=False)
        except BaseException:
            self.abandon(opt)  # backward() raises: the window ends here, so the next one starts clean
            raise

    def _consume(self, opt: ProjectedOptimizer, p: torch.Tensor, group: dict, plan: _Plan, last: bool) -> None:
        """Take ``p.grad`` (if any) into the window; step ``p`` when the window is complete (or ``last``)."""
        if id(p) in self._stepped:
            raise RuntimeError(
                f"a parameter of shape {tuple(p.shape)} received a gradient after its update in this step: more than "
                f"accumulation_steps={self.accumulation_steps} backward passes between two optimizer.step() calls. "
                "With layerwise=True the update happens during backward, so call optimizer.step() after every "
                "accumulation_steps backward passes (or set accumulation_steps to your number of micro-batches)."
            )
        state = opt.state[p]
        count = state.get(ACCUM_COUNT, 0) + (p.grad is not None)
        self._window_max = max(self._window_max, count)
        final = last or count >= self.accumulation_steps
        low_rank = self.low_rank(plan)
        if p.grad is None and ACCUM not in state:  # nothing left to apply (e.g. zero_grad() mid-window)
            state.pop(ACCUM_COUNT, None)
            return
        if final and ACCUM not in state:  # the whole gradient is at hand: exactly normal mode's step
            grad, p.grad = p.grad, None
            assert grad is not None  # with no gradient and no buffer it returned above
            state.pop(ACCUM_COUNT, None)
            try:
                opt.engine.step_param(p, clip_by_norm(grad, group["max_grad_norm"]), group, plan)
            except BaseException:
                p.grad = grad  # as in normal mode, a step that raised leaves the gradient where it was
                raise
        elif low_rank:
            if p.grad is not None:
                self._accumulate(opt, p, state, group, plan)
            if final:
                self._step_accumulated(opt, p, state, group, plan)
            else:
                state[ACCUM_COUNT] = count
        else:  # the gradient keeps accumulating in p.grad, as in normal mode
            state[ACCUM_COUNT] = count
        if final:
            self._stepped.add(id(p))
            self._saved.pop(id(p), None)

    def low_rank(self, plan: _Plan) -> bool:
        """Whether ``plan``'s parameter accumulates its micro-batches as projections (its refresh then sees the
        window's first micro-batch gradient, unclipped)."""
        return self.accumulation_steps > 1 and plan.shape2d is not None and isinstance(plan.residual, NoResidual)

    def _accumulate(self, opt: ProjectedOptimizer, p: torch.Tensor, state: dict, group: dict, plan: _Plan) -> None:
        """Project this micro-batch's gradient into the window's buffer and free it."""
        proj = plan.projector
        assert p.grad is not None and plan.shape2d is not None  # called for a low-rank plan's fresh gradient
        G = p.grad.reshape(plan.shape2d)
        if ACCUM not in state:  # the window's first micro-batch: its full gradient is the one a refresh sees
            step = state.get("step", 0)
            if plan.restart is not None or plan.first_basis is not None or proj.needs_refresh(state, step):
                self._saved[id(p)] = _before_refresh(opt, state, group)  # restored if the window is abandoned
            if plan.restart is not None:
                opt.engine.restart(p, state, step, plan.restart, plan.inner)
                plan.restart = None
            opt.engine.refresh(G, state, group, step, plan)
            state[ACCUM] = proj.down(G, state).to(accumulation_dtype(G)).contiguous()
        else:
            state[ACCUM].add_(proj.down(G, state))
        p.grad = None

    @staticmethod
    def _step_accumulated(opt: ProjectedOptimizer, p: torch.Tensor, state: dict, group: dict, plan: _Plan) -> None:
        R = clip_by_norm(state.pop(ACCUM), group["max_grad_norm"])
        state.pop(ACCUM_COUNT, None)
        # a proxy: everything but down() and needs_refresh() is the projector's own
        plan = dataclasses.replace(plan, projector=_Projected(plan.projector, R))  # type: ignore[arg-type]
        assert plan.shape2d is not None  # only low-rank plans accumulate
        # the window's full gradient never existed; a meta tensor stands in for it (nothing reads it)
        opt.engine.update(p, torch.empty(plan.shape2d, device="meta"), group, plan)

    # ---------------------------------------------------------------------------------------- at step()
    def end_window(self, opt: ProjectedOptimizer) -> None:
        """Step what the hooks left, then start a new window. Raises before changing anything on bad input
        (``ProjectedOptimizer.step`` then calls :meth:`abandon`)."""
        refuse_grad_scaler(opt)
        work = opt.engine.gather()  # leftover gradients: checked first (sparse, NaN at a first refresh)
        pending = [
            (p, group, opt.engine.plan(p, group))
            for group in opt.param_groups
            for p in group["params"]
            if p.grad is None and ACCUM_COUNT in opt.state.get(p, {})
        ]
        if self.accumulation_steps > 1 and 0 < self._window_max < self.accumulation_steps and not self._warned_short:
            self._warned_short = True
            warnings.warn(
                f"gradproj: optimizer.step() closed an accumulation window after {self._window_max} of "
                f"accumulation_steps={self.accumulation_steps} backward passes (expected at the end of an epoch; "
                "otherwise call step() every accumulation_steps passes). Warned once per optimizer.",
                stacklevel=4,
            )
        for p, _, group, plan in work:
            self._consume(opt, p, group, plan, last=True)
        for p, group, plan in pending:
            self._consume(opt, p, group, plan, last=True)
        self._new_window()

    def abandon(self, opt: ProjectedOptimizer) -> None:
        """End the current window after an error (a hook raised during backward, or ``step()`` raised).

        Parameters already stepped in the window keep their update (undoing it would take a copy of every
        parameter and its state through backward). Every other parameter gets back exactly the state it had
        before the window: its low-rank buffer and micro-batch count are dropped, and a basis refreshed at the
        window's first micro-batch is restored, with the inner state that ``moments_on_refresh`` changed. Gradients in
        ``p.grad`` are left as they are (as normal mode leaves them when ``step()`` raises): ``zero_grad()``
        and a new window then trains as a fresh optimizer with this state would.
        """
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p)
                if state is None:
                    continue
                saved = self._saved.pop(id(p), None)
                if saved is not None:
                    state.clear()
                    state.update(saved)
                state.pop(ACCUM, None)
                state.pop(ACCUM_COUNT, None)
                if not state:
                    del opt.state[p]
        self._new_window()

    def _new_window(self) -> None:
        self._stepped.clear()
        self._saved.clear()
        self._checked = self._suspended = False
        self._window_max = 0


#: attributes torch's GradScaler sets on an optimizer that declares ``_step_supports_amp_scaling``
_SCALER_ATTRIBUTES = ("grad_scale", "found_inf")


def refuse_grad_scaler(opt: Any) -> None:
    """Raise if ``opt.step()`` is being called by torch's ``GradScaler.step`` (see the module docstring)."""
    if not any(name in vars(opt) for name in _SCALER_ATTRIBUTES):
        return
    for name in _SCALER_ATTRIBUTES:  # the scaler deletes them only after a step that returns
        vars(opt).pop(name, None)
    raise RuntimeError(
        "layerwise=True cannot be used with torch's GradScaler (fp16 loss scaling): each parameter is updated "
        "during backward with its gradient still scaled, before the scaler can unscale it or check it for inf. "
        "Train in bf16 autocast or fp32 without a GradScaler (Trainer: bf16=True instead of fp16=True; "
        "accelerate: mixed_precision='bf16'; Lightning: precision='bf16-mixed'), or use layerwise=False"
    )


def _before_refresh(opt: ProjectedOptimizer, state: dict, group: dict) -> dict:
    """A copy of ``state`` that undoes a refresh: the basis is rewritten in place, so its tensors are cloned;
    the inner rule's state is shared unless ``moments_on_refresh="project"`` rewrites it in place too
    (``"reset"`` only drops it from ``state``)."""
    shared = () if group["moments_on_refresh"] == "project" else opt.engine.inner(group).state_keys
    return {k: v.clone() if torch.is_tensor(v) and k not in shared else v for k, v in state.items()}
