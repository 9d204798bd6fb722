"""What one parameter's optimizer state may hold, and the check of a state against it.

Each axis says which state keys it owns and what they must look like (:class:`Spec`): the projector
(:meth:`gradproj.projectors.Projector.state_layout`), the inner rule
(:meth:`gradproj.inner.InnerRule.state_layout`), the residual rule
(:meth:`gradproj.residual.Residual.state_layout`), plus the keys of the outer step itself
(:data:`COMMON`). :func:`state_problem` compares a state with the union: an unknown key, a tensor of the
wrong shape or kind, a key without its companion (one Adam moment without the other), DCT indices out of
range. ``load_state_dict`` refuses a checkpoint with any problem before it loads anything; ``step()``
restarts the projected state of a parameter whose group changed its ``rank``, ``proj_type`` or
``projector`` since the state was written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: ``Spec.shape`` for a plain Python int (a step count, a seed)
INT = None


@dataclass(frozen=True)
class Spec:
    """One state entry: a Python int (``shape=None``) or a tensor of ``shape`` and ``kind``.

    ``kind``: ``"float"`` (floating point), ``"index"`` (integer tensor with values in ``[0, bound)``),
    ``"codes"`` (uint8 codes or floating values). ``requires``: keys that must be present with this one.
    """

    shape: tuple[int, ...] | None
    kind: str = "float"
    bound: int | None = None
    requires: tuple[str, ...] = ()


def scalar_int() -> Spec:
    return Spec(INT)


def scalar_float() -> Spec:
    return Spec(())


#: keys of the outer step (every parameter): the step count, when the inner state last restarted, the
#: stochastic-rounding seed, the norm-growth limiter's last norm
COMMON: dict[str, Spec] = {
    "step": scalar_int(),
    "inner_start": scalar_int(),
    "sr_seed": scalar_int(),
    "update_norm": scalar_float(),
    "accum_count": scalar_int(),
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)  # a DTensor reports its global shape


def value_problem(key: str, value: Any, spec: Spec, deep: bool) -> str | None:
    """Why ``value`` does not fit ``spec`` (None when it does). ``deep``: also read values (index bounds)."""
    if spec.shape is INT:
        return None if _is_int(value) else f"{key!r} is {type(value).__name__} {value!r}, expected an int"
    if not isinstance(value, torch.Tensor):
        return f"{key!r} is a {type(value).__name__}, expected a tensor of shape {spec.shape}"
    if _shape(value) != spec.shape:
        return f"{key!r} has shape {_shape(value)}, expected {spec.shape}"
    dtype = value.dtype
    if spec.kind == "float" and not dtype.is_floating_point:
        return f"{key!r} has dtype {dtype}, expected a floating-point tensor"
    if spec.kind == "codes" and not (dtype == torch.uint8 or dtype.is_floating_point):
        return f"{key!r} has dtype {dtype}, expected uint8 codes or a floating-point tensor"
    if spec.kind == "index":
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            return f"{key!r} has dtype {dtype}, expected integer indices"
        if deep and value.numel() and spec.bound is not None:
            lo, hi = int(value.min()), int(value.max())
            if lo < 0 or hi >= spec.bound:
                return f"{key!r} holds indices in [{lo}, {hi}], outside [0, {spec.bound})"
    return None


def state_problem(state: dict, layout: dict[str, Spec], deep: bool = False) -> str | None:
    """The first way ``state`` departs from ``layout`` (None when it fits)."""
    for key, value in state.items():
        spec = layout.get(key)
        if spec is None:
            return f"holds {key!r}, which this parameter's projector, inner rule and residual do not use"
        problem = value_problem(key, value, spec, deep)
        if problem is not None:
            return problem
        missing = [k for k in spec.requires if k not in state]
        if missing:
            return f"holds {key!r} without {', '.join(map(repr, missing))}"
    return None
