"""Measuring optimizer state: bytes by state key and by part."""

from __future__ import annotations

from collections import defaultdict

import torch

#: which part of the optimizer state each key belongs to
PARTS = {
    "proj": "basis",
    "proj_left": "basis",
    "proj_right": "basis",
    "proj_idx": "basis",
    "proj_idx_left": "basis",
    "proj_idx_right": "basis",
    "exp_avg": "moments",
    "exp_avg_sq": "moments",
}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds on this process (the local shard of a DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of every tensor in the optimizer's per-parameter state.

    Returns a dict with ``total``, one entry per part (``basis``, ``moments``, ``other``) and one entry
    per state key prefixed ``key:`` (e.g. ``key:exp_avg``). Plain Python scalars (the step count) are
    not counted.
    """
    out: dict[str, int] = defaultdict(int)
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                b = tensor_bytes(value)
                out["total"] += b
                out[PARTS.get(key, "other")] += b
                out[f"key:{key}"] += b
    out.setdefault("total", 0)
    return dict(out)
