"""Layerwise outlier ratios (OWL, arXiv 2310.05175), the sampling weights of OwLore.

For every ``nn.Linear`` of a block, each weight entry gets the score ``A_ij = |W_ij| · ‖X_j‖₂``, where
``‖X_j‖₂`` is the root of the mean of the squared input feature j over the calibration tokens (1 without
calibration data: a weights-only score). The block's outlier ratio is the fraction of all its scores
(every Linear of the block together) above ``M`` times their mean.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger("gradproj")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a transformers causal LM: ``model.model.layers`` (LLaMA, Mistral, Qwen, Gemma...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) > 0:
        return list(layers)
    raise ValueError(
        f"{type(model).__name__} has no decoder blocks at model.model.layers (the layout of transformers "
        "causal LMs such as LlamaForCausalLM); pass blocks=[...] explicitly, e.g. blocks=model.transformer.h"
    )


def block_linears(block: nn.Module) -> list[nn.Linear]:
    """Every ``nn.Linear`` inside ``block`` (the matrices OWL scores), in module order."""
    return [m for m in block.modules() if isinstance(m, nn.Linear)]


def _check_blocks(blocks: Sequence[nn.Module]) -> list[list[nn.Linear]]:
    if len(blocks) == 0:
        raise ValueError("blocks is empty; pass the model's decoder blocks (e.g. model.model.layers)")
    linears = []
    for i, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise TypeError(f"blocks[{i}] is a {type(block).__name__}, not an nn.Module")
        found = block_linears(block)
        if not found:
            raise ValueError(f"blocks[{i}] ({type(block).__name__}) contains no nn.Linear to score")
        linears.append(found)
    return linears


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


@torch.no_grad()
def input_feature_norms(
    model: nn.Module, linears: Sequence[nn.Linear], batches: Iterable[Any]
) -> dict[int, torch.Tensor]:
    """Root of the running mean of squared inputs, per input feature, of each Linear in ``linears``.

    Runs ``model(batch)`` (``model(**batch)`` for a dict) on every calibration batch in eval mode under
    ``torch.no_grad()``, with a forward hook on each Linear that folds its input into a float64 running
    mean of squares (no activation is kept). Tensors in a batch are moved to the model's device; every
    token counts, padding included (pass unpadded batches). Hooks are removed and every module's
    train/eval mode is restored, also on error. Returns ``{id(linear): norms}`` (float64, on the device).
    """
    stats: dict[int, list] = {id(lin): [0, None] for lin in linears}

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        sumsq = torch.linalg.vector_norm(x, ord=2, dim=0, dtype=torch.promote_types(x.dtype, torch.float32))
        sumsq = sumsq.double().square()
        entry = stats[id(module)]
        count, mean = entry
        total = count + x.shape[0]
        entry[1] = sumsq / total if mean is None else mean * (count / total) + sumsq / total
        entry[0] = total

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    modes = [(m, m.training) for m in model.modules()]
    handles = [lin.register_forward_hook(hook) for lin in linears]
    n_batches = 0
    try:
        model.eval()
        for batch in tqdm(batches, desc="gradproj: calibration", leave=False, disable=None):
            batch = _to_device(batch, device)
            model(**batch) if isinstance(batch, dict) else model(batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    if n_batches == 0:
        raise ValueError(
            "batches is empty: no calibration batch ran; pass at least one, or batches=None for a weights-only score"
        )
    missing = [i for i, lin in enumerate(linears) if stats[id(lin)][1] is None]
    if missing:
        raise ValueError(
            f"{len(missing)} Linear layer(s) of the blocks received no input during calibration (the first is "
            f"{linears[missing[0]]}); are these blocks part of the model's forward pass?"
        )
    return {key: mean.sqrt() for key, (_, mean) in stats.items()}


def _block_ratio(linears: Sequence[nn.Linear], norms: dict[int, torch.Tensor] | None, M: float) -> float:
    """Fraction of the block's scores |W_ij|·‖X_j‖ above M × their mean, over all its Linears at once."""

    def scores(lin: nn.Linear) -> torch.Tensor:
        W = lin.weight.detach()
        A = W.to(torch.promote_types(W.dtype, torch.float32)).abs()
        if norms is not None:
            A.mul_(norms[id(lin)].to(A.dtype)[None, :])
        return A

    total, numel = 0.0, 0
    for lin in linears:
        total += float(scores(lin).sum(dtype=torch.float64))
        numel += lin.weight.numel()
    threshold = M * total / numel
    above = sum(int((scores(lin) > threshold).sum()) for lin in linears)
    return above / numel


@torch.no_grad()
def outlier_ratios(
    model: nn.Module | None,
    blocks: Sequence[nn.Module] | None = None,
    batches: Iterable[Any] | None = None,
    M: float = 13.0,
) -> torch.Tensor:
    """One outlier ratio per block (OWL's layerwise outlier distribution), the weights of OwLore's sampling.

    For every ``nn.Linear`` in block ℓ, ``A_ij = |W_ij| · ‖X_j‖₂``; the scores of all Linears of the
    block are pooled and ``D_ℓ`` is the fraction of them above ``M · mean``. ``D / D.sum()`` are OwLore's
    sampling probabilities (pass the result as ``probs`` of :class:`gradproj.LayerSampler`).

    Args:
        model: the model (needed with ``batches``; may be None for a weights-only score of ``blocks``).
        blocks: the modules to score; default: the decoder blocks ``model.model.layers`` of a transformers
            causal LM.
        batches: calibration batches, each run as ``model(batch)`` (``model(**batch)`` for a dict, e.g.
            ``{"input_ids": ...}``); ``‖X_j‖₂`` is then the root of the mean of the squared input feature j
            over all calibration tokens, gathered by forward hooks (no activations kept). ``None``: a
            weights-only score (``‖X_j‖ = 1``).
        M: the outlier threshold as a multiple of the block's mean score; 13 in OwLore's released scores for
            LLaMA2-7B (OWL's pruning default is 5). Randomly initialised or very small models may have no
            score above 13 × mean; a lower M then still ranks the blocks.

    Returns:
        float64 CPU tensor of shape ``[len(blocks)]`` with values in [0, 1].

    Runs under ``torch.no_grad()`` in eval mode; removes its hooks and restores every module's mode, so
    the model is left as it was.
    """
    if isinstance(M, bool) or not isinstance(M, numbers.Real) or not M > 0:
        raise ValueError(f"M = {M!r} must be a positive number (OwLore uses 13, OWL's pruning default is 5)")
    if blocks is None:
        if model is None:
            raise ValueError("pass model (its blocks are model.model.layers) or blocks=[...]")
        blocks = decoder_blocks(model)
    blocks = list(blocks)
    linears = _check_blocks(blocks)
    norms = None
    if batches is not None:
        if model is None:
            raise ValueError("batches need the model to run them: pass model as well")
        norms = input_feature_norms(model, [lin for group in linears for lin in group], batches)
    ratios = [
        _block_ratio(group, norms, float(M))
        for group in tqdm(linears, desc="gradproj: outlier ratios", leave=False, disable=None)
    ]
    out = torch.tensor(ratios, dtype=torch.float64)
    log.info(
        "gradproj: outlier ratios (M=%g, %s): %s",
        M,
        "calibrated" if norms is not None else "weights only",
        [round(r, 6) for r in ratios],
    )
    return out
