"""The optimizers ``gradproj train`` / ``compare`` know by name.

Adding one is one line in :data:`OPTIMIZERS`: the class (as ``"module:Name"``, imported only when used),
its default learning rate, whether it takes GaLore's projected param groups, and default constructor
arguments / projected-group keys. A name whose class cannot be imported in this installation (an optional
dependency missing, or a class this version of gradproj does not have) is listed as unavailable and
rejected with a clear message, so the table can name optimizers before they exist.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger("gradproj")

_ADAFACTOR_FIXED_LR = {"scale_parameter": False, "relative_step": False, "warmup_init": False}


@dataclass(frozen=True)
class OptimizerSpec:
    #: ``"module:Class"``; resolved lazily
    target: str
    #: default learning rate (the papers' recipes: 1e-3 for full-rank Adam, 1e-2 with projection, α = 0.25)
    lr: float
    #: takes GaLore's projected param groups (rank, update_proj_gap, scale, proj_type)
    projected: bool = True
    #: default constructor keyword arguments
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: default keys of the projected group
    group: dict[str, Any] = field(default_factory=dict)
    #: default scale (alpha) of the projected matrices
    scale: float = 0.25
    help: str = ""

    def resolve(self) -> type[torch.optim.Optimizer] | None:
        """The optimizer class, or None when it cannot be imported here."""
        module, _, name = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None
        except Exception as err:  # an optional dependency failing at import (e.g. a broken CUDA setup)
            log.debug("gradproj: importing %s failed: %s", self.target, err)
            return None


#: name -> spec. One line per optimizer.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch.optim:AdamW", 1e-3, projected=False, kwargs={"weight_decay": 0.0}, help="torch.optim.AdamW (full-rank baseline)"),
    "adamw8bit": OptimizerSpec("bitsandbytes.optim:AdamW8bit", 1e-3, projected=False, kwargs={"weight_decay": 0.0}, help="bitsandbytes 8-bit AdamW (full-rank baseline)"),
    "adafactor": OptimizerSpec("transformers.optimization:Adafactor", 1e-3, projected=False, kwargs=_ADAFACTOR_FIXED_LR, help="transformers Adafactor, fixed lr (full-rank baseline)"),
    "galore_adamw": OptimizerSpec("gradproj:GaLoreAdamW", 1e-2, help="GaLore: Adam in a low-rank gradient subspace"),
    "fira_adamw": OptimizerSpec("gradproj:FiraAdamW", 1e-2, help="Fira: GaLore plus the scaled residual, norm-growth limited"),
    "frugal_adamw": OptimizerSpec("gradproj:FrugalAdamW", 1e-3, scale=1.0, help="FRUGAL: Adam in the subspace, signSGD outside it"),
    "galore_adamw8bit": OptimizerSpec("gradproj:GaLoreAdamW8bit", 1e-2, help="GaLore with 8-bit blockwise moments"),
    "galore_adafactor": OptimizerSpec("gradproj:GaLoreAdafactor", 1e-2, kwargs=_ADAFACTOR_FIXED_LR, help="GaLore with Adafactor's factored second moment"),
}


def available_optimizers() -> list[str]:
    return [name for name, spec in OPTIMIZERS.items() if spec.resolve() is not None]


def get_spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(available_optimizers())}")
    spec = OPTIMIZERS[name]
    if spec.resolve() is None:
        raise ValueError(
            f"optimizer {name!r} ({spec.target.replace(':', '.')}) is not available in this installation; "
            f"available: {', '.join(available_optimizers())}"
        )
    return spec


def available_projectors() -> list[str]:
    from ..projectors import PROJECTORS

    return sorted(PROJECTORS)


@dataclass
class OptimizerChoice:
    """Everything that selects and configures the optimizer of a run (plain values: goes into config.json)."""

    name: str = "galore_adamw"
    lr: float | None = None  # None: the spec's default
    weight_decay: float = 0.0
    rank: int | None = None  # None: hidden // 4, GaLore's ratio at 60M, 350M, 1B and 7B
    update_proj_gap: int = 200
    scale: float | None = None  # None: the spec's default (0.25; FRUGAL 1.0, with AdamW's lr)
    proj_type: str = "std"
    projector: str | None = None  # None: the optimizer's default (svd)
    target_modules: list[str] | None = None  # None: every Linear of the decoder blocks
    layerwise: bool = False
    group_options: dict[str, Any] = field(default_factory=dict)
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    sampler: str | None = None  # "uniform" (LISA) or "owl" (OwLore)
    active_layers: int = 2
    sample_interval: int = 50

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_spec(self.name).lr


def build_optimizer(model: nn.Module, choice: OptimizerChoice, hidden: int, seed: int = 0,
                    accumulation_steps: int = 1) -> torch.optim.Optimizer:
    """Build the optimizer ``choice`` describes for ``model``; raises ValueError naming the bad option.

    ``accumulation_steps``: backward passes per optimizer step; with ``choice.layerwise`` the per-layer
    hooks accumulate that many gradients before stepping each weight (``--grad-accum``).
    """
    spec = get_spec(choice.name)
    cls = spec.resolve()
    kwargs: dict[str, Any] = {
        **spec.kwargs,
        "lr": choice.learning_rate(),
        "weight_decay": choice.weight_decay,
        **choice.optimizer_options,
    }
    if choice.layerwise:
        kwargs["layerwise"] = True
        if accumulation_steps > 1:
            kwargs.setdefault("accumulation_steps", accumulation_steps)
    trainable_only = True
    if choice.sampler is not None:
        kwargs["sampler"] = _build_sampler(model, choice, seed)
        trainable_only = False
    if spec.projected:
        if choice.projector is not None and choice.projector not in available_projectors():
            raise ValueError(f"unknown projector {choice.projector!r}; available: {', '.join(available_projectors())}")
        import gradproj

        extra = {**spec.group, **choice.group_options}
        if choice.projector is not None:
            extra["projector"] = choice.projector
        params: Any = gradproj.param_groups(
            model,
            target_modules=choice.target_modules,
            rank=choice.rank if choice.rank is not None else max(1, hidden // 4),
            update_proj_gap=choice.update_proj_gap,
            scale=choice.scale if choice.scale is not None else spec.scale,
            proj_type=choice.proj_type,
            trainable_only=trainable_only,
            **extra,
        )
    else:
        ignored = [k for k, v in (("--projector", choice.projector), ("--rank", choice.rank)) if v is not None]
        if choice.group_options:
            ignored.append("--group-option")
        if ignored:
            log.warning("gradproj: %s does not project gradients; ignoring %s", choice.name, ", ".join(ignored))
        params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    try:
        return cls(params, **kwargs)
    except TypeError as err:
        raise ValueError(f"optimizer {choice.name!r} rejected its options {sorted(kwargs)}: {err}") from None


def _build_sampler(model: nn.Module, choice: OptimizerChoice, seed: int):
    from ..sampling import LayerSampler as sampler_cls

    if choice.sampler not in ("uniform", "owl"):
        raise ValueError(f"sampler = {choice.sampler!r}; use 'uniform' (LISA) or 'owl' (OwLore)")
    blocks = model.model.layers
    try:
        return sampler_cls(blocks, choice.active_layers, choice.sample_interval, probs=choice.sampler, seed=seed)
    except ValueError as err:
        if choice.sampler != "owl":
            raise
        raise ValueError(
            "--sampler owl draws blocks by their share of outlier weights, and the freshly initialised model "
            f"gradproj train builds has none ({err}). OwLore is for fine-tuning a pretrained model: use it from "
            "Python (docs/owlore.md), or --sampler uniform here"
        ) from None
