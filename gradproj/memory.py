"""Measuring optimizer state: bytes by state key and by part."""

from __future__ import annotations

from collections import defaultdict

import torch

#: the parts :func:`optimizer_state_bytes` reports (always present in its result, possibly 0)
PART_NAMES = ("basis", "moments", "scales", "accumulation", "other")

#: which part of the optimizer state each key belongs to (inner rules add theirs: ``InnerRule.state_parts``)
PARTS = {
    "proj": "basis",
    "proj_left": "basis",
    "proj_right": "basis",
    # a quantized basis (basis_bits): its codes and per-group scales are the basis
    **{k + suffix: "basis" for k in ("proj", "proj_left", "proj_right") for suffix in ("_codes", "_scales")},
    "proj_idx": "basis",
    "proj_idx_left": "basis",
    "proj_idx_right": "basis",
    "exp_avg": "moments",
    "exp_avg_sq": "moments",
    "accum": "accumulation",
}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds on this process (the local shard of a DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def state_parts() -> dict[str, str]:
    """Key -> part for every known state key: :data:`PARTS` plus every registered inner rule's keys."""
    from .inner import INNER_RULES

    parts = dict(PARTS)
    for rule in INNER_RULES.values():
        for key in rule.state_keys:
            parts.setdefault(key, "moments")
        parts.update(rule.state_parts)
    return parts


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of every tensor in the optimizer's per-parameter state.

    Returns a dict with ``total``; one entry per part — ``basis`` (projection matrices), ``moments``
    (the inner rule's statistics: Adam's m and v in whatever precision, 8-bit codes included, Adafactor's
    row/column factors), ``scales`` (the fp32 block scales of quantized moments), ``accumulation``
    (per-layer low-rank gradient buffers; only inside an accumulation window) and ``other`` (limiter
    norms, Adafactor's RMS, ...); and one entry per state key prefixed ``key:`` (e.g. ``key:exp_avg``).
    Works for any ``torch.optim`` optimizer (unknown keys count as ``other``). Plain Python scalars (the
    step count) are not counted.
    """
    parts = state_parts()
    out: dict[str, int] = defaultdict(int)
    for name in ("total", *PART_NAMES):
        out[name] = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                b = tensor_bytes(value)
                out["total"] += b
                out[parts.get(key, "other")] += b
                out[f"key:{key}"] += b
    return dict(out)
