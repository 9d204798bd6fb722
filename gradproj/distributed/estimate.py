"""Analytic per-GPU memory and communication of data-parallel training with gradproj optimizers.

Counts what persists across steps on one GPU: weights, gradients and optimizer state, under DDP (every
GPU holds everything) or FSDP2 (each GPU holds its ``torch.chunk`` share of every tensor's rows, and the
gradproj state is laid out as :mod:`gradproj.optimizers.sharding` describes). Activations, FSDP's
all-gathered block parameters and the refresh's temporary buffers are not included.

This is a layer over the one estimator, :mod:`gradproj.memory_estimate`: the state of each parameter is
:func:`gradproj.memory_estimate.parameter_state` (the layouts of its projector, inner rule and residual
rule); sharding only divides what is sharded. Optimizer names are those of :mod:`gradproj.registry`
(this module's older spellings ``galore``, ``galore_8bit`` and ``fira`` are registered aliases of
``galore_adamw``, ``galore_adamw8bit`` and ``fira_adamw``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace

from ..memory_estimate import ParameterState, default_projector, llama_parameters, parameter_state
from ..models import LLAMA_CONFIGS, get_shape
from ..projectors import choose_side
from ..registry import get_optimizer, optimizer_names
from .sharding import ROW_BASIS_KEYS

#: name -> (hidden, intermediate, heads, layers); vocabulary 32000 (the GaLore paper's configurations), from the one
#: table
LLAMA = {
    name: (s.hidden, s.intermediate, s.heads, s.layers)
    for name, s in LLAMA_CONFIGS.items()
    if name.startswith("llama_")
}
VOCAB = 32000
STRATEGIES = ("ddp", "fsdp")
#: element size in bytes -> the dtype the estimator counts with
DTYPES = {4: "float32", 2: "bfloat16"}


def llama_tensors(name: str) -> list[tuple[tuple[int, ...], bool]]:
    """``(shape, projected)`` of every parameter of a LLaMA config: the 7 Linear weights of each decoder
    block are projected (gradproj.param_groups' default); embeddings, head and norms are not."""
    return [(p.shape, p.linear) for p in llama_parameters(get_shape(name))]


def _rows(m: int, world: int, rank: int) -> int:
    chunk = math.ceil(m / world)
    return max(0, min(chunk, m - rank * chunk))


def _dtype(nbytes: int, what: str) -> str:
    if nbytes not in DTYPES:
        raise ValueError(f"{what} = {nbytes!r}; use 4 (float32) or 2 (bfloat16)")
    return DTYPES[nbytes]


def shard_state(ps: ParameterState, world: int, index: int) -> ParameterState:
    """The part of ``ps`` that GPU ``index`` of ``world`` holds under FSDP2 (:mod:`gradproj.optimizers.sharding`).

    The inner rule runs on this GPU's block of R: its rows (``torch.chunk`` of W's rows) for a right
    projection or an unprojected parameter, its columns for a left projection, all of R (replicated) for
    a two-sided one. The bases of left and two-sided projections (``proj`` / ``proj_left``, m x r) are
    split by rows like W; everything else is replicated. Inner rules that cannot run on a block
    (``InnerRule.shardable``; 8-bit Adam) are counted as if they could: gradproj refuses them under FSDP
    today (right projections) or replicates R (left ones).
    """
    if world <= 1:
        return ps
    low = ps.low_rank_shape
    if ps.side is None or ps.side == "right":
        block = (_rows(low[0], world, index), *low[1:])
    elif ps.side == "left":
        block = (low[0], _rows(low[1], world, index))
    else:
        block = low
    basis = dict(ps.basis)
    if ps.side in ("left", "full"):
        rows = _rows(ps.shape[0], world, index)
        for key in ROW_BASIS_KEYS:
            if key in basis and (shape := basis[key].shape) is not None:
                basis[key] = replace(basis[key], shape=(rows, *shape[1:]))
    return replace(ps.on_block(block), basis=basis)


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
    projector: str | None = None,
) -> dict[str, int]:
    """Bytes of ``weights``, ``gradients``, ``optimizer_states`` and their ``total`` on GPU ``gpu``.

    ``tensors``: ``(shape, projected)`` pairs (see :func:`llama_tensors`). ``optimizer``: a name or alias of
    :mod:`gradproj.registry` (``"adamw"``, ``"galore"``, ``"galore_8bit"``, ``"fira"``, ...); ``rank`` is
    the projection rank. Under FSDP2, GPU 0 holds the largest shards. Byte sizes (4 or 2) default to bf16
    weights, gradients and states (``state_bytes`` is the optimizer's ``state_dtype`` option: float32 or
    bfloat16); bases are stored in the weights' dtype, scalars (Fira's limiter norm, torch's ``step``
    tensor) in float32.
    """
    try:
        entry = get_optimizer(optimizer)
    except ValueError:
        raise ValueError(f"optimizer={optimizer!r}; use one of {', '.join(optimizer_names(aliases=True))}") from None
    if projector is None:  # the optimizer's basis (APOLLO's is random), else GaLore's
        projector = entry.group.get("projector", default_projector())
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; use one of {', '.join(STRATEGIES)}")
    weight_dtype, state_dtype = _dtype(weight_bytes, "weight_bytes"), _dtype(state_bytes, "state_bytes")
    k = world_size if strategy == "fsdp" else 1
    index = gpu if k > 1 else 0
    out = {"weights": 0, "gradients": 0, "optimizer_states": 0}
    for shape, projected in tensors:
        shape = tuple(shape)
        m = shape[0] if shape else 1
        rest = math.prod(shape[1:]) if len(shape) > 1 else 1
        local = _rows(m, k, index) * rest
        out["weights"] += local * weight_bytes
        out["gradients"] += local * grad_bytes
        ps = parameter_state(
            entry,
            shape,
            rank=rank,
            projected=projected,
            proj_type=proj_type,
            projector=projector,
            dtype=weight_dtype,
            state_dtype=state_dtype,
        )
        out["optimizer_states"] += sum(shard_state(ps, k, index).state_bytes().values())
    out["total"] = sum(out.values())
    return out


def _side(m: int, n: int, proj_type: str) -> str:
    return choose_side(m, n, proj_type)


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
