"""transformers' ``Trainer`` with gradproj's optimizers, configured with transformers' own arguments.

::

    args = TrainingArguments(..., optim="galore_adamw", optim_target_modules=["attn", "mlp"],
                             optim_args="rank=128, update_proj_gap=200, scale=0.25")
    trainer = Trainer(model, args, train_dataset=..., optimizers=create_optimizer(model, args))

The arguments mean what they mean to transformers (``transformers/trainer_optimizer.py``):

* ``optim``: ``galore_adamw``, ``galore_adamw_8bit``, ``galore_adafactor``, ``apollo_adamw`` and each with
  ``_layerwise`` (:data:`OPTIM_NAMES`).
* ``optim_target_modules``: a list (a module name matches an entry it equals, contains, or fully matches as
  a regex), a regex string (the whole module name must match), or ``"all-linear"``. As in transformers only
  ``nn.Linear`` modules are projected (an entry that selects no ``nn.Linear`` is ignored, with a warning).
  Unlike transformers, ``"all-linear"`` leaves out the output heads, and embeddings (and heads tied to an
  embedding) are never projected: an explicit list naming a tied ``lm_head`` raises. See
  :func:`gradproj.param_groups` for how heads are found.
* ``optim_args``: ``"key=value, ..."``. GaLore: ``rank`` (128), ``update_proj_gap`` (200), ``scale`` (0.25),
  ``proj_type`` (``std``). APOLLO: ``rank`` (128), ``proj`` (``random``), ``scale_type`` (``channel``),
  ``update_proj_gap`` (200), ``scale`` (1.0), ``proj_type``. Any other key is a gradproj group option of the
  projected group (``projector=dct``, ``residual=fira``, ...), its value read as a Python literal.
* ``learning_rate``, ``weight_decay`` (on the parameters Trainer decays: not biases or norms),
  ``adam_beta1`` / ``adam_beta2`` / ``adam_epsilon`` (the Adam-based methods) are honoured; transformers'
  own GaLore path passes only the learning rate. ``galore_adafactor`` runs Adafactor with the external lr
  (``relative_step=False, scale_parameter=False``), as transformers does.
* ``*_layerwise``: gradproj's ``layerwise=True`` (one optimizer; updates during backward).
  ``gradient_accumulation_steps`` becomes ``accumulation_steps`` (transformers refuses accumulation
  there), and ``max_grad_norm`` becomes the optimizer's per-parameter ``max_grad_norm``: Trainer's own
  global clipping finds no gradients in this mode (its logged ``grad_norm`` is 0.0). ``fp16=True`` (a
  GradScaler) raises at once; use ``bf16=True``. As in transformers, not under DDP.

The scheduler is ``transformers.get_scheduler`` with ``lr_scheduler_type``, the warm-up and
``lr_scheduler_kwargs``, over ``args.max_steps`` (or ``num_training_steps``); when neither is known the
scheduler is None and Trainer builds the same one with the step count it computes.
"""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..optimizers.groups import embedding_weights, output_heads, param_groups


@dataclass(frozen=True)
class _Method:
    cls: str  # a gradproj preset
    layerwise: bool
    defaults: tuple[tuple[str, Any], ...]  # optim_args keys and their defaults (transformers')


_GALORE = (("rank", 128), ("update_proj_gap", 200), ("scale", 0.25), ("proj_type", "std"))
_APOLLO = (
    ("rank", 128),
    ("proj", "random"),
    ("scale_type", "channel"),
    ("update_proj_gap", 200),
    ("scale", 1.0),
    ("proj_type", "std"),
)
#: transformers' ``optim`` names -> the gradproj optimizer that runs them
OPTIM_NAMES: dict[str, _Method] = {
    "galore_adamw": _Method("GaLoreAdamW", False, _GALORE),
    "galore_adamw_8bit": _Method("GaLoreAdamW8bit", False, _GALORE),
    "galore_adafactor": _Method("GaLoreAdafactor", False, _GALORE),
    "galore_adamw_layerwise": _Method("GaLoreAdamW", True, _GALORE),
    "galore_adamw_8bit_layerwise": _Method("GaLoreAdamW8bit", True, _GALORE),
    "galore_adafactor_layerwise": _Method("GaLoreAdafactor", True, _GALORE),
    "apollo_adamw": _Method("ApolloAdamW", False, _APOLLO),
    "apollo_adamw_layerwise": _Method("ApolloAdamW", True, _APOLLO),
}
#: optim_args keys that are not group options of the projected group
_PROJECTION = ("rank", "update_proj_gap", "scale", "proj_type")


def parse_optim_args(text: str | None) -> dict[str, str]:
    """transformers' parsing of ``optim_args``: spaces dropped, ``key=value`` pairs split on commas."""
    if not text:
        return {}
    out = {}
    for item in text.replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise ValueError(f"optim_args = {text!r}: {item!r} is not key=value (e.g. 'rank=128, scale=0.25')")
        out[key] = value
    return out


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # a bare word: a string (proj_type=left, projector=dct)


def _typed(key: str, value: str, default: Any) -> Any:
    kind = type(default)
    try:
        return kind(value) if kind in (int, float) else value
    except ValueError:
        raise ValueError(f"optim_args: {key}={value!r} must be a {kind.__name__} (default {default!r})") from None


def _selects(entry: str, name: str) -> bool:
    """One entry of a list, as transformers' ``check_target_module_exists``: equal, contained, or a full regex match."""
    return entry == name or entry in name or re.fullmatch(entry, name) is not None


def target_module_names(model: nn.Module, optim_target_modules: Any) -> list[str] | None:
    """The ``nn.Linear`` module names ``optim_target_modules`` selects, matched exactly as transformers'
    ``check_target_module_exists``; None for ``"all-linear"``. An entry of a list that selects modules but no
    ``nn.Linear`` among them is ignored with a warning (only ``nn.Linear`` weights are projected, as in
    transformers)."""
    if isinstance(optim_target_modules, str) and optim_target_modules.replace("_", "-") == "all-linear":
        return None
    if not isinstance(optim_target_modules, (list, tuple, str)) or (
        not isinstance(optim_target_modules, str) and not all(isinstance(p, str) for p in optim_target_modules)
    ):
        raise TypeError(
            f"optim_target_modules = {optim_target_modules!r} must be a list of strings, a regex string or 'all-linear'"
        )
    entries = [optim_target_modules] if isinstance(optim_target_modules, str) else list(optim_target_modules)
    regex = isinstance(optim_target_modules, str)
    names: list[str] = []
    linear_hits: dict[str, int] = dict.fromkeys(entries, 0)
    other_hits: dict[str, list[str]] = {e: [] for e in entries}
    for name, module in model.named_modules():
        hits = [e for e in entries if (re.fullmatch(e, name) is not None if regex else _selects(e, name))]
        if not hits or not name:
            continue
        for e in hits:
            if isinstance(module, nn.Linear):
                linear_hits[e] += 1
            else:
                other_hits[e].append(name)
        if isinstance(module, nn.Linear):
            names.append(name)
    if not names:
        raise ValueError(f"optim_target_modules={optim_target_modules!r} matches no nn.Linear module of the model")
    for e in entries:
        if linear_hits[e] == 0 and other_hits[e]:
            warnings.warn(
                f"gradproj: optim_target_modules entry {e!r} selects no nn.Linear, only {other_hits[e][:3]}: only "
                "nn.Linear weights are projected (as in transformers), so it selects nothing",
                stacklevel=3,
            )
    return names


def _decay_names(model: nn.Module) -> set[str]:
    """The parameter names Trainer applies weight decay to (not biases, not norms)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]  # uses no state


def _split_decay(groups: list[dict], model: nn.Module, weight_decay: float) -> list[dict]:
    """Each group split into its decayed and its not-decayed parameters (Trainer's rule), empty parts dropped."""
    names = _decay_names(model)
    decay = {id(p) for n, p in model.named_parameters() if n in names}
    out = []
    for group in groups:
        for wd, keep in ((weight_decay, True), (0.0, False)):
            params = [p for p in group["params"] if (id(p) in decay) == keep]
            if params:
                out.append({**group, "params": params, "weight_decay": wd})
    return out


def create_optimizer(
    model: nn.Module, args: Any, num_training_steps: int | None = None
) -> tuple[torch.optim.Optimizer, Any]:
    """The gradproj optimizer (and learning-rate scheduler) that ``args`` (``TrainingArguments``) asks for.

    Returns ``(optimizer, scheduler)`` for ``Trainer(model, args, optimizers=create_optimizer(model, args))``;
    the scheduler is None when ``args.max_steps`` is not set and ``num_training_steps`` is not given (Trainer
    then builds it from ``args`` with the step count it computes). Bad arguments raise before anything is
    built. The module docstring lists what each argument means.
    """
    import gradproj

    optim = str(getattr(args.optim, "value", args.optim))
    method = OPTIM_NAMES.get(optim)
    if method is None:
        raise ValueError(f"args.optim = {optim!r} is not a gradproj method; use one of: {', '.join(OPTIM_NAMES)}")
    if args.optim_target_modules is None:
        raise ValueError(
            f"args.optim_target_modules is needed for optim={optim!r}: a list of module names, a regex or 'all-linear'"
        )
    if method.layerwise:
        if str(getattr(args.parallel_mode, "value", args.parallel_mode)) == "distributed":
            raise NotImplementedError(
                f"optim={optim!r}: layerwise stepping updates each parameter before DDP averages its gradient; "
                "use the non-layerwise optim under DDP"
            )
        if getattr(args, "fp16", False):
            raise ValueError(
                f"optim={optim!r} cannot train with fp16=True: its GradScaler cannot unscale gradients that are "
                "consumed during backward. Use bf16=True (no scaler), or the non-layerwise optim"
            )
    options = parse_optim_args(args.optim_args)
    known = dict(method.defaults)
    chosen = {k: _typed(k, options.pop(k), d) if k in options else d for k, d in known.items()}
    extra = {k: _literal(v) for k, v in options.items()}
    if "proj" in chosen:  # APOLLO's key for the basis is gradproj's `projector`
        extra.setdefault("projector", chosen.pop("proj"))
    if "scale_type" in chosen:
        extra.setdefault("scale_type", chosen.pop("scale_type"))

    names = target_module_names(model, args.optim_target_modules)
    target: str | list[str] = "all-linear" if names is None else "|".join(re.escape(n) for n in names)
    heads = set(output_heads(model))
    tied = embedding_weights(model)
    if names is not None:
        for n in names:  # a tied head named explicitly: refuse (param_groups would say "embedding")
            module = model.get_submodule(n)
            if id(module.weight) in tied:
                raise ValueError(
                    f"optim_target_modules selects {n!r}, whose weight is the input embedding "
                    f"{tied[id(module.weight)]!r} (tied weights); an embedding is not projected: leave {n!r} out"
                )
        if heads & set(names):
            warnings.warn(
                f"gradproj: optim_target_modules selects the output head {sorted(heads & set(names))}, which will "
                "be projected; 'all-linear' leaves heads out",
                stacklevel=2,
            )
    groups = param_groups(model, target, **{k: chosen[k] for k in _PROJECTION}, **extra)
    groups = _split_decay(groups, model, float(args.weight_decay))

    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    if method.cls == "GaLoreAdafactor":
        kwargs.update(relative_step=False, scale_parameter=False)
    else:
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if method.layerwise:
        kwargs.update(layerwise=True, accumulation_steps=int(args.gradient_accumulation_steps))
        if args.max_grad_norm and args.max_grad_norm > 0:
            kwargs["max_grad_norm"] = float(args.max_grad_norm)
    optimizer = getattr(gradproj, method.cls)(groups, **kwargs)

    steps = num_training_steps if num_training_steps is not None else (args.max_steps if args.max_steps > 0 else None)
    scheduler = None
    if steps is not None:
        from transformers import get_scheduler

        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=args.get_warmup_steps(steps),
            num_training_steps=steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
    return optimizer, scheduler
