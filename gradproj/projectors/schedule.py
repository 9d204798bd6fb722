"""When a matrix's basis is refreshed: the one rule the step, the batched step and projected backward share.

Every matrix computes its first basis at its first step. After that, with t the matrix's step (counted before
its increment), g its gap and o its offset, it refreshes when::

    (t - o) % g == 0

* g is the group's ``update_proj_gap`` T, or with ``refresh="lazy"`` the matrix's own gap (``lazy_gap`` in
  its state, :mod:`gradproj.projectors.lazy`: T until the lazy rule grows it, then ``int(g·γ)`` after
  each growth).
* o is 0 without stagger (the reference behaviour of galore-torch and q-galore-torch: every matrix of a
  group refreshes at ``t % g == 0``, so with a fixed gap they all refresh at the same step, and that step
  stalls for all their decompositions).
* With the group option ``refresh_stagger=True``, matrix k of the N projected matrices of its group (in the
  order of ``group["params"]``) gets the offset ``o = k·T // N`` (in ``[0, T)``), stored in its state under
  ``refresh_offset`` when its basis is first computed. With a fixed gap at most ``ceil(N / T)`` matrices of
  a group then refresh at one step.

With ``refresh="lazy"`` and stagger the matrix keeps its phase while its gap grows: after a refresh at
``t0`` (``t0 ≡ o mod g``) whose similarity test grows the gap to ``g'``, the next refresh is the first
``t > t0`` with ``t ≡ o (mod g')`` — exactly the lazy schedule without stagger, shifted by o. When every
gap is a multiple of T (an integer ``lazy_gap_factor``), ``t ≡ o (mod g)`` implies ``t ≡ o (mod T)``, so
the stagger bound of ``ceil(N / T)`` refreshes per step still holds; a fractional factor can let two
matrices' phases meet.

The offset and the lazy gap live in the state, so a checkpoint resumes on the same schedule. A state
without an offset (written with ``refresh_stagger=False``, or a group switched to stagger) stores it at its
next step and follows it from the step after. A changed ``update_proj_gap`` keeps the stored offsets (taken
modulo the gap); ``refresh_stagger=False`` ignores them (they stay in the state, so switching stagger back on
resumes the same offsets).
"""

from __future__ import annotations

OFFSET_KEY = "refresh_offset"


def offset(k: int, n: int, gap: int) -> int:
    """The offset of matrix ``k`` of ``n``: ``k·gap // n``, spread evenly over ``[0, gap)``."""
    return k * gap // n


def due(state: dict, step: int, gap: int, stagger: bool) -> bool:
    """Whether a matrix with a basis refreshes it at ``step`` (counted before its increment): ``(step - o) %
    gap == 0`` with o the stored offset under stagger, else 0; ``gap`` is the group's ``update_proj_gap`` or
    the matrix's lazy gap."""
    shift = state.get(OFFSET_KEY, 0) if stagger else 0
    return (step - shift) % gap == 0
