"""The registered names of gradproj: optimizers, inner rules, projectors and residual rules.

Every place that lists or accepts a name reads it from here: the ``gradproj`` command (``list``,
``--optimizer``, ``--projector``), :mod:`gradproj.memory_estimate`, :mod:`gradproj.distributed.estimate`
and the tests that run every optimizer.

* **Optimizers**: :data:`OPTIMIZERS` (name -> :class:`OptimizerEntry`). An entry names its class as
  ``"module:Class"``, imported only when used, so a name can be listed (and sized by the memory estimator)
  whether or not its optional dependency is installed. It also holds the recipe the command uses (default
  lr, scale, constructor arguments, projected-group keys) and how the optimizer's state is laid out (its
  inner rule, residual rule and any per-tensor state of its own), which the memory estimator turns into
  bytes. Old spellings are aliases (:data:`OPTIMIZER_ALIASES`) of one canonical name.
* **Inner rules**: :data:`INNER_RULES` of :mod:`gradproj.inner` (``adam``, ``adam8bit``, ``adafactor``).
* **Projectors**: :data:`PROJECTORS` of :mod:`gradproj.projectors` (group key ``projector``).
* **Residual rules**: :data:`RESIDUALS` of :mod:`gradproj.residual` (group key ``residual``).

The last three are the axes' own tables, re-exported (the same dict objects): registering a class there or
here is the same thing. This module imports only torch and the axes at import time; optimizer classes are
imported by :meth:`OptimizerEntry.resolve`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from .inner import INNER_RULES, InnerRule
from .inner import register_inner_rule as register_inner
from .inner.adam8bit import quiet_bnb_import
from .projectors import PROJECTORS, Projector, get_projector, register_projector
from .residual import RESIDUALS, Residual, get_residual, register_residual
from .state_layout import Spec

log = logging.getLogger("gradproj")


@dataclass(frozen=True)
class OptimizerEntry:
    """One registered optimizer: where its class is, its default recipe and how its state is laid out."""

    #: ``"module:Class"``; imported by :meth:`resolve`
    target: str
    #: default learning rate (the papers' recipes: 1e-3 for full-rank Adam, 1e-2 with projection, α = 0.25;
    #: FRUGAL 1e-3 with α = 1)
    lr: float
    #: the inner rule (a name of :data:`INNER_RULES`) whose state the optimizer keeps per tensor: a gradproj
    #: preset's ``inner_rule``; for a full-rank baseline, the rule with the same layout
    inner: str = "adam"
    #: the default residual rule (a name of :data:`RESIDUALS`): a gradproj preset's ``default_residual``
    residual: str = "none"
    #: takes GaLore's projected param groups (rank, update_proj_gap, scale, proj_type)
    projected: bool = True
    #: default constructor keyword arguments
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: default keys of the projected group
    group: dict[str, Any] = field(default_factory=dict)
    #: default scale (alpha) of the projected matrices
    scale: float = 0.25
    #: default rank of the projected matrices (None: hidden // 4, GaLore's ratio; APOLLO-Mini: 1)
    rank: int | None = None
    #: state the optimizer keeps per tensor besides its inner rule's (torch.optim's ``step`` tensor,
    #: bitsandbytes' code maps), in :mod:`gradproj.state_layout` terms; used by the memory estimators
    extra_state: dict[str, Spec] = field(default_factory=dict)
    #: the dtype the optimizer keeps its inner state in whatever ``state_dtype`` asks (transformers'
    #: Adafactor: ``"float32"``); None: it follows the ``state_dtype`` option
    state_dtype: str | None = None
    #: other names accepted for this one (kept for old spellings)
    aliases: tuple[str, ...] = ()
    help: str = ""
    #: the canonical name, set by :func:`register_optimizer`
    name: str = ""

    def resolve(self) -> type | None:
        """The optimizer class, or None when it cannot be imported here."""
        module, _, name = self.target.partition(":")
        quiet = quiet_bnb_import() if module.split(".")[0] == "bitsandbytes" else contextlib.nullcontext()
        try:
            with quiet:
                return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None
        except Exception as err:  # an optional dependency failing at import (e.g. a broken CUDA setup)
            log.debug("gradproj: importing %s failed: %s", self.target, err)
            return None

    @property
    def is_gradproj(self) -> bool:
        """True for gradproj's own optimizers (the presets), False for the full-rank baselines."""
        return self.target.split(":")[0].split(".")[0] == "gradproj"


#: canonical name -> entry, in registration order
OPTIMIZERS: dict[str, OptimizerEntry] = {}
#: alias -> canonical name
OPTIMIZER_ALIASES: dict[str, str] = {}


def register_optimizer(name: str, entry: OptimizerEntry) -> OptimizerEntry:
    """Make ``entry`` known as ``name`` (and its aliases) to the command, the estimators and the tests.

    The inner and residual names must be registered; a name or alias already taken by another optimizer
    raises ``ValueError``.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"an optimizer needs a non-empty name, got {name!r}")
    get_inner(entry.inner)
    get_residual(entry.residual)
    for spelling in (name, *entry.aliases):
        owner = OPTIMIZER_ALIASES.get(spelling, spelling if spelling in OPTIMIZERS else None)
        if owner is not None and owner != name:
            raise ValueError(f"optimizer name {spelling!r} is already registered (for {owner!r})")
    entry = replace(entry, name=name)
    OPTIMIZERS[name] = entry
    for alias in entry.aliases:
        OPTIMIZER_ALIASES[alias] = name
    return entry


def canonical_optimizer(name: str) -> str:
    """The canonical name of ``name`` (itself, or what the alias stands for); ``ValueError`` if unknown."""
    if name in OPTIMIZERS:
        return name
    if name in OPTIMIZER_ALIASES:
        return OPTIMIZER_ALIASES[name]
    raise ValueError(f"unknown optimizer {name!r}; registered: {', '.join(OPTIMIZERS)}")


def get_optimizer(name: str) -> OptimizerEntry:
    """The entry of ``name`` or of the alias ``name``; ``ValueError`` naming the registered ones if unknown."""
    return OPTIMIZERS[canonical_optimizer(name)]


def optimizer_names(aliases: bool = False) -> list[str]:
    """The canonical optimizer names in registration order (with ``aliases``, followed by the aliases)."""
    return list(OPTIMIZERS) + (list(OPTIMIZER_ALIASES) if aliases else [])


def available_optimizers() -> list[str]:
    """The canonical names whose class can be imported in this installation."""
    return [name for name, entry in OPTIMIZERS.items() if entry.resolve() is not None]


def get_inner(name: str) -> type[InnerRule]:
    try:
        return INNER_RULES[name]
    except KeyError:
        raise ValueError(f"unknown inner rule {name!r}; available: {', '.join(sorted(INNER_RULES))}") from None


def inner_names() -> list[str]:
    return sorted(INNER_RULES)


def projector_names() -> list[str]:
    return sorted(PROJECTORS)


def residual_names() -> list[str]:
    return sorted(RESIDUALS)


# ------------------------------------------------------------------------------------------- the table
_ADAFACTOR_FIXED_LR = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
#: torch.optim's AdamW keeps the step count as a float32 0-dim tensor per parameter
_TORCH_STEP = {"step": Spec(())}
#: bitsandbytes' 8-bit optimizers keep a 256-entry float32 code map per quantized state tensor (named here
#: after the moments they decode; absent, like the block scales, when a tensor is too small to quantize)
_BNB_CODE_MAPS = {"qmap1": Spec((256,), requires=("exp_avg",)), "qmap2": Spec((256,), requires=("exp_avg_sq",))}

register_optimizer(
    "adamw",
    OptimizerEntry(
        "torch.optim:AdamW",
        1e-3,
        projected=False,
        kwargs={"weight_decay": 0.0},
        extra_state=_TORCH_STEP,
        help="torch.optim.AdamW (full-rank baseline)",
    ),
)
register_optimizer(
    "adamw8bit",
    OptimizerEntry(
        "bitsandbytes.optim:AdamW8bit",
        1e-3,
        inner="adam8bit",
        projected=False,
        kwargs={"weight_decay": 0.0},
        extra_state=_BNB_CODE_MAPS,
        help="bitsandbytes 8-bit AdamW (full-rank baseline)",
    ),
)
register_optimizer(
    "adafactor",
    OptimizerEntry(
        "transformers.optimization:Adafactor",
        1e-3,
        inner="adafactor",
        projected=False,
        kwargs=_ADAFACTOR_FIXED_LR,
        state_dtype="float32",
        help="transformers Adafactor, fixed lr (full-rank baseline)",
    ),
)
register_optimizer(
    "galore_adamw",
    OptimizerEntry(
        "gradproj:GaLoreAdamW", 1e-2, aliases=("galore",), help="GaLore: Adam in a low-rank gradient subspace"
    ),
)
register_optimizer(
    "fira_adamw",
    OptimizerEntry(
        "gradproj:FiraAdamW",
        1e-2,
        residual="fira",
        aliases=("fira",),
        help="Fira: GaLore plus the scaled residual, norm-growth limited",
    ),
)
register_optimizer(
    "frugal_adamw",
    OptimizerEntry(
        "gradproj:FrugalAdamW",
        1e-3,
        residual="frugal",
        scale=1.0,
        help="FRUGAL: Adam in the subspace, signSGD outside it",
    ),
)
register_optimizer(
    "galore_adamw8bit",
    OptimizerEntry(
        "gradproj:GaLoreAdamW8bit",
        1e-2,
        inner="adam8bit",
        aliases=("galore_8bit",),
        help="GaLore with 8-bit blockwise moments",
    ),
)
register_optimizer(
    "galore_adafactor",
    OptimizerEntry(
        "gradproj:GaLoreAdafactor",
        1e-2,
        inner="adafactor",
        kwargs=_ADAFACTOR_FIXED_LR,
        help="GaLore with Adafactor's factored second moment",
    ),
)

register_optimizer(
    "apollo_adamw",
    OptimizerEntry(
        "gradproj:ApolloAdamW",
        1e-2,
        residual="apollo",
        scale=1.0,
        group={"projector": "random"},
        help="APOLLO: the raw gradient scaled per channel by Adam in a random subspace",
    ),
)
register_optimizer(
    "apollo_mini",
    OptimizerEntry(
        "gradproj:ApolloMini",
        1e-2,
        residual="apollo",
        scale=128.0,
        rank=1,
        group={"projector": "random"},
        help="APOLLO-Mini: rank 1, one scaling factor per tensor (SGD-like memory)",
    ),
)

__all__ = [
    "INNER_RULES",
    "OPTIMIZERS",
    "OPTIMIZER_ALIASES",
    "PROJECTORS",
    "RESIDUALS",
    "InnerRule",
    "OptimizerEntry",
    "Projector",
    "Residual",
    "available_optimizers",
    "canonical_optimizer",
    "get_inner",
    "get_optimizer",
    "get_projector",
    "get_residual",
    "inner_names",
    "optimizer_names",
    "projector_names",
    "register_inner",
    "register_optimizer",
    "register_projector",
    "register_residual",
    "residual_names",
]
