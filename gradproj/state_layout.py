"""What one parameter's optimizer state may hold, and the check of a state against it.

Each axis says which state keys it owns and what they must look like (:class:`Spec`): the projector
(:meth:`gradproj.projectors.Projector.state_layout`), the inner rule
(:meth:`gradproj.inner.InnerRule.state_layout`), the residual rule
(:meth:`gradproj.residual.Residual.state_layout`), plus the keys of the outer step itself
(:data:`COMMON`). :func:`state_problem` compares a state with the union: an unknown key, a tensor of the
wrong shape or kind, a key without its companion (one Adam moment without the other), DCT indices out of
range. ``load_state_dict`` refuses a checkpoint with any problem before it loads anything; ``step()``
restarts the projected state of a parameter whose group changed its ``rank``, ``proj_type`` or
``projector`` since the state was written. :func:`layout_bytes` turns a layout into the bytes a state of
that layout holds, which is how :mod:`gradproj.memory_estimate` counts optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

#: ``Spec.shape`` for a plain Python int (a step count, a seed)
INT = None


@dataclass(frozen=True)
class Spec:
    """One state entry: a Python int (``shape=None``) or a tensor of ``shape`` and ``kind``.

    ``kind``: ``"float"`` (floating point), ``"index"`` (integer tensor with values in ``[0, bound)``; a Python int
    with a ``bound`` must lie in that range too),
    ``"codes"`` (uint8 codes or floating values). ``requires``: keys that must be present with this one.
    ``dtype``: when set (a torch dtype's name), the tensor must have exactly that dtype (the kind is then not
    checked) and counts that dtype's bytes per element (the codes and scales of a quantized basis).
    """

    shape: tuple[int, ...] | None
    kind: str = "float"
    bound: int | None = None
    requires: tuple[str, ...] = ()
    dtype: str | None = None


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
        if not _is_int(value):
            return f"{key!r} is {type(value).__name__} {value!r}, expected an int"
        if spec.bound is not None and not 0 <= value < spec.bound:
            return f"{key!r} is {value}, outside [0, {spec.bound})"
        return None
    if not isinstance(value, torch.Tensor):
        return f"{key!r} is a {type(value).__name__}, expected a tensor of shape {spec.shape}"
    if _shape(value) != spec.shape:
        return f"{key!r} has shape {_shape(value)}, expected {spec.shape}"
    dtype = value.dtype
    if spec.dtype is not None:
        return None if dtype == getattr(torch, spec.dtype) else f"{key!r} has dtype {dtype}, expected {spec.dtype}"
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


#: bytes of one element of an ``"index"`` tensor (int32) and of ``"codes"`` when they are 8-bit
INDEX_BYTES, CODE_BYTES = 4, 1
#: ``"codes"`` that are not quantized (a tensor below the 8-bit threshold) are kept as float32
UNQUANTIZED_CODE_DTYPE = torch.float32
#: 0-dim float state (norms, Adafactor's RMS, torch.optim's step tensor) and the block scales of codes
SCALAR_DTYPE = torch.float32


def _itemsize(dtype: torch.dtype | str) -> int:
    torch_dtype: torch.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.empty((), dtype=torch_dtype).element_size()


def is_code_scale(spec: Spec, layout: dict[str, Spec]) -> bool:
    """Whether ``spec`` holds the block scales of 8-bit codes: a float entry that requires a ``"codes"`` one."""
    return spec.kind == "float" and any(layout.get(k, Spec(INT)).kind == "codes" for k in spec.requires)


def spec_bytes(spec: Spec, float_dtype: torch.dtype | str, *, quantized: bool = False, code_scale: bool = False) -> int:
    """Bytes of one entry of a layout; see :func:`layout_bytes` for the rules."""
    if spec.shape is INT:
        return 0
    numel = math.prod(spec.shape)
    if spec.dtype is not None:
        return numel * _itemsize(spec.dtype)
    if spec.kind == "index":
        return INDEX_BYTES * numel
    if spec.kind == "codes":
        return numel * (CODE_BYTES if quantized else _itemsize(UNQUANTIZED_CODE_DTYPE))
    if code_scale:
        return numel * _itemsize(SCALAR_DTYPE) if quantized else 0
    if spec.shape == ():
        return _itemsize(SCALAR_DTYPE)
    return numel * _itemsize(float_dtype)


def layout_bytes(
    layout: dict[str, Spec],
    float_dtype: torch.dtype | str,
    *,
    quantized: bool = False,
    context: dict[str, Spec] | None = None,
) -> int:
    """Bytes of a state holding every entry of ``layout``, whose floating-point tensors are ``float_dtype``.

    Call it once per axis, with the dtype that axis stores floats in: the parameter's dtype for a
    projector's layout (dense bases), the inner rule's state dtype for the inner rule's, anything for a
    residual's (its entries are 0-dim). The rules:

    * ``shape=None`` (a Python int: step counts, seeds): 0 bytes;
    * an entry with a ``dtype``: that dtype's size per element;
    * ``kind="index"``: int32, 4 bytes per element;
    * ``kind="codes"``: 1 byte per element when ``quantized`` (8-bit codes), else float32 (a tensor below
      the 8-bit threshold keeps float32 values);
    * a ``"float"`` entry that requires a ``"codes"`` one holds the codes' block scales: float32 when
      ``quantized``, absent (0 bytes) otherwise;
    * a 0-dim ``"float"`` (a norm, an RMS, torch.optim's step tensor): float32, 4 bytes;
    * any other ``"float"``: ``float_dtype``.

    A layout lists every key a state *may* hold; a caller counting a state that holds only some of them
    (an optional first moment) passes the layout without the others. ``context``: the whole state's layout
    when ``layout`` is one axis of it (to recognise block scales whose codes another axis lists).
    """
    whole = layout if context is None else {**context, **layout}
    return sum(
        spec_bytes(spec, float_dtype, quantized=quantized, code_scale=is_code_scale(spec, whole))
        for spec in layout.values()
    )


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
