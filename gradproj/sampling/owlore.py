"""OwLore in one call: outlier ratios, a layer sampler and GaLore groups for a transformers causal LM.

The optimizers sit above the sampling package (``ProjectedOptimizer`` steps a ``LayerSampler``), so this
recipe imports them when it is called, never when the module is imported.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .outliers import block_linears, decoder_blocks, outlier_ratios
from .sampler import LayerSampler

if TYPE_CHECKING:
    from ..optimizers import ProjectedOptimizer

log = logging.getLogger("gradproj")


def default_rank(model: nn.Module, blocks: Sequence[nn.Module], cap: int = 256) -> int:
    """OwLore's rank 256, clipped to hidden_size // 4 for small models (GaLore's small-model ratio)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        hidden = block_linears(blocks[0])[0].in_features
    return max(1, min(cap, hidden // 4))


def owlore(
    model: nn.Module,
    n_active: int = 5,
    interval: int = 50,
    rank: int | None = None,
    batches: Iterable[Any] | None = None,
    *,
    update_proj_gap: int = 100,
    scale: float = 1.0,
    probs: str | torch.Tensor = "owl",
    M: float = 13.0,
    seed: int = 0,
    keep_inactive_state: bool = False,
    blocks: Sequence[nn.Module] | None = None,
    optimizer_cls: type[ProjectedOptimizer] | None = None,
    lr: float = 3e-4,
    **optimizer_kwargs: Any,
) -> ProjectedOptimizer:
    """Build an OwLore optimizer (arXiv 2405.18380) for ``model``; the sampler is ``opt.sampler``.

    Steps: (1) outlier ratios of the decoder blocks (calibrated on ``batches`` when given, weights-only
    otherwise); (2) a :class:`~gradproj.LayerSampler` drawing ``n_active`` blocks every ``interval`` steps with
    probabilities proportional to those ratios (``probs="uniform"`` gives LISA); (3) GaLore groups: every
    ``nn.Linear`` weight except the output head projected at ``rank``, every other parameter (embeddings,
    norms, head) plain AdamW; frozen blocks are included so they can train when drawn.

    Defaults are the released LLaMA2-7B recipe: γ = ``n_active`` 5, K = ``interval`` 50, rank 256,
    T = ``update_proj_gap`` 100, α = ``scale`` 1.0, M 13, lr 3e-4. ``rank=None`` takes 256 clipped to
    ``hidden_size // 4`` (a 4096-wide model gets 256; a 512-wide one 128). The learning rate is the recipe's
    for a 7B model; small models usually want more: it is yours to tune.

    Args:
        model: a transformers causal LM with ``model.model.layers`` (or any model, with ``blocks``).
        n_active, interval: blocks trained at a time, optimizer steps between draws.
        rank: GaLore rank of the Linear weights (None: see above).
        batches: calibration batches for the outlier ratios (each run as ``model(batch)`` or
            ``model(**batch)``), e.g. a few dicts with ``input_ids``; None: weights-only ratios.
        update_proj_gap, scale: GaLore's T and α.
        probs: ``"owl"`` (outlier ratios, the default), ``"uniform"`` (LISA) or explicit weights per block.
        M: outlier threshold of the ratios (see :func:`gradproj.outlier_ratios`).
        seed: the sampler's seed.
        keep_inactive_state: keep a deactivated block's optimizer state (moments, basis) for its return, as
            the released code does, instead of freeing it (see :class:`~gradproj.LayerSampler`).
        blocks: the sampled modules (default ``model.model.layers``).
        optimizer_cls: any gradproj optimizer class (``GaLoreAdamW``, ``FiraAdamW``, ...); None:
            :class:`~gradproj.GaLoreAdamW`.
        lr, **optimizer_kwargs: passed to ``optimizer_cls`` (``weight_decay``, ``betas``, ``state_dtype``...).
    """
    from ..optimizers import GaLoreAdamW, param_groups

    if optimizer_cls is None:
        optimizer_cls = GaLoreAdamW
    blocks = decoder_blocks(model) if blocks is None else list(blocks)
    if rank is None:
        rank = default_rank(model, blocks)
    if isinstance(probs, str) and probs == "owl":
        probs = outlier_ratios(model, blocks=blocks, batches=batches, M=M)
        if not float(probs.sum()) > 0:
            raise ValueError(
                f"no block has outlier scores above M = {M} x its mean, so OwLore has nothing to sample by "
                "(common for randomly initialised or very small models); pass a lower M (OWL's pruning default "
                "is 5), calibration batches, or probs='uniform' (LISA)"
            )
    elif batches is not None:
        warnings.warn(
            "gradproj: owlore(batches=...) is only used with probs='owl'; the batches are ignored (drop them, or "
            "pass probs='owl')",
            stacklevel=2,
        )
    groups = param_groups(model, rank=rank, update_proj_gap=update_proj_gap, scale=scale, trainable_only=False)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        sampler = LayerSampler(
            blocks, n_active, interval, probs=probs, seed=seed, keep_inactive_state=keep_inactive_state
        )
        opt = optimizer_cls(groups, lr=lr, sampler=sampler, **optimizer_kwargs)
    except Exception:
        for p, flag in flags:  # a bad option leaves the model as it was
            p.requires_grad_(flag)
        raise
    log.info(
        "gradproj: OwLore with %d of %d blocks active, interval %d, rank %d; sampling probabilities %s",
        n_active,
        len(blocks),
        interval,
        rank,
        [round(x, 4) for x in sampler.probs.tolist()],
    )
    return opt
