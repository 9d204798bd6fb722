"""Param-group helpers: which weights to project.

The rule :func:`param_groups` applies (also documented in docs/guide.md):

* **Embeddings** are the weights of ``nn.Embedding`` / ``nn.EmbeddingBag`` modules, and any weight *shared*
  with one (a tied output head: ``lm_head.weight is embed_tokens.weight``). They are never projected unless
  ``project_embeddings=True``; explicit ``target_modules`` that select one raise ``ValueError``.
* **Output heads** are found by type and by name, not only through ``get_output_embeddings()``: the module
  that method returns; an ``nn.Linear`` whose own name (the last part of its module name) is one of
  :data:`HEAD_NAMES` (``lm_head``, ``output``, ``head``, ``classifier``, ``score``, ``embed_out``, ...);
  and the last ``nn.Linear`` whose ``out_features`` equals an embedding's ``num_embeddings`` (the
  vocabulary), in an ``nn.Sequential`` too. A last layer named otherwise in a model without embeddings (an
  MLP's output layer) is not recognised: pass an explicit ``target_modules`` list that leaves it out. The
  default and ``"all-linear"`` leave them out; explicit patterns that name one project it (untied heads
  only: a tied one is an embedding).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

log = logging.getLogger("gradproj")

#: the module names (last component of the dotted name) of an output head in common model families
HEAD_NAMES = frozenset(
    {"lm_head", "output", "head", "classifier", "score", "embed_out", "output_layer", "output_projection", "logits"}
)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except NotImplementedError:
            return None
    return None


def output_heads(model: nn.Module) -> dict[str, str]:
    """The modules of ``model`` taken for output heads: module name -> why (see the module docstring)."""
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in reversed(list(modules.items()))}  # a module's first name
    heads: dict[str, str] = {}
    head = _output_head(model)
    if isinstance(head, nn.Module) and id(head) in names:
        heads[names[id(head)]] = "get_output_embeddings()"
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    for n, _ in linears:
        if n.rsplit(".", 1)[-1] in HEAD_NAMES:
            heads.setdefault(n, f"named {n.rsplit('.', 1)[-1]!r}")
    vocab = {m.num_embeddings for m in modules.values() if isinstance(m, _EMBEDDINGS)}
    to_vocab = [n for n, m in linears if m.out_features in vocab]
    if to_vocab:
        heads.setdefault(to_vocab[-1], "the last Linear whose out_features is an embedding's num_embeddings")
    return heads


def embedding_weights(model: nn.Module) -> dict[int, str]:
    """id of every embedding weight of ``model`` -> the name of its embedding module."""
    return {
        id(m.weight): n
        for n, m in model.named_modules()
        if isinstance(m, _EMBEDDINGS) and isinstance(getattr(m, "weight", None), nn.Parameter)
    }


def refuse_constructor_rank(params: list, options: dict[str, Any], name: str) -> None:
    """Refuse ``rank`` given to an optimizer's constructor for param groups (dicts) that have none of their own.

    It would project every >= 2-D tensor of those groups, the input embedding and the output head included: an
    optimizer sees tensors, not modules. That is what ``Trainer(optimizer_cls_and_kwargs=(GaLoreAdamW,
    {"rank": ...}))`` does with the two weight-decay groups Trainer builds. A plain list of tensors with
    ``rank=`` stays allowed (the caller chose the tensors).
    """
    if "rank" not in options:
        return
    unranked = [i for i, g in enumerate(params) if isinstance(g, dict) and "rank" not in g]
    if unranked:
        raise ValueError(
            f"{name}(rank={options['rank']!r}) would project every >= 2-D parameter of param groups {unranked}, "
            "embeddings and the output head included (an optimizer cannot tell which module a tensor belongs to; "
            "transformers' Trainer(optimizer_cls_and_kwargs=...) builds such groups). Build the groups with "
            "gradproj.param_groups(model, rank=...), which leaves embeddings and heads out; with transformers' "
            "Trainer use gradproj.integrations.transformers.create_optimizer(model, args) "
            "(TrainingArguments(optim='galore_adamw', optim_target_modules=..., optim_args='rank=...'))"
        )


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """transformers' ``check_target_module_exists`` for a list: equal, a substring, or a full regex match."""
    return any(p == name or p in name or re.fullmatch(p, name) for p in patterns)


def param_groups(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    *,
    trainable_only: bool = True,
    project_embeddings: bool = False,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into a projected group and a regular group, ready for any gradproj optimizer.

    Args:
        target_modules: which modules' weights to project, matched against module names from
            ``model.named_modules()`` as transformers' ``optim_target_modules``: a list matches a name it
            equals, is a substring of, or fully matches as a regular expression; a single string other than
            ``"all-linear"`` is a regular expression the whole name must match. ``"all-linear"`` and ``None``
            (default) take every ``nn.Linear`` weight except output heads and embeddings. Explicit patterns
            may also select other modules with >= 2-D weights (a conv weight is projected as the matrix
            [out, rest]) and an untied output head.
        rank, update_proj_gap, scale, proj_type: GaLore's group keys for the projected group.
        trainable_only: leave out parameters with ``requires_grad=False`` (set False when a layer sampler
            will toggle them).
        project_embeddings: allow explicit ``target_modules`` to project an embedding's weight or a head
            tied to one (by default that raises ``ValueError``: the weight is the input embedding, whose
            gradient is sparse in the vocabulary and is not low-rank in the way GaLore assumes).
        **group_options: further keys for the projected group (``projector``, ``residual``, ``lr``, ...).

    Output heads are the module ``get_output_embeddings()`` returns, any ``nn.Linear`` named like one of
    :data:`HEAD_NAMES` (``lm_head``, ``output``, ``head``, ``classifier``, ``score``, ``embed_out``, ...),
    and the last ``nn.Linear`` whose ``out_features`` equals an embedding's ``num_embeddings``. Embeddings
    are ``nn.Embedding`` / ``nn.EmbeddingBag`` weights and every weight shared with one (tied heads).

    Matrices whose rank would cover them (``rank >= min(m, n)``, e.g. LoRA's adapters under a GaLore rank
    above the LoRA rank) gain nothing from a projection: they go to a group of their own without the
    projection keys (with ``group_options``), trained full-rank, with one warning for all of them.

    Returns:
        ``[{"params": regular}, {"params": projected, "rank": ..., ...}]`` with empty groups left out (and
        ``{"params": too_small, **group_options}`` before the projected group when there are such matrices
        and ``group_options``; without options they join the regular group). Only weights with two or more
        dimensions ever enter the projected group.
    """
    if not isinstance(project_embeddings, bool):
        raise TypeError(f"project_embeddings = {project_embeddings!r} must be True or False")
    all_linear = target_modules is None or (
        isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"
    )
    if isinstance(target_modules, str) and not all_linear:
        pattern = target_modules
        match = lambda name: re.fullmatch(pattern, name) is not None  # noqa: E731 - one line, used once
    elif not all_linear:
        assert target_modules is not None
        if not all(isinstance(p, str) for p in target_modules):
            raise TypeError(f"target_modules = {target_modules!r} must be a list of strings, a regex or 'all-linear'")
        patterns = list(target_modules)
        match = lambda name: _matches(name, patterns)  # noqa: E731 - one line, used once
    heads = set(output_heads(model)) if all_linear else set()
    embeddings = embedding_weights(model)
    projected: list[nn.Parameter] = []
    small: list[tuple[str, tuple[int, ...]]] = []
    small_params: list[nn.Parameter] = []
    seen: set[int] = set()
    refused: list[str] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() < 2 or id(weight) in seen:
            continue
        if trainable_only and not weight.requires_grad:
            continue
        if all_linear:
            chosen = isinstance(module, nn.Linear) and name not in heads and id(weight) not in embeddings
        else:
            chosen = match(name)
            if chosen and id(weight) in embeddings and not project_embeddings:
                shared = embeddings[id(weight)]
                refused.append(name if shared == name else f"{name} (its weight is {shared}'s, tied)")
                continue
        if not chosen:
            continue
        seen.add(id(weight))
        m, n = weight.shape[0], weight.numel() // weight.shape[0]
        if rank >= min(m, n):
            small.append((name, tuple(weight.shape)))
            small_params.append(weight)
        else:
            projected.append(weight)
    if refused:
        raise ValueError(
            f"target_modules={target_modules!r} selects embedding weights: {', '.join(refused)}. An embedding (or a "
            "head tied to one) is not projected: leave it out of target_modules, or pass project_embeddings=True "
            "to project it anyway"
        )
    if not projected and not small:
        names = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)][:8]
        raise ValueError(
            f"target_modules={target_modules!r} matched no module with a >= 2-D weight; module names look like {names}"
        )
    if small:
        examples = ", ".join(f"{n} {s}" for n, s in small[:3])
        warnings.warn(
            f"gradproj: {len(small)} selected weight matrices have min(m, n) <= rank={rank} (e.g. {examples}): "
            "projecting them saves no memory, so they train full-rank in a group without projection; lower rank "
            "or leave them out of target_modules",
            stacklevel=2,
        )
    regular = [p for p in model.parameters() if id(p) not in seen and (p.requires_grad or not trainable_only)]
    # model.parameters() already de-duplicates tied weights
    log.info(
        "gradproj: projecting %d weight matrices at rank %d; %d other tensors unprojected",
        len(projected),
        rank,
        len(regular) + len(small_params),
    )
    groups: list[dict[str, Any]] = []
    if small_params and not group_options:
        regular = regular + small_params
    if regular:
        groups.append({"params": regular})
    if small_params and group_options:
        groups.append({"params": small_params, **group_options})
    if projected:
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
