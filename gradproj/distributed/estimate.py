"""Analytic per-GPU memory and communication of data-parallel training with gradproj optimizers.

Counts what persists across steps on one GPU: weights, gradients and optimizer state, under DDP (every
GPU holds everything) or FSDP2 (each GPU holds its ``torch.chunk`` share of every tensor's rows, and the
gradproj state is laid out as :mod:`gradproj.distributed.sharding` describes). Activations, FSDP's
all-gathered block parameters and the refresh's temporary buffers are not included.

This is deliberately small; the ``gradproj memory`` command has the single-GPU estimator, and the two
should become one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..models import LLAMA_CONFIGS

#: name -> (hidden, intermediate, heads, layers); vocabulary 32000 (the GaLore paper's configurations), from the one table
LLAMA = {name: (s.hidden, s.intermediate, s.heads, s.layers)
         for name, s in LLAMA_CONFIGS.items() if name.startswith("llama_")}
VOCAB = 32000
OPTIMIZERS = ("adamw", "galore", "galore_8bit", "fira")
STRATEGIES = ("ddp", "fsdp")
#: bitsandbytes' 8-bit optimizers: one float32 absmax per block of 256 values; tensors under 4096
#: elements keep 32-bit state
BLOCK_8BIT, MIN_8BIT = 256, 4096


def llama_tensors(name: str) -> list[tuple[tuple[int, ...], bool]]:
    """``(shape, projected)`` of every parameter of a LLaMA config: the 7 Linear weights of each decoder
    block are projected (gradproj.param_groups' default); embeddings, head and norms are not."""
    if name not in LLAMA:
        raise ValueError(f"unknown model {name!r}; use one of {', '.join(LLAMA)}")
    h, i, _, layers = LLAMA[name]
    block = [((h, h), True)] * 4 + [((i, h), True)] * 2 + [((h, i), True)] + [((h,), False)] * 2
    return [((VOCAB, h), False)] + block * layers + [((h,), False), ((VOCAB, h), False)]


def _rows(m: int, world: int, rank: int) -> int:
    chunk = math.ceil(m / world)
    return max(0, min(chunk, m - rank * chunk))


def per_gpu_memory(
    tensors: Iterable[tuple[Sequence[int], bool]],
    optimizer: str,
    strategy: str = "ddp",
    world_size: int = 1,
    *,
    rank: int = 512,
    gpu: int = 0,
    weight_bytes: int = 2,
    grad_bytes: int = 2,
    state_bytes: int = 2,
    proj_type: str = "std",
) -> dict[str, int]:
    """Bytes of ``weights``, ``gradients``, ``optimizer_states`` and their ``total`` on GPU ``gpu``.

    ``tensors``: ``(shape, projected)`` pairs (see :func:`llama_tensors`). ``optimizer``: ``"adamw"``,
    ``"galore"``, ``"galore_8bit"`` or ``"fira"``; ``rank`` is the projection rank. Under FSDP2, GPU 0
    holds the largest shards. Byte sizes default to bf16 weights, gradients and states; bases are stored
    in the weights' dtype, Fira's limiter norm in float32.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; use one of {', '.join(STRATEGIES)}")
    k = world_size if strategy == "fsdp" else 1
    out = {"weights": 0, "gradients": 0, "optimizer_states": 0}
    for shape, projected in tensors:
        m = shape[0] if shape else 1
        rest = math.prod(shape[1:]) if len(shape) > 1 else 1
        rows = _rows(m, k, gpu if k > 1 else 0)
        local = rows * rest
        out["weights"] += local * weight_bytes
        out["gradients"] += local * grad_bytes
        r = rank
        if optimizer == "adamw" or not projected or len(shape) < 2 or r >= min(m, rest):
            out["optimizer_states"] += _moments(local, optimizer, state_bytes)
            continue
        side = _side(m, rest, proj_type)
        if side == "right":  # R (m x r) row-sharded like W; basis r x n replicated
            moment_elems, basis_bytes = rows * r, r * rest * weight_bytes
        elif side == "left":  # R (r x n) split by columns; basis m x r split by rows
            moment_elems, basis_bytes = r * _rows(rest, k, gpu if k > 1 else 0), rows * r * weight_bytes
        else:  # full: R r x r replicated; bases m x r (row-sharded) and r x n (replicated)
            moment_elems, basis_bytes = r * r, (rows * r + r * rest) * weight_bytes
        out["optimizer_states"] += _moments(moment_elems, optimizer, state_bytes) + basis_bytes
        if optimizer == "fira":
            out["optimizer_states"] += 4
    out["total"] = sum(out.values())
    return out


def _side(m: int, n: int, proj_type: str) -> str:
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def _moments(elements: int, optimizer: str, state_bytes: int) -> int:
    if optimizer == "galore_8bit" and elements >= MIN_8BIT:
        return 2 * (elements + 4 * math.ceil(elements / BLOCK_8BIT))
    return 2 * elements * (4 if optimizer == "galore_8bit" else state_bytes)


def sharded_communication(
    tensors: Iterable[tuple[Sequence[int], bool]],
    rank: int,
    *,
    grad_bytes: int = 2,
    proj_type: str = "std",
    fira: bool = False,
) -> dict[str, int]:
    """Payload bytes of the collectives a gradproj optimizer adds under FSDP2 (default ``sharded_refresh="gram"``).

    ``per_step``: the reduce-scatter of R and the all-gather of ψ for left projections (each r x n, together
    the bytes of one all-reduce), the all-reduce of R for full ones, and for Fira its float32 norm and, for
    left projections, the all-gather of R and of n float32 factors;
    ``per_refresh``: the all-reduce of the n x n float32 Gram matrix of each right projection and the
    all-gather of each left / full-projected gradient. A ring all-reduce of B payload bytes moves about
    2·(k−1)/k·B per GPU, an all-gather (k−1)/k·B. For comparison, ``fsdp_per_step`` is FSDP2's own payload:
    the all-gather of the weights in forward and backward and the reduce-scatter of the gradients.
    """
    out = {"per_step": 0, "per_refresh": 0, "fsdp_per_step": 0}
    for shape, projected in tensors:
        m = shape[0] if shape else 1
        n = math.prod(shape[1:]) if len(shape) > 1 else 1
        out["fsdp_per_step"] += 3 * m * n * grad_bytes
        if not projected or len(shape) < 2 or rank >= min(m, n):
            continue
        side = _side(m, n, proj_type)
        if side == "right":
            out["per_refresh"] += n * n * 4
        else:
            out["per_refresh"] += m * n * grad_bytes
            out["per_step"] += (2 * rank * n if side == "left" else rank * rank) * grad_bytes
        if fira:
            out["per_step"] += 4 + ((rank * n * grad_bytes + 4 * n) if side == "left" else 0)
    return out
