"""Random bases (Flora, arXiv 2402.03293; GoLore), docs/bases.md: regenerated from a seed, never stored.

The basis of a parameter is a function of two integers in its state: its seed (``proj_seed``) and the
step of the refresh that drew it (``proj_draw``). Every step regenerates it (once per step: down, up and
the residual share the draw), so the state holds no float basis at all and a resumed run regenerates
exactly the basis the uninterrupted one used.
"""

from __future__ import annotations

import math

import torch

from ..options import Option, choice
from ..state_layout import INT, Spec, scalar_int
from . import seeding
from .linalg import orthonormalize
from .regenerated import RegeneratedBasis

RANDOM_KINDS = ("gaussian", "orthonormal")
#: state key of the step whose draw is the current basis (plain int)
DRAW_KEY = "proj_draw"


def random_basis(
    d: int, r: int, kind: str, seed: int, counter: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A d x r random basis from (seed, counter).

    ``"gaussian"``: i.i.d. N(0, 1/d) entries, so every column has unit norm in expectation and the columns
    are nearly orthogonal when d >> r (Johnson–Lindenstrauss); cheap to regenerate.
    ``"orthonormal"``: the Q factor of a Gaussian matrix with R's diagonal made positive, which is
    distributed uniformly (Haar) on the Stiefel manifold; costs a QR per regeneration.
    """
    gen = seeding.generator(seed, counter, device)
    A = torch.randn(d, r, generator=gen, device=device, dtype=torch.float32)
    if kind == "orthonormal":
        A = orthonormalize(A)
    else:
        A.mul_(1.0 / math.sqrt(d))
    return A.to(dtype)


class RandomProjector(RegeneratedBasis):
    """A random basis redrawn at every refresh (every ``update_proj_gap`` steps).

    Group options: ``random_kind`` (``"gaussian"`` default, or ``"orthonormal"``) and ``proj_seed``
    (default 0). State: ``proj_seed`` and ``proj_draw`` (plain ints), nothing else.
    """

    name = "random"
    options = (
        Option(
            "random_kind",
            "gaussian",
            "`'gaussian'` (scaled i.i.d. entries) or `'orthonormal'` (QR of them)",
            choice(*RANDOM_KINDS),
        ),
        seeding.SEED_OPTION,
    )
    basis_keys = (seeding.SEED_KEY, DRAW_KEY)

    #: the basis regenerated for this step, keyed by what it was generated from
    _cache: tuple[tuple, dict[str, torch.Tensor]] | None = None

    def has_basis(self, state):
        return DRAW_KEY in state

    def state_layout(self):
        return {seeding.SEED_KEY: scalar_int(), DRAW_KEY: Spec(INT, requires=(seeding.SEED_KEY,))}

    def compute_basis(self, G, state, step):
        seeding.parameter_seed(state, self.group, self.param_index)
        state[DRAW_KEY] = int(step)
        self.device = G.device
        return {}  # the basis is the pair of ints above

    #: where bases are drawn (CPU and CUDA generators differ): the gradient's device, seen at the refresh
    device: torch.device | None = None

    def basis_matrices(self, state, device=None, dtype=torch.float32):
        """Regenerate the dense basis (``{"left": m x r}``, ``{"right": r x n}`` or both) from the state, on
        ``device`` (default: that of the last refresh), as float32 (or ``dtype``); one draw per step."""
        device = torch.device(device or self.device or "cpu")
        kind = self.group["random_kind"]
        seed, draw = state[seeding.SEED_KEY], state[DRAW_KEY]
        key = (seed, draw, kind, device)
        if self._cache is None or self._cache[0] != key:
            bases = {}
            if self.side in ("left", "full"):
                bases["left"] = random_basis(self.m, self.rank, kind, seed, 2 * draw, device, torch.float32)
            if self.side in ("right", "full"):
                bases["right"] = random_basis(self.n, self.rank, kind, seed, 2 * draw + 1, device, torch.float32).t()
            self._cache = (key, bases)
        return {side: B.to(dtype) for side, B in self._cache[1].items()}

    def dense(self, state, like):
        b = self.basis_matrices(state, like.device, like.dtype)
        return b.get("left"), b.get("right")
