"""The Triton operations module: the same functions as :mod:`gradproj.kernels.reference`, fused.

Imported only when ``impl`` selects Triton (see :func:`gradproj.kernels.resolve`); importing it defines
the kernels but compiles nothing (each kernel compiles at its first launch, per dtype/flag combination,
and is cached by Triton). Whether the kernels run compiled or under the Triton interpreter is fixed
when this module is first imported, by the ``TRITON_INTERPRET`` environment variable at that moment.
"""

from __future__ import annotations

from . import reference
from ._triton_common import interpreting_at_import
from .adam import adam_update
from .fira import (
    ScaledResidual,
    axis_norms,
    fira_residual,
    fira_residual_factors,
    fira_scaled_residual,
    limit_norm_growth_,
)
from .update import apply_update

#: True when the kernels were defined for the Triton interpreter (CPU tensors), False when compiled
INTERPRETED = interpreting_at_import()
apply_weight_decay_ = reference.apply_weight_decay_  # a single in-place add: nothing to fuse
accumulation_dtype = reference.accumulation_dtype
norm_growth_divisor = reference.norm_growth_divisor  # one scalar rule
# whole-tensor norms stay on torch: the overflow check costs passes off the CPU (docs/kernels.md), but the
# optimizer takes them only for the norm_growth_limit option (Fira's own norms are fused above)
safe_norm = reference.safe_norm
low_rank_norm = reference.low_rank_norm

__all__ = [
    "INTERPRETED",
    "ScaledResidual",
    "accumulation_dtype",
    "adam_update",
    "apply_update",
    "apply_weight_decay_",
    "axis_norms",
    "fira_residual",
    "fira_residual_factors",
    "fira_scaled_residual",
    "limit_norm_growth_",
    "low_rank_norm",
    "norm_growth_divisor",
    "safe_norm",
]
