"""Importance-sampled singular subspaces (SARA, Zhang et al., arXiv 2502.05790), ``projector="sampled"``.

GaLore keeps the top-r singular vectors of the gradient at every refresh. During pretraining that dominant
subspace stops moving ("frozen"), so the weight updates stay confined to nearly the same r directions.
SARA keeps the SVD but *samples* the r directions instead: at each refresh, with G = U diag(σ) Vᵀ,

    pool     the top k singular vectors, k = ``sample_pool`` (None: all min(m, n), SARA's choice)
    weights  w_i = σ_i^a, a = ``sample_power`` (1: SARA's, probability ∝ σ_i)
    draw     r distinct indices one after another, each with probability w_i / Σ w_j over those not yet
             drawn (sampling without replacement, the successive-sampling / Plackett–Luce law)
    basis    the chosen singular vectors of the projected side, in increasing index (decreasing σ) order

The basis is a set of exact singular vectors, so it is orthonormal and stored dense under ``proj`` (or
``proj_left`` / ``proj_right`` for ``full``, both sides taking the same indices) like the SVD's: the batched
step and Fira's factored path apply. The draw is seeded from the parameter's seed (``proj_seed`` in its
state) and the refresh step (:mod:`gradproj.projectors.seeding`), so every DDP rank draws the same subspace
and a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import torch

from ..options import Option, number
from ..state_layout import scalar_int
from . import seeding
from .base import Projector
from .linalg import unit_scaled
from .svd import singular_triplets


def selection_weights(S: torch.Tensor, power: float) -> torch.Tensor:
    """``(σ_i / σ_1)^power`` in float64 (scale-free, and no overflow for a large ``power``); all ones for
    ``power = 0``, all zeros for an all-zero spectrum with ``power > 0``."""
    s = S.double()
    top = s.max() if s.numel() else s.new_zeros(())
    s = torch.where(top > 0, s / torch.where(top > 0, top, 1.0), s)
    return s.pow(float(power))


def sample_without_replacement(weights: torch.Tensor, r: int, generator: torch.Generator) -> torch.Tensor:
    """``r`` distinct indices of ``weights`` drawn one after another, each with probability proportional to
    its weight among the indices not drawn yet; returned in increasing order.

    An exponential race: E_i ~ Exp(1) i.i.d., the r smallest keys E_i / w_i win. The smallest of independent
    exponentials of rates w_i is index i with probability w_i / Σ w, and by memorylessness the rest of the
    race is the same law on the remaining indices, which is exactly sequential sampling without replacement.
    Zero weights never win against a positive one; when fewer than r weights are positive the remaining
    places go to the zero-weight indices in index order (a stable sort of +inf keys).
    """
    u = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=torch.float64)
    race = -torch.log1p(-u)  # Exp(1); u < 1, so finite
    keys = torch.where(weights > 0, race / torch.where(weights > 0, weights, 1.0), float("inf"))
    chosen = torch.sort(keys, stable=True).indices[:r]
    return torch.sort(chosen).values


class SampledProjector(Projector):
    """r of the top ``sample_pool`` singular vectors of G, drawn without replacement with probability ∝
    σ^``sample_power`` (SARA, arXiv 2502.05790); same sides and keys as ``svd``, plus the parameter's seed.

    Group options: ``sample_pool`` (None: every singular vector), ``sample_power`` (1.0) and ``proj_seed``
    (0). A refresh is one exact SVD (as ``svd``, of the power-of-two rescaled gradient, retried in float64 if
    float32 fails) and one seeded draw of min(m, n) uniforms.
    """

    name = "sampled"
    orthonormal = True  # exact singular vectors: an isometry whose adjoint is down(), Fira's factored path applies
    options = (
        Option(
            "sample_pool",
            None,
            "sample the basis from the top `sample_pool` singular vectors (None: all of them, SARA's; must be >= rank)",
            number(integer=True, minimum=1, allow_none=True),
        ),
        Option(
            "sample_power",
            1.0,
            "a singular vector is drawn with weight σ^sample_power (1: SARA's, ∝ σ; 0: uniform over the pool; "
            "larger: closer to the top r)",
            number(minimum=0.0),
        ),
        seeding.SEED_OPTION,
    )

    @classmethod
    def validate_group(cls, group, where):
        pool, rank = group["sample_pool"], group.get("rank")
        if pool is not None and rank is not None and int(pool) < int(rank):
            raise ValueError(
                f"{where}: sample_pool = {pool!r} is smaller than rank = {rank!r}; the basis draws rank vectors "
                "from the top sample_pool singular vectors: use sample_pool >= rank, or None for all of them"
            )

    def state_layout(self):
        return {**super().state_layout(), seeding.SEED_KEY: scalar_int()}

    def pool_size(self) -> int:
        """k: how many of the top singular vectors the draw chooses from (at least the rank)."""
        k = min(self.m, self.n)
        pool = self.group["sample_pool"]
        return k if pool is None else max(self.rank, min(int(pool), k))

    def choose(self, S: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The indices (into S, descending) of the singular vectors the basis keeps, increasing."""
        weights = selection_weights(S[: self.pool_size()], self.group["sample_power"])
        return sample_without_replacement(weights, self.rank, generator)

    def compute_basis(self, G, state, step):
        try:
            U, S, Vh = singular_triplets(unit_scaled(G))  # exact rescaling: same vectors, σ in a safe range
        except torch.linalg.LinAlgError as err:
            return self.decomposition_failed("SVD", err, state, step)
        seed = seeding.parameter_seed(state, self.group, self.param_index)
        idx = self.choose(S, seeding.generator(seed, step, G.device))
        dtype = G.dtype
        if self.side == "right":
            return {"proj": Vh[idx].to(dtype).contiguous()}
        if self.side == "left":
            return {"proj": U[:, idx].to(dtype).contiguous()}
        return {"proj_left": U[:, idx].to(dtype).contiguous(), "proj_right": Vh[idx].to(dtype).contiguous()}
