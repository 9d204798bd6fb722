"""Checking that what must be identical on every rank is: bases, replicated moments, scalars."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .sharding import is_dtensor


def _replicated(value: torch.Tensor) -> torch.Tensor | None:
    """The local tensor of a state value that every rank should hold identically (None if it is sharded)."""
    if not is_dtensor(value):
        return value  # DDP / one process: every state tensor is a full replica
    if all(type(pl).__name__ == "Replicate" for pl in value.placements):
        return value.to_local()
    return None


def replicated_state_mismatches(optimizer: torch.optim.Optimizer) -> list[str]:
    """Compare every replicated piece of optimizer state with rank 0's copy, bit for bit.

    Under DDP that is all of the state; under FSDP2 the replicated DTensors (right-projection bases, the
    moments of left projections, Fira's limiter norms) and the Python scalars. Returns descriptions of
    the entries that differ on some rank (the same list on every rank); empty when all agree, or without
    a process group. Every rank must call it. Costs one broadcast of the replicated state: a debugging
    and testing aid, not something to run every step.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return []
    entries: list[tuple[str, Any]] = []
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            state = optimizer.state.get(p, {})
            for key in sorted(state):
                entries.append((f"param group {gi}, parameter {pi} ({tuple(p.shape)}): {key}", state[key]))
    layout = [(name, tuple(v.shape) if torch.is_tensor(v) else v) for name, v in entries]
    layouts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, layout)
    if any(other != layouts[0] for other in layouts):
        ours = set(map(str, layouts[0]))
        return sorted({str(e) for other in layouts for e in other if str(e) not in ours} | {"state layout differs"})
    mismatches = []
    for name, value in entries:
        if not torch.is_tensor(value):
            continue
        local = _replicated(value)
        if local is None:
            continue
        ref = local.detach().clone().contiguous()
        dist.broadcast(ref, src=0)
        same = torch.tensor([int(torch.equal(ref, local))], device=ref.device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        if not bool(same.item()):
            mismatches.append(name)
    return mismatches
