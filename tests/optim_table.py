"""The table of optimizers the generic tests run over. A new optimizer joins every generic test by one line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import gradproj


@dataclass
class OptSpec:
    id: str
    cls: Callable[..., torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor kwargs
    group: dict[str, Any] = field(default_factory=dict)  # keys of the projected group

    def make(self, model, lr=1e-2, **extra):
        groups = gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5, **self.group)
        return self.cls(groups, lr=lr, **{**self.kwargs, **extra})


OPTIMIZERS = [
    OptSpec("galore_adamw", gradproj.GaLoreAdamW),
    OptSpec("galore_adamw_full", gradproj.GaLoreAdamW, group={"proj_type": "full"}),
    OptSpec("galore_adamw_wd", gradproj.GaLoreAdamW, kwargs={"weight_decay": 0.1}),
    OptSpec("fira_adamw", gradproj.FiraAdamW),
    OptSpec("galore_adamw8bit", gradproj.GaLoreAdamW8bit, kwargs={"min_8bit_size": 200}),  # emb/head 8-bit, fc fp32
    OptSpec("galore_adafactor", gradproj.GaLoreAdafactor, kwargs={"relative_step": False}),
]


def ids(specs=OPTIMIZERS):
    return [s.id for s in specs]
