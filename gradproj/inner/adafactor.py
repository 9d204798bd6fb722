"""Adafactor (arXiv 1804.04235) as an inner rule: a factored second moment of R (GaLore-Adafactor's rule).

Options and their meaning are those of ``transformers.optimization.Adafactor`` (itself fairseq's)::

    t       = the parameter's step count (1 at the first update)
    ρ       = min(1e-6·t if warmup_init else 1e-2, 1/√t)    if relative_step, else lr
    lr_t    = ρ · max(eps[1], RMS(W))                       if scale_parameter, else ρ
    β2_t    = 1 − t^decay_rate
    R²ₑ     = R² + eps[0]
    factored (R has >= 2 dims):  r = β2_t·r + (1−β2_t)·mean(R²ₑ, last dim)
                                 c = β2_t·c + (1−β2_t)·mean(R²ₑ, second-last)
                                 V̂ = (r / mean(r)) ⊗ c
    otherwise:                   v = β2_t·v + (1−β2_t)·R²ₑ;   V̂ = v
    u       = R / √V̂ ;  u ← u / max(1, RMS(u) / clip_threshold) ;  u ← lr_t · u
    with beta1:  m = β1·m + (1−β1)·u ;  u = m
    W      -= scale · B(u) ;   W -= lr_t · weight_decay · W

RMS(W) is the root-mean-square of the *full* weight (as in GaLore's Adafactor), read from ``ctx.param``.
The rule returns the lr-scaled direction and a step size of 1, so ``scale`` and the back-projection apply
to it as to Adam's. Weight decay is decoupled and applied after the update (gradproj's outer step);
transformers applies it just before adding the update — the two differ by lr_t·wd·u, a second-order term.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..options import Option, boolean, number
from ..state_layout import Spec
from ..validation import is_number
from .base import InnerRule, StepContext

PARAM_RMS = "RMS"


def _rms(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Root-mean-square, accumulated in ``dtype`` (no upcast copy of ``t`` is made)."""
    return torch.linalg.vector_norm(t, dtype=dtype) / (t.numel() ** 0.5)


def _check_eps(eps: object, name: str, where: str) -> None:
    if not (
        isinstance(eps, (tuple, list))
        and len(eps) == 2
        and all(is_number(e) and math.isfinite(float(e)) and float(e) >= 0.0 for e in eps)
    ):
        raise ValueError(
            f"{where}: {name} = {eps!r} must be a pair (eps1 for the squared gradient, eps2 for the parameter "
            "scale) of numbers >= 0, e.g. (1e-30, 1e-3)"
        )


def _check_beta1(beta1: Any, name: str, where: str) -> None:
    if beta1 is not None and not (is_number(beta1) and 0.0 <= float(beta1) < 1.0):
        raise ValueError(f"{where}: {name} = {beta1} must be in [0, 1), or None for no first moment")


class Adafactor(InnerRule):
    """Adafactor with transformers' options; state ``exp_avg_sq_row`` / ``exp_avg_sq_col`` (factored, for R
    with >= 2 dims) or ``exp_avg_sq``, ``exp_avg`` when ``beta1`` is set, and ``RMS`` (the weight's RMS
    before the update, a 0-dim tensor, as in transformers)."""

    name = "adafactor"
    options = (
        Option(
            "eps",
            (1e-30, 1e-3),
            "(eps1 added to the squared gradient, eps2 the floor of the parameter scale)",
            _check_eps,
        ),
        Option("clip_threshold", 1.0, "update clipping threshold on its RMS", number(minimum=0.0, exclusive=True)),
        Option("decay_rate", -0.8, "β2_t = 1 − t^decay_rate", number(maximum=0.0, hint="beta2_t = 1 - t^decay_rate")),
        Option("beta1", None, "first-moment decay (None: no first moment)", _check_beta1),
        Option("scale_parameter", True, "multiply the step size by the weight's RMS", boolean),
        Option("relative_step", True, "step size min(1e-2, 1/√t) instead of lr (then lr must be None)", boolean),
        Option("warmup_init", False, "relative step grows as 1e-6·t at first (needs relative_step)", boolean),
    )
    state_keys = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")
    state_parts = {PARAM_RMS: "other"}

    def validate_lr(self, group, where):
        """With ``relative_step=True`` the step size is the rule's own and ``lr`` is not read, as in transformers'
        Adafactor: it may be None or any number >= 0, which is what ``transformers.optimization.AdafactorSchedule``
        writes there (0.0 at first, then the step size it reads back through the optimizer's ``_get_lr``). A
        *manual* lr together with ``relative_step=True`` is refused when the optimizer is built
        (:func:`check_manual_lr`), as transformers' Adafactor refuses it."""
        if group["relative_step"]:
            if group["lr"] is not None:
                super().validate_lr(group, where)
        elif group["lr"] is None:
            raise ValueError(f"{where}: lr=None needs relative_step=True; pass a learning rate")
        else:
            super().validate_lr(group, where)
        if group["warmup_init"] and not group["relative_step"]:
            raise ValueError(f"{where}: warmup_init=True requires relative_step=True")

    def state_layout(self, shape, group):
        layout = {"exp_avg": Spec(tuple(shape)), PARAM_RMS: Spec(())}
        if len(shape) >= 2:
            row, col = tuple(shape[:-1]), tuple(shape[:-2]) + tuple(shape[-1:])
            layout["exp_avg_sq_row"] = Spec(row, requires=("exp_avg_sq_col",))
            layout["exp_avg_sq_col"] = Spec(col, requires=("exp_avg_sq_row",))
        else:
            layout["exp_avg_sq"] = Spec(tuple(shape))
        return layout

    @staticmethod
    def check_manual_lr(lr: Any, relative_step: Any, where: str) -> None:
        """Refuse a learning rate given together with ``relative_step=True`` when an optimizer is built: it would
        be ignored. ``lr=None`` and ``lr=0`` (the recipe of ``AdafactorSchedule``) are accepted."""
        if relative_step is True and lr is not None and not (is_number(lr) and float(lr) == 0.0):
            raise ValueError(
                f"{where}: lr = {lr!r} cannot be combined with relative_step=True (the step size is then "
                "min(1e-2, 1/sqrt(t))); pass lr=None (or 0), or relative_step=False to train with lr"
            )

    def step_size(self, group: dict, state: dict) -> float:
        """The step size lr_t of ``state``'s last update (ρ·max(eps2, RMS(W)) with ``scale_parameter``): what
        transformers' ``Adafactor._get_lr`` reports, e.g. to ``AdafactorSchedule``; ``group["lr"]`` (or 0.0)
        before the first update."""
        if "step" not in state or state["step"] < 1:
            return 0.0 if group["lr"] is None else float(group["lr"])
        lr_t = self.relative_step_size(group, state["step"])
        if group["scale_parameter"] and PARAM_RMS in state:
            lr_t *= max(group["eps"][1], float(state[PARAM_RMS]))
        return float(lr_t)

    @staticmethod
    def relative_step_size(group: dict, step: int) -> float:
        """ρ: the external lr, or min(1e-6·t if warmup_init else 1e-2, 1/√t) with relative_step."""
        if not group["relative_step"]:
            return group["lr"]
        min_step = 1e-6 * step if group["warmup_init"] else 1e-2
        return min(min_step, 1.0 / math.sqrt(step))

    def update(self, R, state, group, ctx: StepContext):
        compute = torch.float32 if R.dtype in (torch.float16, torch.bfloat16) else R.dtype
        g = R.to(compute)
        factored = g.dim() >= 2
        # like transformers' Adafactor, the (small) factored statistics are kept in float32 for half-precision
        # weights unless a state_dtype is asked for explicitly
        self._init_state(g, state, group, compute if group["state_dtype"] is None else ctx.state_dtype)
        t = ctx.step - state.get("inner_start", 0)  # steps since the moments were (re)started
        state[PARAM_RMS] = _rms(ctx.param if ctx.param is not None else g, dtype=compute)
        lr_t: float | torch.Tensor = self.relative_step_size(group, ctx.step)
        if group["scale_parameter"]:
            lr_t = torch.clamp(state[PARAM_RMS], min=group["eps"][1]) * lr_t  # on the device, no host sync
        beta2t = 1.0 - math.pow(t, group["decay_rate"])

        update = g * g + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1).to(row.dtype), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2).to(col.dtype), alpha=1.0 - beta2t)
            row, col = row.to(compute), col.to(compute)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(g)
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(update.to(v.dtype), alpha=1.0 - beta2t)
            update = v.to(compute).rsqrt().mul_(g)
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr_t)
        if group["beta1"] is not None:
            m = state["exp_avg"]
            m.mul_(group["beta1"]).add_(update.to(m.dtype), alpha=1.0 - group["beta1"])
            update = m
        return update, 1.0

    @staticmethod
    def _init_state(g: torch.Tensor, state: dict, group: dict, dtype: torch.dtype) -> None:
        """Create the missing state (all of it at the first update or after a reset)."""
        shapes = {"exp_avg_sq_row": g.shape[:-1], "exp_avg_sq_col": g.shape[:-2] + g.shape[-1:]}
        keys = ["exp_avg_sq_row", "exp_avg_sq_col"] if g.dim() >= 2 else ["exp_avg_sq"]
        if group["beta1"] is not None:
            keys.append("exp_avg")
        for key in keys:
            if key not in state:
                state[key] = torch.zeros(shapes.get(key, g.shape), dtype=dtype, device=g.device)

    def decay_lr(self, group, state):
        """lr_t of the update just made (ρ·max(eps2, RMS(W)) with scale_parameter), as transformers decays with."""
        if float(group["weight_decay"]) == 0.0:
            return 0.0
        lr_t = self.relative_step_size(group, state["step"])
        if group["scale_parameter"]:
            lr_t *= max(group["eps"][1], float(state[PARAM_RMS]))  # one host sync, only with weight decay
        return lr_t
