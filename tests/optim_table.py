"""The table of optimizers the generic tests run over. A new optimizer joins every generic test by one line.

Each row names a registered optimizer (:mod:`gradproj.registry`) and the options of one variant; the class
comes from the registry, and test_registry.py checks that every registered gradproj optimizer has a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import gradproj
from gradproj import registry


@dataclass
class OptSpec:
    id: str
    optimizer: str  # a name of gradproj.registry.OPTIMIZERS
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor kwargs
    group: dict[str, Any] = field(default_factory=dict)  # keys of the projected group
    sampler: Callable[[torch.nn.Module], Any] | None = None  # builds a LayerSampler for the model

    @property
    def cls(self) -> Callable[..., torch.optim.Optimizer]:
        cls = registry.get_optimizer(self.optimizer).resolve()
        if cls is None:
            raise ImportError(f"optimizer {self.optimizer!r} cannot be imported here")
        return cls

    def make(self, model, lr=1e-2, **extra):
        if self.sampler is not None:
            extra = {"sampler": self.sampler(model), **extra}
        groups = gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5, trainable_only=self.sampler is None,
                                       **self.group)
        return self.cls(groups, lr=lr, **{**self.kwargs, **extra})


OPTIMIZERS = [
    OptSpec("galore_adamw", "galore_adamw"),
    OptSpec("galore_adamw_full", "galore_adamw", group={"proj_type": "full"}),
    OptSpec("galore_adamw_wd", "galore_adamw", kwargs={"weight_decay": 0.1}),
    OptSpec("galore_adamw_foreach", "galore_adamw", kwargs={"weight_decay": 0.1, "foreach": True}),
    OptSpec("fira_adamw", "fira_adamw"),
    # seed 0 draws fc1, emb, fc1 at steps 0, 3, 6: the 7-step resume test crosses a free and a fresh return
    OptSpec("galore_adamw_sampler", "galore_adamw", sampler=lambda m: gradproj.LayerSampler(
        [m.emb, m.fc1], n_active=1, interval=3, probs=[1.0, 3.0])),
    OptSpec("frugal_adamw", "frugal_adamw"),
    OptSpec("galore_adamw_limited", "galore_adamw", kwargs={"norm_growth_limit": 1.01}),
    OptSpec("galore_rsvd", "galore_adamw", group={"projector": "randomized_svd"}),
    OptSpec("galore_eigh", "galore_adamw", group={"projector": "eigh"}),
    OptSpec("galore_dct", "galore_adamw", group={"projector": "dct"}),
    OptSpec("galore_random_project", "galore_adamw", group={"projector": "random", "moments_on_refresh": "project"}),
    OptSpec("galore_golore", "galore_adamw",  # switches to random bases at step 9: after the checkpoint at 7
            group={"projector": "golore", "golore_switch_step": 9, "random_kind": "orthonormal"}),
    OptSpec("fira_dct_project", "fira_adamw", group={"projector": "dct", "moments_on_refresh": "project"}),
    OptSpec("galore_adamw8bit", "galore_adamw8bit", kwargs={"min_8bit_size": 200}),  # emb/head 8-bit, fc fp32
    OptSpec("galore_adafactor", "galore_adafactor", kwargs={"relative_step": False}),
]


def ids(specs=OPTIMIZERS):
    return [s.id for s in specs]
