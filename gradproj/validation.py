"""Checks shared by every option of every axis: numbers, and the refusal of unknown keys.

Each check raises ``ValueError`` (``TypeError`` for unknown keys, as Python does for unexpected keyword
arguments) naming where the value came from (``"param group 1"``) and what to write instead. They run
before anything is modified.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

#: group keys that other parts of the torch stack write into param groups (LR schedulers, SWA, named
#: parameters); a gradproj optimizer accepts them and leaves them alone
FOREIGN_GROUP_KEYS = frozenset(
    {
        "params",
        "param_names",
        "name",
        "initial_lr",
        "max_lr",
        "min_lr",
        "base_lr",
        "base_momentum",
        "max_momentum",
        "swa_lr",
        "differentiable",
    }
)


def is_number(value: Any) -> bool:
    """A real Python / NumPy number or a 0-dim real tensor (never a bool or a string)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real)


def check_number(
    value: Any,
    name: str,
    where: str,
    *,
    minimum: float | None = None,
    exclusive: bool = False,
    maximum: float | None = None,
    integer: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number within the bounds (or None when allowed)."""
    if value is None and allow_none:
        return
    ok = is_number(value) and math.isfinite(float(value))
    if ok and integer:
        ok = isinstance(value, int)
    if ok and minimum is not None:
        ok = float(value) > minimum if exclusive else float(value) >= minimum
    if ok and maximum is not None:
        ok = float(value) <= maximum
    if ok:
        return
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if exclusive else '>='} {minimum:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    what = ("an integer " if integer else "") + (" and ".join(bounds) if bounds else "a finite number")
    if bounds and not integer and not (is_number(value) and math.isfinite(float(value))):
        what += " (a finite number)"
    none = " (or None)" if allow_none else ""
    raise ValueError(f"{where}: {name} = {value!r} must be {what}{none}{'; ' + hint if hint else ''}")


def check_bool(value: Any, name: str, where: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {name} = {value!r} must be True or False")


def refuse_unknown(keys: Iterable[str], allowed: Iterable[str], where: str, what: str = "option") -> None:
    """``TypeError`` listing each key not in ``allowed``, with the closest valid name where there is one."""
    allowed = sorted(set(allowed))
    unknown = sorted(set(keys) - set(allowed))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(
        f"{where}: unexpected {what}{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; valid {what}s are "
        f"{', '.join(allowed)}"
    )
