"""The inner-rule interface: an optimizer update computed on the (low-rank) gradient R alone.

An inner rule never sees the weight W. Given R and its own state it returns the direction U (same shape
as R) and the step size the outer step multiplies it with; the outer step projects U back, adds any
residual, applies it to W and applies decoupled weight decay in full space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..options import Configurable
from ..state_layout import Spec
from ..validation import check_number

if TYPE_CHECKING:
    from ..kernels.protocol import KernelOps


@dataclass
class StepContext:
    """What the outer step hands an inner rule besides R and the state."""

    #: the parameter's step count after this update (1 at the first update)
    step: int
    #: the operations chosen by ``impl`` (:mod:`gradproj.kernels.reference` or an accelerated twin; a
    #: :class:`~gradproj.optimizers.sharding.ShardedOps` wrapping one for an FSDP2 parameter)
    ops: KernelOps
    #: dtype the rule keeps its state in
    state_dtype: torch.dtype
    #: the parameter, for rules whose step size depends on it (Adafactor's relative step); read only
    param: torch.Tensor | None = None
    #: the group's ``scale`` (alpha) for a projected matrix, 1.0 for an unprojected parameter
    scale: float = 1.0
    #: R is a tensor of this step's own (a projection's result, not a gradient or stored state) that the rule may
    #: overwrite with its direction (Adam writes ψ over it: no buffer to allocate or zero)
    r_owned: bool = False


class InnerRule(Configurable):
    """Base class; subclasses define ``name``, ``defaults`` and :meth:`update`."""

    name: ClassVar[str] = ""
    #: the group keys the rule reads: ``options`` (:mod:`gradproj.options`; the preset's become the optimizer's
    #: defaults); ``defaults`` is derived

    def validate_group(self, group: dict, where: str) -> None:
        """Checks across several options (each option's own check is in its declaration); raise ``ValueError``
        naming ``where`` (e.g. "param group 1")."""

    def validate_lr(self, group: dict, where: str) -> None:
        """Check the group's ``lr``: a number >= 0 (rules with their own step-size schedule may allow None)."""
        check_number(group["lr"], "lr", where, minimum=0.0)

    def update(self, R: torch.Tensor, state: dict, group: dict, ctx: StepContext) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def step_weight(self, W: torch.Tensor, R: torch.Tensor, state: dict, group: dict, ctx: StepContext) -> bool:
        """For an unprojected parameter (R its gradient, W its weight): the update and the engine's weight step
        ``W -= step_size·U; W -= decay_lr·wd·W`` in one pass, where the rule has one. Returns False, having changed
        nothing, where it has none; the engine then runs :meth:`update` and its own weight update."""
        return False

    def state_layout(self, shape: tuple[int, ...], group: dict) -> dict[str, Spec]:
        """The state keys the rule keeps for a low-rank gradient R of ``shape`` (:mod:`gradproj.state_layout`)."""
        return {}

    #: whether the batched ``foreach`` step (gradproj.optimizers.multi_tensor) runs this rule: it implements
    #: exactly :class:`gradproj.inner.Adam`'s arithmetic with torch's multi-tensor ops
    batched: ClassVar[bool] = False
    #: the state keys this rule owns (dropped by :meth:`reset_state`)
    state_keys: ClassVar[tuple[str, ...]] = ()
    #: axes of R along which the rule runs unchanged on a block, as under FSDP (gradproj.optimizers.sharding):
    #: "rows" when the update of a row reads only that row and every state tensor has R's rows as dim 0;
    #: "cols" likewise for columns and dim 1
    shardable: ClassVar[tuple[str, ...]] = ()
    #: which part of the optimizer state each key is reported under by :func:`gradproj.optimizer_state_bytes`
    #: (``moments``, ``scales``, ``other``); keys not named here count as ``moments``
    state_parts: ClassVar[dict[str, str]] = {}

    def reset_state(self, state: dict, step: int) -> None:
        """Forget the rule's state (e.g. when the subspace changes); ``step`` is the parameter's step count.

        The next :meth:`update` re-initialises it, and bias corrections count from ``step`` again.
        """
        for key in self.state_keys:
            state.pop(key, None)
        state["inner_start"] = step

    #: how each state tensor changes basis under ``moments_on_refresh="project"``: ``"linear"`` (a first
    #: moment, M -> T M) or ``"second_moment"`` (an elementwise mean of squares, V -> (T∘T) V); see
    #: gradproj.projectors.change. ``None``: the rule cannot project its state (the option is rejected).
    state_transforms: ClassVar[dict[str, str] | None] = None

    def project_state(self, state: dict, change: Any) -> None:
        """Map the rule's state into the new basis after a refresh (``change``: a
        :class:`gradproj.projectors.BasisChange`), in place, keeping each tensor's dtype."""
        for key, kind in (self.state_transforms or {}).items():
            value = state.get(key)
            if value is None:
                continue
            new = change.linear(value) if kind == "linear" else change.second_moment(value)
            if new.shape == value.shape:
                value.copy_(new)
            else:
                state[key] = new.to(value.dtype)

    def decay_lr(self, group: dict, state: dict) -> float:
        """The learning rate decoupled weight decay is multiplied with (the group's lr by default)."""
        return group["lr"]
