"""The optimizers ``gradproj train`` / ``compare`` know by name: those of :mod:`gradproj.registry`.

Adding one is one :func:`gradproj.registry.register_optimizer` call: the class (as ``"module:Name"``,
imported only when used), its default learning rate, whether it takes GaLore's projected param groups,
default constructor arguments / projected-group keys, and how its state is laid out (for the memory
estimators). A name whose class cannot be imported in this installation (an optional dependency missing,
or a class this version of gradproj does not have) is listed as unavailable and rejected with a clear
message, so the table can name optimizers before they exist. Aliases (old spellings such as
``galore_8bit``) are accepted wherever a name is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import registry
from ..registry import OPTIMIZERS as OPTIMIZERS  # re-exported: the registry's one table
from ..registry import OptimizerEntry, available_optimizers

log = logging.getLogger("gradproj")

#: the registry's entry type, under the name this module has always used
OptimizerSpec = OptimizerEntry


def get_spec(name: str) -> OptimizerEntry:
    """The registered entry of ``name`` (or of an alias); ValueError when unknown or not importable here."""
    try:
        spec = registry.get_optimizer(name)
    except ValueError:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(available_optimizers())}") from None
    if spec.resolve() is None:
        raise ValueError(
            f"optimizer {name!r} ({spec.target.replace(':', '.')}) is not available in this installation; "
            f"available: {', '.join(available_optimizers())}"
        )
    return spec


def available_projectors() -> list[str]:
    return registry.projector_names()


@dataclass
class OptimizerChoice:
    """Everything that selects and configures the optimizer of a run (plain values: goes into config.json)."""

    name: str = "galore_adamw"
    lr: float | None = None  # None: the spec's default
    weight_decay: float = 0.0
    rank: int | None = None  # None: the spec's, else hidden // 4, GaLore's ratio at 60M, 350M, 1B and 7B
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
    #: lr of every parameter outside the target matrices (embeddings, norms, head); None: ``lr`` for all of them
    embed_lr: float | None = None

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_spec(self.name).lr


def build_optimizer(
    model: nn.Module, choice: OptimizerChoice, hidden: int, seed: int = 0, accumulation_steps: int = 1
) -> torch.optim.Optimizer:
    """Build the optimizer ``choice`` describes for ``model``; raises ValueError naming the bad option.

    ``accumulation_steps``: backward passes per optimizer step; with ``choice.layerwise`` the per-layer
    hooks accumulate that many gradients before stepping each weight (``--grad-accum``).
    """
    spec = get_spec(choice.name)
    cls = spec.resolve()
    assert cls is not None  # get_spec refuses optimizers that cannot be imported
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
            rank=choice.rank if choice.rank is not None else spec.rank or max(1, hidden // 4),
            update_proj_gap=choice.update_proj_gap,
            scale=choice.scale if choice.scale is not None else spec.scale,
            proj_type=choice.proj_type,
            trainable_only=trainable_only,
            **extra,
        )
        if choice.embed_lr is not None:
            for group in params:
                if "rank" not in group:
                    group["lr"] = choice.embed_lr
    elif choice.embed_lr is not None:  # the same split as the projected methods': target matrices / the rest
        params = _split_groups(model, choice, trainable_only)
    else:
        params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    if not spec.projected:
        ignored = [k for k, v in (("--projector", choice.projector), ("--rank", choice.rank)) if v is not None]
        if choice.group_options:
            ignored.append("--group-option")
        if ignored:
            log.warning("gradproj: %s does not project gradients; ignoring %s", choice.name, ", ".join(ignored))
    try:
        return cls(params, **kwargs)
    except TypeError as err:
        raise ValueError(f"optimizer {choice.name!r} rejected its options {sorted(kwargs)}: {err}") from None


def _split_groups(model: nn.Module, choice: OptimizerChoice, trainable_only: bool) -> list[dict[str, Any]]:
    """Plain groups for an optimizer that projects nothing: the target matrices at its lr, the rest at
    ``choice.embed_lr`` (the split gradproj.param_groups makes, without its log line about projecting)."""
    import gradproj

    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        groups = gradproj.param_groups(model, target_modules=choice.target_modules, trainable_only=trainable_only)
    finally:
        log.setLevel(level)
    return [{"params": g["params"], **({} if "rank" in g else {"lr": choice.embed_lr})} for g in groups]


def _build_sampler(model: nn.Module, choice: OptimizerChoice, seed: int):
    from ..sampling import LayerSampler as sampler_cls

    if choice.sampler not in ("uniform", "owl"):
        raise ValueError(f"sampler = {choice.sampler!r}; use 'uniform' (LISA) or 'owl' (OwLore)")
    blocks: Any = model.model.layers  # type: ignore[union-attr]  # a LLaMA's decoder layers (nn.Module.__getattr__)
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
