"""GoLore-style switch: an exact (SVD-family) basis for the first part of training, random bases after.

GoLore (gradient random low-rank projection) observes that late in training, when gradients are dominated
by noise, the SVD subspace stops being informative and a random subspace converges better; its recipe
switches from SVD to random after 80 % of training.
"""

from __future__ import annotations

from ..options import Option, choice, number
from . import lazy, seeding
from .base import Projector
from .eigh import EighProjector
from .quantized import BASIS_BITS_OPTION
from .random_basis import DRAW_KEY, RandomProjector
from .randomized_svd import RandomizedSVDProjector
from .svd import SVDProjector

_BEFORE = {"svd": SVDProjector, "randomized_svd": RandomizedSVDProjector, "eigh": EighProjector}


def switch_step(group: dict) -> int:
    """The step count at which the basis becomes random: ``golore_switch_step``, or
    ``int(golore_switch_fraction · total_steps)``."""
    if group["golore_switch_step"] is not None:
        return int(group["golore_switch_step"])
    return int(float(group["golore_switch_fraction"]) * int(group["total_steps"]))


class GoLoreProjector(Projector):
    """``golore_before`` (``svd`` default, ``randomized_svd`` or ``eigh``) until the parameter's step count
    reaches the switch step, a random basis (``random_kind``, ``proj_seed``) from then on.

    The switch step is ``golore_switch_step`` when given, else ``golore_switch_fraction`` (0.8, GoLore's)
    of ``total_steps`` (the number of optimizer steps the run will take; required then). The switch is a
    refresh at exactly that step, so ``moments_on_refresh`` applies to it; after it, random bases are
    redrawn every ``update_proj_gap`` steps as usual. The float basis is dropped from the state at the
    switch.
    """

    name = "golore"
    options = (
        Option(
            "golore_switch_step",
            None,
            "the step count at which the basis becomes random (or None: use `golore_switch_fraction` of `total_steps`)",
            number(integer=True, minimum=0, allow_none=True),
        ),
        Option(
            "golore_switch_fraction",
            0.8,
            "the switch step as a fraction of `total_steps`",
            number(minimum=0.0, maximum=1.0),
        ),
        Option(
            "total_steps",
            None,
            "optimizer steps the run will take (with `golore_switch_fraction`)",
            number(integer=True, minimum=0, allow_none=True),
        ),
        Option("golore_before", "svd", "the basis before the switch", choice(*_BEFORE)),
        BASIS_BITS_OPTION,  # the dense basis before the switch
        *RandomProjector.options,
        *lazy.OPTIONS,  # the first phase's refresh schedule; the random phase refreshes every update_proj_gap
    )
    basis_keys = Projector.basis_keys + RandomProjector.basis_keys
    dense_basis = False  # a random basis after the switch

    @classmethod
    def validate_group(cls, group, where):
        if group["golore_switch_step"] is None and group["total_steps"] is None:
            raise ValueError(
                f"{where}: projector='golore' needs the switch point: set golore_switch_step (a step count), or "
                "total_steps (with golore_switch_fraction, default 0.8)"
            )
        before = _BEFORE[group["golore_before"]]
        before.apply_options(group, where)  # the options of the basis before the switch
        before.validate_group(group, where)

    def __init__(self, shape, rank, proj_type, group):
        super().__init__(shape, rank, proj_type, group)
        self.before = _BEFORE[self.group["golore_before"]](shape, rank, proj_type, group)
        self.after = RandomProjector(shape, rank, proj_type, group)
        self.switch = switch_step(self.group)

    def _phase(self, state: dict) -> Projector:
        return self.after if DRAW_KEY in state else self.before

    def has_basis(self, state):
        return self.before.has_basis(state) or self.after.has_basis(state)

    def state_layout(self):
        return {**self.before.state_layout(), **self.after.state_layout()}

    def lazy_vectors(self, state):
        return [] if DRAW_KEY in state else super().lazy_vectors(state)

    def needs_refresh(self, state, step):
        switching = step >= self.switch and DRAW_KEY not in state
        return switching or super().needs_refresh(state, step)

    def compute_basis(self, G, state, step):
        if step < self.switch:
            self.before.param_index = self.param_index
            return self.before.compute_basis(G, state, step)
        for key in Projector.basis_keys:  # the float basis of the first phase is dropped
            state.pop(key, None)
        self.after.param_index = self.param_index
        seeding.parameter_seed(state, self.group, self.param_index)
        return self.after.compute_basis(G, state, step)

    def basis_matrices(self, state):
        return (self.after if DRAW_KEY in state else self.before).basis_matrices(state)

    def down(self, G, state):
        return self._phase(state).down(G, state)

    def up(self, X, state):
        return self._phase(state).up(X, state)

    def add_up_(self, W, X, state, alpha):
        self._phase(state).add_up_(W, X, state, alpha)
