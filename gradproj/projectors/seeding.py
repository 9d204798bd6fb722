"""Deterministic randomness for random and randomized bases.

A basis that uses random numbers never touches the global RNG. Each parameter gets its own seed, a plain
Python int kept in its optimizer state under ``proj_seed``; it is derived at the parameter's first refresh
from the group's ``proj_seed`` and the parameter's position among the optimizer's parameters, so every
DDP rank (same model, same parameter order) derives the same seed, and a resumed run reads it back from
the checkpoint. Each draw seeds a fresh generator from (parameter seed, counter) — the counter is the
step of the refresh — so a draw depends on nothing but those two integers: no generator state has to be
saved, and a resumed run draws exactly what the uninterrupted one would have.

Generators live on the gradient's device: CPU and CUDA draws differ, draws on equal devices agree.
"""

from __future__ import annotations

import torch

from ..options import Option, number

#: state key of a parameter's seed (plain int)
SEED_KEY = "proj_seed"

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(a: int, b: int) -> int:
    """A well-spread 63-bit seed from two integers (fits torch's seed range and any int64 field)."""
    return _splitmix64(_splitmix64(int(a) & _MASK64) ^ (int(b) & _MASK64)) >> 1


def parameter_seed(state: dict, group: dict, param_index: int) -> int:
    """The parameter's seed: read from the state, or derived and stored there on first use."""
    if SEED_KEY not in state:
        state[SEED_KEY] = mix(int(group["proj_seed"]), param_index)
    return state[SEED_KEY]


def generator(seed: int, counter: int, device: torch.device) -> torch.Generator:
    """A fresh generator on ``device`` seeded from (seed, counter)."""
    return torch.Generator(device=device).manual_seed(mix(seed, counter))


#: the group option that seeds random draws (random bases, randomized SVD); shared by the projectors using it
SEED_OPTION = Option(
    "proj_seed", 0, "seed of the random draws; each parameter's own seed mixes in its position", number(integer=True)
)
