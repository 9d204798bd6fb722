"""Adam inside the subspace (GaLore's inner rule)."""

from __future__ import annotations

import math

import torch

from ..state_layout import Spec
from ..validation import check_number, is_number
from .base import InnerRule, StepContext


def check_betas_eps(group: dict, where: str) -> None:
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not (is_number(b) and 0.0 <= float(b) < 1.0):
            raise ValueError(f"{where}: betas[{i}] = {b} must be in [0, 1)")
    check_number(group["eps"], "eps", where, minimum=0.0)


def bias_corrected_lr(group: dict, t: int) -> float:
    """Adam's step size after ``t`` updates of its moments: lr·√(1−β2^t)/(1−β1^t)."""
    beta1, beta2 = group["betas"]
    return group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


class Adam(InnerRule):
    """m ← β1·m + (1−β1)·R; v ← β2·v + (1−β2)·R²; U = m / (√v + eps);
    step size lr·√(1−β2^t)/(1−β1^t). State: ``exp_avg``, ``exp_avg_sq``, shaped like R."""

    name = "adam"
    defaults = {"betas": (0.9, 0.999), "eps": 1e-6}
    state_keys = ("exp_avg", "exp_avg_sq")
    shardable = ("rows", "cols")  # elementwise
    state_transforms = {"exp_avg": "linear", "exp_avg_sq": "second_moment"}

    def validate_group(self, group, where):
        check_betas_eps(group, where)

    def state_layout(self, shape, group):
        return {"exp_avg": Spec(shape, requires=("exp_avg_sq",)), "exp_avg_sq": Spec(shape, requires=("exp_avg",))}

    def update(self, R, state, group, ctx: StepContext):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(R.shape, dtype=ctx.state_dtype, device=R.device)
            state["exp_avg_sq"] = torch.zeros(R.shape, dtype=ctx.state_dtype, device=R.device)
        beta1, beta2 = group["betas"]
        U = ctx.ops.adam_update(R, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, group["eps"])
        return U, self.step_size(group, state, ctx)

    def step_size(self, group: dict, state: dict, ctx: StepContext) -> float:
        """lr·√(1−β2^t)/(1−β1^t), with t the steps since the moments were (re)started."""
        return bias_corrected_lr(group, ctx.step - state.get("inner_start", 0))
