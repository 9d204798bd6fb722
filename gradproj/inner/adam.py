"""Adam inside the subspace (GaLore's inner rule)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..kernels import reference
from ..options import Option, choice, number, pair, unit_interval
from ..state_layout import Spec
from .base import InnerRule, StepContext

#: Adam's options, shared by the rules built on it
BETAS = Option(
    "betas", (0.9, 0.999), "decay of the first and second moments", pair(unit_interval, unit_interval, "beta1, beta2")
)
EPS = Option("eps", 1e-6, "added to √v (GaLore's default; AdamW's is 1e-8)", number(minimum=0.0))
#: which arithmetic runs Adam on the CPU and with impl='torch' (docs/kernels.md)
ADAM_KERNELS = ("fused", "reference")
ADAM_KERNEL = Option(
    "adam_kernel",
    "fused",
    "`fused`: torch's fused Adam kernels, one pass (ψ within a few roundings of the reference's; unprojected "
    "tensors step as torch's fused AdamW); `reference`: galore-torch's ops, bit for bit",
    choice(*ADAM_KERNELS),
)


#: ψ buffers are kept for reuse up to this many elements (a low-rank R); a larger tensor (an unprojected
#: embedding outside the fused AdamW path) gets a new one each step rather than a persistent copy of its size
SCRATCH_MAX_NUMEL = 1 << 22


def fused(group: dict, ops) -> bool:
    """Whether the Adam of ``group`` runs torch's fused kernel: ``adam_kernel="fused"`` and the operations are
    the torch reference's (the Triton kernels are fused already; a sharded step wraps its own)."""
    return group.get("adam_kernel", "fused") == "fused" and ops.adam_update is reference.adam_update


def bias_corrected_lr(group: dict, t: int) -> float:
    """Adam's step size after ``t`` updates of its moments: lr·√(1−β2^t)/(1−β1^t)."""
    beta1, beta2 = group["betas"]
    return group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


class Adam(InnerRule):
    """m ← β1·m + (1−β1)·R; v ← β2·v + (1−β2)·R²; U = m / (√v + eps);
    step size lr·√(1−β2^t)/(1−β1^t). State: ``exp_avg``, ``exp_avg_sq``, shaped like R."""

    name = "adam"
    options: ClassVar[tuple[Option, ...]] = (BETAS, EPS, ADAM_KERNEL)
    batched = True
    state_keys: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    shardable: ClassVar[tuple[str, ...]] = ("rows", "cols")  # elementwise
    state_transforms: ClassVar[dict[str, str] | None] = {"exp_avg": "linear", "exp_avg_sq": "second_moment"}

    def state_layout(self, shape, group):
        return {"exp_avg": Spec(shape, requires=("exp_avg_sq",)), "exp_avg_sq": Spec(shape, requires=("exp_avg",))}

    def update(self, R, state, group, ctx: StepContext):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(R.shape, dtype=ctx.state_dtype, device=R.device)
            state["exp_avg_sq"] = torch.zeros(R.shape, dtype=ctx.state_dtype, device=R.device)
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        Rs = R if R.dtype == m.dtype else R.to(m.dtype)  # what adam_update does first
        if fused(group, ctx.ops) and reference.fused_adam_applies(Rs, m, v):
            if (ctx.r_owned or Rs is not R) and Rs.device.type == "cpu":  # ψ over R: no buffer, no zeroing
                (U,) = reference.adam_update_fused_([Rs], [m], [v], beta1, beta2, group["eps"])
                return U, self.step_size(group, state, ctx)
            out = [self._scratch(m)] if m.numel() <= SCRATCH_MAX_NUMEL else None
            (U,) = reference.adam_update_fused([Rs], [m], [v], beta1, beta2, group["eps"], out=out)
        else:
            U = ctx.ops.adam_update(R, m, v, beta1, beta2, group["eps"])
        return U, self.step_size(group, state, ctx)

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer for the fused kernel's ψ, one per shape, dtype and device, reused by every parameter: the
        step consumes ψ (back-projection, weight update) before the rule's next update, and a warm buffer
        spares the page faults of a fresh allocation each time."""
        scratch = self.__dict__.setdefault("_buffers", {})
        key = (like.shape, like.dtype, like.device)
        buf = scratch.get(key)
        if buf is None:
            buf = scratch[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return buf

    def step_size(self, group: dict, state: dict, ctx: StepContext) -> float:
        """lr·√(1−β2^t)/(1−β1^t), with t the steps since the moments were (re)started."""
        return bias_corrected_lr(group, ctx.step - state.get("inner_start", 0))
