"""Layerwise sampling: train a few blocks at a time (LISA, arXiv 2403.17919; OwLore, arXiv 2405.18380).

Every ``interval`` optimizer steps, ``n_active`` of the blocks are drawn without replacement with
probabilities ``probs`` (uniform: LISA; outlier ratios: OwLore) and made trainable; the others are frozen
(``requires_grad=False``, so autograd never computes their gradients). Parameters outside the blocks
(embeddings, final norm, head) are never touched.

Attached to an optimizer (``sampler=`` of any gradproj optimizer, or :meth:`LayerSampler.step` with the
optimizer), the sampler also decides what happens to the optimizer state of a block it deactivates
(``keep_inactive_state``): dropped at the switch (the default), so optimizer memory stays at the active
blocks' share and a block that comes back starts afresh; or kept, as the released LISA and OwLore code does,
so a block that comes back resumes with its moments and projector (see :meth:`step`).
"""

from __future__ import annotations

import logging
import numbers
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .outliers import outlier_ratios

log = logging.getLogger("gradproj")

#: keys of :meth:`LayerSampler.state_dict` (``keep_inactive_state`` too since it exists; older checkpoints lack it)
STATE_KEYS = ("generator", "active", "steps", "n_blocks", "n_active", "interval", "probs")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class LayerSampler:
    """Draws which blocks train, ``n_active`` at a time, and switches them every ``interval`` optimizer steps.

    Args:
        blocks: the modules sampled as units (a transformer's decoder blocks, e.g. ``model.model.layers``).
        n_active: how many blocks train at a time (OwLore's γ; 1 <= n_active <= len(blocks)).
        interval: optimizer steps between draws (OwLore's K; >= 1).
        probs: ``"uniform"`` (LISA), ``"owl"`` (weights-only outlier ratios of the blocks, see
            :func:`gradproj.outlier_ratios`; for OwLore's calibrated ratios pass that function's result
            instead), or a tensor / sequence of one non-negative weight per block (normalised here).
            Blocks with weight 0 are never drawn.
        seed: seed of the sampler's own ``torch.Generator`` (the global RNG is never used).
        keep_inactive_state: what happens to the optimizer state (moments, basis, step count) of a block
            when it is deactivated. ``False`` (default): dropped, so optimizer memory stays at the active
            blocks' share and a returning block starts afresh. ``True``: kept, as the released LISA and
            OwLore code does; a returning block resumes with its old moments and basis (the basis refreshed
            when its own step count next reaches a multiple of T), and optimizer memory grows to the state of
            every block that has been active. docs/owlore.md gives the measured trade.

    The first draw happens here; a new one after every ``interval`` calls of :meth:`step` (one per
    optimizer step). ``sampler.active`` is the sorted list of active block indices.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        n_active: int,
        interval: int,
        probs: str | torch.Tensor | Sequence[float] = "uniform",
        seed: int = 0,
        keep_inactive_state: bool = False,
    ):
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks is empty; pass the modules to sample (e.g. model.model.layers)")
        params: list[list[nn.Parameter]] = []
        owner: dict[int, int] = {}
        for i, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"blocks[{i}] is a {type(block).__name__}, not an nn.Module")
            ps = list(block.parameters())
            if not ps:
                raise ValueError(f"blocks[{i}] ({type(block).__name__}) has no parameters to train")
            for p in ps:
                if id(p) in owner:
                    raise ValueError(
                        f"blocks[{owner[id(p)]}] and blocks[{i}] share a parameter of shape {tuple(p.shape)}; "
                        "a sampled parameter must belong to exactly one block"
                    )
                owner[id(p)] = i
            params.append(ps)
        n = len(blocks)
        if not _is_int(n_active) or not 1 <= n_active <= n:
            raise ValueError(f"n_active = {n_active!r} must be an integer between 1 and the number of blocks ({n})")
        if not _is_int(interval) or interval < 1:
            raise ValueError(f"interval = {interval!r} must be a positive integer (optimizer steps between draws)")
        if not _is_int(seed):
            raise TypeError(f"seed = {seed!r} must be an integer")
        if not isinstance(keep_inactive_state, bool):
            raise TypeError(
                f"keep_inactive_state = {keep_inactive_state!r} must be True (keep a deactivated block's optimizer "
                "state, as the released LISA / OwLore code does) or False (free it at the switch)"
            )
        self.probs = self._resolve_probs(probs, blocks)
        positive = int((self.probs > 0).sum())
        if positive < n_active:
            raise ValueError(
                f"only {positive} of the {n} blocks have a positive probability, fewer than n_active = {n_active}; "
                "lower n_active, use probs='uniform', or (for outlier ratios) a lower M in gradproj.outlier_ratios"
            )
        self.blocks = blocks
        self.n_active = int(n_active)
        self.interval = int(interval)
        self.keep_inactive_state = keep_inactive_state
        self._params = params
        self._generator = torch.Generator().manual_seed(int(seed))
        self._steps = 0
        self._optimizer: weakref.ref | None = None
        self._active = self._draw()
        self._apply(previous=None, optimizer=None)

    # ------------------------------------------------------------------------------------ properties
    @property
    def active(self) -> list[int]:
        """Sorted indices of the blocks that train now."""
        return list(self._active)

    @property
    def steps(self) -> int:
        """Optimizer steps counted so far."""
        return self._steps

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def block_parameters(self, index: int) -> list[nn.Parameter]:
        return list(self._params[index])

    # ---------------------------------------------------------------------------------------- probs
    @staticmethod
    def _resolve_probs(probs: Any, blocks: list[nn.Module]) -> torch.Tensor:
        n = len(blocks)
        if isinstance(probs, str):
            if probs == "uniform":
                return torch.full((n,), 1.0 / n, dtype=torch.float64)
            if probs == "owl":
                weights = outlier_ratios(None, blocks=blocks)
                if not float(weights.sum()) > 0:
                    raise ValueError(
                        "probs='owl': no block has a weight above 13 x its mean (weights-only score), so there is "
                        "nothing to sample by; pass probs=gradproj.outlier_ratios(model, batches=..., M=...) with "
                        "calibration data or a lower M, or use probs='uniform'"
                    )
                return weights / weights.sum()
            raise ValueError(f"probs = {probs!r}; use 'uniform', 'owl' or a tensor of one weight per block")
        try:
            weights = torch.as_tensor(probs).detach().to(device="cpu", dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"probs must be 'uniform', 'owl' or a 1-D tensor / sequence of numbers, got {type(probs).__name__}"
            ) from None
        if weights.shape != (n,):
            raise ValueError(f"probs has shape {tuple(weights.shape)}; it needs one weight per block: shape ({n},)")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError(f"probs must be finite and non-negative, got {weights.tolist()}")
        if not float(weights.sum()) > 0:
            raise ValueError("probs are all zero; at least n_active blocks need a positive weight")
        return weights / weights.sum()

    # ------------------------------------------------------------------------------------------ step
    def _draw(self) -> list[int]:
        drawn = torch.multinomial(self.probs, self.n_active, replacement=False, generator=self._generator)
        return sorted(drawn.tolist())

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Count one optimizer step; after every ``interval`` steps draw a new active set.

        Returns True when a draw happened. At a draw, blocks not drawn get ``requires_grad=False`` and
        ``grad=None``, drawn blocks ``requires_grad=True``. With ``optimizer`` (the gradproj optimizers pass
        themselves) and ``keep_inactive_state=False``, the optimizer state of every block that is not kept
        active is dropped: a deactivated block holds no memory, and a block that comes back starts like a
        parameter seen for the first time (fresh basis from its next gradient, zero moments, bias correction
        and refresh schedule counted from its return). With ``keep_inactive_state=True`` the state is left
        alone: a frozen block has no gradient, so the optimizer skips it, and it resumes where it stopped.
        A block drawn again while active keeps its state either way.
        """
        self._steps += 1
        if self._steps % self.interval:
            return False
        previous = self._active
        self._active = self._draw()
        self._apply(previous, optimizer)
        log.debug("gradproj: step %d, active blocks %s", self._steps, self._active)
        return True

    def _apply(self, previous: list[int] | None, optimizer: torch.optim.Optimizer | None) -> None:
        """Set requires_grad by the active set; drop optimizer state of blocks not active both before and now
        (unless ``keep_inactive_state``)."""
        active, kept = set(self._active), set(self._active) & set(previous or ())
        if self.keep_inactive_state:
            optimizer = None
        for i, ps in enumerate(self._params):
            on = i in active
            for p in ps:
                p.requires_grad_(on)
                if not on:
                    p.grad = None
                if optimizer is not None and i not in kept:
                    optimizer.state.pop(p, None)

    # ------------------------------------------------------------------------------------ optimizer
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Bind to the optimizer that steps this sampler; called by gradproj optimizers given ``sampler=``.

        Checks that every block parameter is in the optimizer's param groups (a frozen block must be there
        so it can train when drawn) and, unless ``keep_inactive_state``, drops any state the optimizer holds
        for inactive blocks.
        """
        current = self._optimizer() if self._optimizer is not None else None
        if current is not None and current is not optimizer:
            raise ValueError(
                "this LayerSampler already drives another optimizer; each optimizer needs its own sampler "
                "(two optimizers stepping one sampler would count every step twice)"
            )
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [i for i, ps in enumerate(self._params) if any(id(p) not in known for p in ps)]
        if missing:
            raise ValueError(
                f"block(s) {missing[:8]} have parameters that are not in the optimizer's param groups; a sampled "
                "block must be in the optimizer even while frozen: build the groups with "
                "gradproj.param_groups(model, ..., trainable_only=False) or pass model.parameters()"
            )
        self._optimizer = weakref.ref(optimizer)
        self._apply(self._active, optimizer)  # keeps active blocks' state, drops inactive blocks' state

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain integers only: loads with ``torch.load(weights_only=True)``."""
        return {
            "generator": self._generator.get_state(),
            "active": torch.tensor(self._active, dtype=torch.int64),
            "steps": self._steps,
            "n_blocks": self.n_blocks,
            "n_active": self.n_active,
            "interval": self.interval,
            "probs": self.probs.clone(),
            "keep_inactive_state": self.keep_inactive_state,
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` cannot be loaded into this sampler; changes nothing."""
        if not isinstance(state, dict) or set(STATE_KEYS) - set(state):
            raise ValueError(f"sampler state must be a dict with keys {list(STATE_KEYS)}")
        for key, mine in (("n_blocks", self.n_blocks), ("n_active", self.n_active), ("interval", self.interval)):
            if state[key] != mine:
                raise ValueError(
                    f"the checkpoint's sampler has {key} = {state[key]}, this sampler {mine}; build the sampler "
                    "with the same blocks, n_active and interval as the run being resumed"
                )
        saved_keep = state.get("keep_inactive_state", False)  # checkpoints from before the option: freed
        if saved_keep is not self.keep_inactive_state:
            raise ValueError(
                f"the checkpoint's sampler has keep_inactive_state = {saved_keep!r}, this sampler "
                f"{self.keep_inactive_state}; build the sampler with the run's keep_inactive_state (the other "
                "setting would continue a different run)"
            )
        gen = state["generator"]
        if not (isinstance(gen, torch.Tensor) and gen.dtype == torch.uint8):
            raise ValueError("sampler state 'generator' must be a uint8 tensor (torch.Generator.get_state())")
        active = state["active"]
        if not isinstance(active, torch.Tensor):
            raise ValueError("sampler state 'active' must be an int64 tensor of block indices")
        idx = active.tolist()
        if len(idx) != self.n_active or len(set(idx)) != len(idx) or not all(0 <= i < self.n_blocks for i in idx):
            raise ValueError(f"sampler state 'active' = {idx} is not {self.n_active} distinct block indices")
        probs = state["probs"]
        if not (isinstance(probs, torch.Tensor) and probs.shape == (self.n_blocks,)):
            raise ValueError(f"sampler state 'probs' must be a tensor of shape ({self.n_blocks},)")
        if not _is_int(state["steps"]) or state["steps"] < 0:
            raise ValueError(f"sampler state 'steps' = {state['steps']!r} must be a non-negative integer")

    def load_state_dict(self, state: dict[str, Any], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore generator, active set, step count and probabilities; re-apply the active set.

        The checkpoint's probabilities replace this sampler's (so a resumed run samples exactly as the
        uninterrupted one, even if the outlier ratios were recomputed). With ``optimizer`` and
        ``keep_inactive_state=False``, its state of inactive blocks is dropped.
        """
        self.check_state_dict(state)
        probs = state["probs"].to(device="cpu", dtype=torch.float64)
        if not torch.equal(probs, self.probs):
            log.info("gradproj: sampler probabilities restored from the checkpoint (they differ from this sampler's)")
        self.probs = probs.clone()
        self._generator.set_state(state["generator"].cpu())
        self._steps = int(state["steps"])
        self._active = sorted(state["active"].tolist())
        self._apply(self._active, optimizer)

    def __repr__(self) -> str:
        return (
            f"LayerSampler(blocks={self.n_blocks}, n_active={self.n_active}, interval={self.interval}, "
            f"steps={self._steps}, active={self._active}, keep_inactive_state={self.keep_inactive_state})"
        )


def restore_sampler(optimizer: torch.optim.Optimizer, state: dict[str, Any] | None) -> None:
    """Load a checkpoint's sampler state into ``optimizer.sampler`` (called by ``load_state_dict``)."""
    sampler = getattr(optimizer, "sampler", None)
    if state is None:
        if sampler is not None:
            warnings.warn(
                "gradproj: the checkpoint holds no sampler state; the sampler keeps its own draws, so "
                "sampling will not continue the saved run's",
                stacklevel=3,
            )
        return
    if sampler is None:
        warnings.warn(
            "gradproj: the checkpoint holds a layer sampler's state but this optimizer has none; it is "
            "ignored and the blocks keep their current requires_grad flags",
            stacklevel=3,
        )
        return
    sampler.load_state_dict(state, optimizer)
