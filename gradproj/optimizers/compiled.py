"""``compile=True``: the per-step math of a parameter as one ``torch.compile`` graph.

What is compiled is the steady-state tail of :meth:`ProjectedOptimizer._update`, from the low-rank
gradient R to the weight update::

    ψ = adam_update(R, m, v)                       # moments updated in place
    ψ, S = residual.compute(G, R, ψ, ...)          # Fira's scaling and limiter, FRUGAL's sign, or nothing
    ψ, S = limit_update_growth(ψ, S, ...)           # the group's norm_growth_limit, if any
    W += projector.up(-step_size · scale · ψ) + (-residual_step) · S
    W += (-decay_lr · weight_decay) · W

with ``fullgraph=True``: no graph break can hide in it. What stays eager, by design: the basis refresh
(an SVD or eigendecomposition, with host-side checks for NaN and fall-backs), the projection
``R = down(G)`` (one GEMM, and for sharded left projections a collective), and a parameter's first step
after its state was created or reset (it allocates the moments).

The scalars that change from step to step (the bias-corrected step size, the learning rate of the
weight decay) enter the graph as 0-dim tensors, so neither the step count nor an LR scheduler causes a
recompile. One graph is compiled per parameter shape and layout; with dynamo's automatic dynamic shapes
a second shape usually turns the dims symbolic, so a whole model compiles a handful of graphs during its
first two steps and none afterwards.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..inner.base import StepContext
from ..residual import limit_update_growth
from ..residual.base import dense_term

#: inner rules whose moment update the compiled tail knows
COMPILABLE_INNER = ("adam",)


def validate(option: Any, inner_name: str, where: str) -> None:
    """Check a group's ``compile`` option: ``False``, ``True`` or a dict of ``torch.compile`` keyword arguments."""
    if option is False or option is None:
        return
    if not (option is True or (isinstance(option, dict) and all(isinstance(k, str) for k in option))):
        raise ValueError(f"{where}: compile = {option!r}; use True, False or a dict of torch.compile arguments")
    if isinstance(option, dict) and option.get("fullgraph") is False:
        raise ValueError(f"{where}: compile={{'fullgraph': False}} is not supported: the step is compiled whole")
    if inner_name not in COMPILABLE_INNER:
        raise ValueError(
            f"{where}: compile=True supports the inner rule(s) {', '.join(COMPILABLE_INNER)}; this optimizer's inner "
            f"rule is {inner_name!r}. Drop compile=True for it (or compile your own training step)."
        )


def _tail(W, G, R, state, step_size, residual_step, decay, projector, residual, group, ctx, beta1, beta2, eps,
          weight_decay):
    U = ctx.ops.adam_update(R, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, eps)
    U, S = residual.compute(G, R, U, projector, state, group, ctx)
    U, S = limit_update_growth(U, S, projector, state, group, ctx)
    projector.add_up_(W, U * (-step_size * ctx.scale), state, alpha=1.0)
    if S is not None:
        W.add_((dense_term(S) * -residual_step).to(W.dtype))
    if weight_decay != 0.0:
        W.add_(W * (-decay * weight_decay))


@functools.lru_cache(maxsize=None)
def _compiled(options: tuple[tuple[str, Any], ...]):
    return torch.compile(_tail, **{"fullgraph": True, **dict(options)})


def _options(option: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(option.items())) if isinstance(option, dict) else ()


@functools.lru_cache(maxsize=64)
def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A 0-dim float32 tensor holding ``value`` (shared by every parameter that steps with it)."""
    return torch.tensor(value, dtype=torch.float32, device=device)


class CompiledTail:
    """Runs the compiled tail for one parameter, once its state exists."""

    def __init__(self, option: Any):
        self.fn = _compiled(_options(option))

    def run(self, optimizer: Any, p: torch.Tensor, G: torch.Tensor, R: torch.Tensor, state: dict, group: dict,
            plan: Any, ctx: StepContext) -> bool:
        """Apply the step (moments, residual, weight update, decay); False, doing nothing, on a step that must
        create state (the first, or the first after a reset), which then runs eagerly."""
        inner = optimizer._inner
        if any(key not in state for key in inner.state_keys):
            return False
        from .base import _matrix_view

        s = float(inner.step_size(group, state, ctx))
        step_size = _scalar(s, R.device)
        residual_step = _scalar(float(plan.residual.step_size(group, s)), R.device)
        decay = _scalar(float(inner.decay_lr(group, state)), R.device)
        beta1, beta2 = group["betas"]
        # the weight as a plain tensor: dynamo keeps the sizes of nn.Parameter inputs (and of their views) static,
        # which compiled one graph per width and hit the recompile limit on models of many distinct shapes
        with _matrix_view(p.detach(), plan.shape2d) as W:
            self.fn(W, G, R, state, step_size, residual_step, decay, plan.projector, plan.residual, group, ctx,
                    float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]))
        return True
