"""The named optimizers: one paper each, a few lines over :class:`ProjectedOptimizer`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..inner import Adafactor, Adam, Adam8bit
from ..inner.adam8bit import bnb_functional
from .base import ProjectedOptimizer


class GaLoreAdamW(ProjectedOptimizer):
    r"""GaLore (arXiv 2403.03507): AdamW whose moments live in a low-rank subspace of each matrix gradient.

    For a group with ``rank``, each matrix gradient G (m x n) is projected onto the top-``rank`` singular
    vectors of G (refreshed every ``update_proj_gap`` steps), Adam runs on the projection R, and the
    update is projected back and scaled::

        R = project(G);  m = β1 m + (1-β1) R;  v = β2 v + (1-β2) R²
        W -= lr · √(1-β2^t)/(1-β1^t) · scale · B(m / (√v + eps));   W -= lr · wd · W

    Groups without ``rank`` (and 1-D tensors) get plain AdamW. Group keys follow the original package
    (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``), so its param groups work unchanged; build
    them with :func:`gradproj.param_groups`.

    Args:
        params: parameters or param groups.
        lr: learning rate. The effective lr of a projected matrix is ``lr * scale``.
        betas, eps, weight_decay: as in AdamW (eps defaults to 1e-6 as in the reference; decay is applied
            after the update, as in the reference).
        **options: ``impl``, ``state_dtype`` and any group key as a default for every group.
    """

    inner_rule = Adam
    default_residual = "none"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        **options: Any,
    ):
        super().__init__(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, **options)


class FiraAdamW(GaLoreAdamW):
    r"""Fira (arXiv 2410.01623): GaLore plus the discarded gradient, rescaled, under a norm-growth limiter.

    ::

        S = (G - α·B(R)) · φ,   φ = ‖ψ‖ / (‖R‖ + 1e-8) over the rank axis (ψ = m / (√v + eps))
        S ← S / (max(‖S‖ / N_prev, γ) / γ)           (γ = ``limiter_gamma``, 1.01; not on the first step)
        W -= step_size · (α · B(ψ) + S);  W -= lr · wd · W

    As in the released code, α (``scale``, or Fira's spelling ``alpha``) multiplies B(R) in the residual
    too. Every option of :class:`GaLoreAdamW` applies.
    """

    default_residual = "fira"


class FrugalAdamW(GaLoreAdamW):
    r"""FRUGAL (arXiv 2411.07837): Adam in the subspace, state-free signSGD on everything outside it.

    ::

        R = project(G);  U = m / (√v + eps)                       (Adam on R, as in GaLore)
        W -= lr · √(1-β2^t)/(1-β1^t) · scale · B(U)  +  lr · sign(G − B(R));   W -= lr · wd · W

    The sign step uses the plain ``lr`` (no bias correction) and no state, so the optimizer state is the
    same as GaLore's at the same rank while every update is full-rank. The subspace density ρ of the paper
    is ``rank / min(m, n)`` (ρ = 0.25: ``rank = hidden / 4`` for LLaMA's matrices). FRUGAL resets the
    Adam state whenever the subspace changes, so ``moments_on_refresh`` defaults to ``"reset"`` here.
    FRUGAL applies no extra scale to the Adam part: use ``scale=1.0`` and an AdamW-sized ``lr``
    (FRUGAL's recipe: the AdamW baseline's lr, e.g. 1e-3). Every option of :class:`GaLoreAdamW` applies;
    the same rule is available to any optimizer as the group key ``residual="frugal"``.
    """

    default_residual = "frugal"
    default_moments_on_refresh = "reset"


class GaLoreAdamW8bit(GaLoreAdamW):
    r"""GaLore with 8-bit Adam moments: m and v of each projected gradient stored blockwise-quantized.

    The update is :class:`GaLoreAdamW`'s; only the storage of the moments changes. Each moment tensor with
    at least ``min_8bit_size`` elements (4096, as bitsandbytes) is kept as uint8 codes of bitsandbytes'
    dynamic map (signed for m, unsigned for v) plus one fp32 scale per block of 256 values — about 1 byte
    per element instead of 4 (fp32) or 2 (bf16); smaller tensors keep fp32 moments. Every step dequantizes
    the moments, updates them in fp32, takes the direction from the fresh fp32 values and quantizes them
    back (bitsandbytes' functional ops: CPU and CUDA). Needs ``bitsandbytes`` (``pip install 'gradproj[bnb]'``).

    Defaults are :class:`GaLoreAdamW`'s (eps 1e-6 added to √v, weight decay 0), so switching between the
    two changes nothing but the memory; galore-torch's ``GaLoreAdamW8bit`` defaults to eps 1e-8 and weight
    decay 0.01 and adds eps·√(1−β2^t) (bitsandbytes' kernel) — pass those to match it.
    """

    inner_rule = Adam8bit

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        min_8bit_size: int = 4096,
        **options: Any,
    ):
        bnb_functional()  # a clear ImportError now rather than at the first step
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size, **options
        )


class GaLoreAdafactor(ProjectedOptimizer):
    r"""GaLore with Adafactor inside the subspace: a factored second moment of the projected gradient R.

    Arguments and their meaning are ``transformers.optimization.Adafactor``'s (``lr=None`` with
    ``relative_step=True`` uses the step size min(1e-2, 1/√t) and ignores ``lr``, so ``lr=0`` with
    ``transformers.optimization.AdafactorSchedule`` works as with transformers' Adafactor; ``scale_parameter``
    multiplies it by the RMS of the full weight; ``beta1`` enables a first moment; ``eps = (eps1, eps2)``).
    For a projected matrix the row/column statistics are those of R (m + r or r + n numbers); groups without
    ``rank`` get full-rank Adafactor, exactly transformers' (weight decay aside: applied after the update, not before).
    To drive it with an external schedule use ``relative_step=False, scale_parameter=False, lr=...``.
    The update is ``W -= scale · B(u)`` with u Adafactor's lr-scaled, clipped update.
    """

    inner_rule = Adafactor

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        **options: Any,
    ):
        Adafactor.check_manual_lr(
            lr, relative_step, f"{type(self).__name__}, the default of every param group (param group 0 too)"
        )
        super().__init__(
            params,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            **options,
        )

    def _get_lr(self, group: dict, state: dict) -> float:
        """The step size of the last update of the parameter whose ``state`` this is (transformers' Adafactor's
        method, which ``transformers.optimization.AdafactorSchedule`` reads to report the learning rate)."""
        rule = self.engine.inner(group)
        return rule.step_size(group, state) if isinstance(rule, Adafactor) else float(group["lr"])


#: apollo-torch's param-group key for the basis (``"random"`` or ``"svd"``): gradproj's ``projector``
APOLLO_PROJ_KEY = "proj"


class ApolloAdamW(GaLoreAdamW):
    r"""APOLLO (arXiv 2412.05270): SGD-like memory, AdamW-like updates: Adam in a random subspace only
    estimates how much to scale the raw gradient.

    ::

        R = project(G)  (a seeded random basis, redrawn every update_proj_gap steps; or SVD)
        ψ = m / (√v + eps)                         (Adam on R, as in GaLore; U itself is not applied)
        φ = ‖ψ‖ / (κ·‖R‖ + 1e-8)                   per channel (row / column of G), or per tensor
        S = √scale · φ ⊙ G;  S ← S / (max(‖S‖ / N_prev, 1.01) / 1.01)     (not with disable_nl)
        W -= lr · √(1-β2^t)/(1-β1^t) · S;  W -= lr · wd · W

    The composition of the ``random`` projector (``proj="random"``, the default; ``proj="svd"`` for the
    SVD basis), the Adam inner rule and the ``apollo`` residual rule (docs/algorithms.md, APOLLO). The
    param-group keys of apollo-torch are accepted: ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``,
    ``scale_type`` (``"channel"`` or ``"tensor"``) and ``proj`` (gradproj's ``projector``); as are its
    constructor options ``scale_front``, ``disable_nl`` and ``correct_bias``, which become defaults of
    every group (``correct_bias=False`` drops the bias correction of the APOLLO-updated matrices only). κ
    rescales a random basis's ‖R‖ to the reference's normalisation (√(d/r); 1 for SVD). Note that ``scale``
    enters as √scale, as in the released code. APOLLO-Mini is
    :class:`ApolloMini` (rank 1, per-tensor scaling, scale 128, ``scale_front=True``).
    """

    default_residual = "apollo"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        scale_front: bool = False,
        disable_nl: bool = False,
        **options: Any,
    ):
        options = _apollo_group(options, "ApolloAdamW")
        options.setdefault("projector", "random")
        # a random basis is redrawn without a decomposition (no stall to spread): apollo-torch's schedule
        options.setdefault("refresh_stagger", False)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            scale_front=scale_front,
            disable_nl=disable_nl,
            **options,
        )

    def add_param_group(self, param_group: dict) -> None:
        """Add a group; apollo-torch's ``proj`` key is read as gradproj's ``projector``."""
        super().add_param_group(_apollo_group(param_group, f"param group {len(self.param_groups)}"))


class ApolloMini(ApolloAdamW):
    r"""APOLLO-Mini (arXiv 2412.05270): APOLLO with rank 1 and one scaling factor per tensor, SGD-like memory.

    :class:`ApolloAdamW` with the paper's configuration as defaults: ``scale_type="tensor"``,
    ``scale_front=True`` (√scale before the limiter) and lr 1e-2; the projected groups carry ``rank=1`` and
    ``scale=128``::

        groups = gradproj.param_groups(model, rank=1, update_proj_gap=200, scale=128)
        opt = gradproj.ApolloMini(groups)

    Per projected matrix the state is Adam's moments of a rank-1 R (m or n numbers each), the limiter's
    norm and two integers that regenerate the random basis.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-2,
        scale_type: str = "tensor",
        scale_front: bool = True,
        **options: Any,
    ):
        super().__init__(params, lr=lr, scale_type=scale_type, scale_front=scale_front, **options)


def _apollo_group(group: dict, where: str) -> dict:
    """``group`` with apollo-torch's ``proj`` key renamed to ``projector`` (a conflict raises)."""
    if APOLLO_PROJ_KEY not in group:
        return group
    group = dict(group)
    proj = group.pop(APOLLO_PROJ_KEY)
    if "projector" in group and group["projector"] != proj:
        raise ValueError(f"{where} sets proj={proj!r} and projector={group['projector']!r}: they are the same key")
    group["projector"] = proj
    return group
