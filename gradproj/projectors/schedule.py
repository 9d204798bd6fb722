"""When a matrix's basis is refreshed: the one rule the step, the batched step and projected backward share.

Without stagger (the reference behaviour of galore-torch) every matrix refreshes at ``t % T == 0`` (t counted
before its increment, T the group's ``update_proj_gap`` or, with ``refresh="lazy"``, the matrix's own gap), so
all the matrices of a group refresh at the same step and that step stalls for all their decompositions.

With the group option ``refresh_stagger=True``, matrix k of the N projected matrices of its group (in the
order of ``group["params"]``) gets the offset ``k·T // N``, stored in its state under ``refresh_offset``
when its basis is first computed; it then refreshes at ``t % T == offset % T``. The first basis is still
computed at the matrix's first step. At most ``ceil(N / T)`` matrices of a group then refresh at one step.

The offset lives in the state, so a checkpoint resumes on the same schedule. A state without one (written
with ``refresh_stagger=False``, or a group switched to stagger) stores it at its next step and follows it
from the step after. A changed ``update_proj_gap`` keeps the stored offsets (taken modulo the new gap);
``refresh_stagger=False`` ignores them (they stay in the state, so switching stagger back on resumes the same
offsets). ``refresh="lazy"`` (each matrix's own growing gap) is refused in combination.
"""

from __future__ import annotations

OFFSET_KEY = "refresh_offset"


def offset(k: int, n: int, gap: int) -> int:
    """The offset of matrix ``k`` of ``n``: ``k·gap // n``, spread evenly over ``[0, gap)``."""
    return k * gap // n


def due(state: dict, step: int, gap: int, stagger: bool) -> bool:
    """Whether a matrix with a basis refreshes it at ``step`` (counted before its increment)."""
    shift = state.get(OFFSET_KEY, 0) if stagger else 0
    return step % gap == shift % gap
