"""Param-group helpers: which weights to project."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

log = logging.getLogger("gradproj")


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except NotImplementedError:
            return None
    return None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(p in name or re.fullmatch(p, name) for p in patterns)


def param_groups(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    *,
    trainable_only: bool = True,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into a projected group and a regular group, ready for any gradproj optimizer.

    Args:
        target_modules: which modules' weights to project, matched against module names from
            ``model.named_modules()``: a pattern matches when it is a substring of the name or the whole
            name matches it as a regular expression (as transformers' ``optim_target_modules``).
            ``"all-linear"`` takes every ``nn.Linear`` except the output head. ``None`` (default) takes
            every ``nn.Linear`` weight except embeddings and the output head. Explicit patterns may also
            select other modules with >= 2-D weights (a conv weight is projected as the matrix [out, rest]).
        rank, update_proj_gap, scale, proj_type: GaLore's group keys for the projected group.
        trainable_only: leave out parameters with ``requires_grad=False`` (set False when a layer sampler
            will toggle them).
        **group_options: further keys for the projected group (``projector``, ``residual``, ``lr``, ...).

    Returns:
        ``[{"params": regular}, {"params": projected, "rank": ..., ...}]`` with empty groups left out.
        Only weights with two or more dimensions ever enter the projected group.
    """
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    head = _output_head(model)
    projected: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() < 2 or id(weight) in seen:
            continue
        if trainable_only and not weight.requires_grad:
            continue
        if target_modules is None or target_modules == "all-linear":
            chosen = isinstance(module, nn.Linear) and module is not head
        else:
            chosen = _matches(name, target_modules)
        if chosen:
            seen.add(id(weight))
            projected.append(weight)
    if not projected:
        names = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)][:8]
        raise ValueError(
            f"target_modules={target_modules!r} matched no module with a >= 2-D weight; module names look like {names}"
        )
    regular = [p for p in model.parameters() if id(p) not in seen and (p.requires_grad or not trainable_only)]
    # model.parameters() already de-duplicates tied weights
    log.info(
        "gradproj: projecting %d weight matrices at rank %d; %d other tensors unprojected",
        len(projected),
        rank,
        len(regular),
    )
    groups: list[dict[str, Any]] = []
    if regular:
        groups.append({"params": regular})
    groups.append(
        {
            "params": projected,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "proj_type": proj_type,
            **group_options,
        }
    )
    return groups
