r"""Analytic training memory of a LLaMA model: weights, gradients, optimizer states and activations.

``estimate_memory("llama_7b", "galore_adamw8bit", rank=1024, layerwise=True, batch_size=1, seq_len=256)``
answers "will it fit?" without building the model. Every number is a byte count from the formulas below,
which follow what the optimizers actually store (checked against ``gradproj.optimizer_state_bytes`` of
real optimizers in the tests) and what transformers' ``LlamaForCausalLM`` saves for backward.

Notation: h hidden size, i intermediate size, a heads, L layers, V vocabulary, b bytes per element of the
model dtype, s bytes per element of optimizer state (``state_dtype``, default the model dtype), r rank.

**Parameters.** Embedding V·h, per layer 4·h² (q, k, v, o) + 3·h·i (gate, up, down) + 2·h (norms), final
norm h, output head V·h (untied). Weights = b · #params.

**Gradients.** b · #trainable params. Per-layer updates (``layerwise``): each gradient is consumed and
freed during backward, so only the largest single gradient is counted.

**Which weights are projected.** Every Linear of the decoder blocks (as ``gradproj.param_groups``), unless
r >= min(m, n) (then gradproj trains it unprojected). Embeddings, norms and the head are not. Side of an
m x n matrix (``proj_type="std"``): m >= n right (R is m x r, basis r x n), else left (R is r x n, basis
m x r); ``full`` keeps both bases and an r x r R.

**Optimizer state per tensor X** (X = R for a projected matrix, the parameter itself otherwise):

| mode | bytes |
|---|---|
| Adam (torch AdamW, GaLore, Fira, FRUGAL) | 2·s·|X| (+4 per tensor for torch AdamW's ``step`` tensor) |
| 8-bit Adam, bitsandbytes ``AdamW8bit`` | |X| >= 4096: 2·(|X| + 4·⌈|X|/256⌉ + 4·256); smaller: 2·4·|X| (fp32) |
| 8-bit Adam inside GaLore | 2·(|X| + 4·⌈|X|/256⌉): one byte per element, one fp32 scale per block of 256 |
| Adafactor (transformers; fp32) | 2-D+: 4·(rows + cols) + 4; 1-D: 4·|X| + 4 (no first moment, as its default beta1=None) |

plus, for a projected matrix, the basis: b·(r·n) or b·(m·r) for ``svd`` / ``randomized_svd`` (both
bases for ``full``), 4·r for ``dct`` (int32 indices; the d x d DCT matrices, one per distinct size, are
counted once under ``shared``), nothing for ``random`` (regenerated from a seed); Fira adds one fp32
scalar per projected matrix (the limiter's previous norm). FRUGAL holds Adam state only in the subspace
and nothing for its sign-updated complement, so its count equals GaLore's at the same rank.

**Activations** (saved for backward, no checkpointing, T = batch·seq tokens), fitted to what
``LlamaForCausalLM`` saves with SDPA attention: per layer and token b·(8h + 4i) + 8h + 4a bytes (the
norms keep fp32 copies); the head and loss 4V + (b + 8)·h per token (log-softmax output in fp32).
``attention="eager"`` adds the attention probabilities, a·seq·(4 + b) per layer and token (4 when b = 4).
Transient buffers (the fp32 logits at the loss, SVD workspaces, the CUDA context) are not included.

**Sharding.** ``shards=N`` (FSDP / ZeRO-3 style) divides weights, gradients and optimizer states by N.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .models import LLAMA_CONFIGS, LlamaShape, get_shape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PROJECTOR_KINDS = ("svd", "randomized_svd", "dct", "random")
ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class _Mode:
    inner: str  # adam | adam8bit | bnb8bit | adafactor
    projected: bool
    per_matrix_extra: int = 0  # bytes of extra state per projected matrix
    step_tensor: bool = False  # torch.optim keeps `step` as a 4-byte tensor per parameter


#: optimizer name -> how its state is laid out (known analytically, whether or not the class is installed)
OPTIMIZER_MODES: dict[str, _Mode] = {
    "adamw": _Mode("adam", projected=False, step_tensor=True),
    "adamw8bit": _Mode("bnb8bit", projected=False),
    "adafactor": _Mode("adafactor", projected=False),
    "galore_adamw": _Mode("adam", projected=True),
    "fira_adamw": _Mode("adam", projected=True, per_matrix_extra=4),
    "frugal_adamw": _Mode("adam", projected=True),
    "galore_adamw8bit": _Mode("adam8bit", projected=True),
    "galore_adafactor": _Mode("adafactor", projected=True),
}


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    block: int | None  # decoder layer index, None outside the blocks
    linear: bool  # a Linear weight of a decoder block (a projection candidate)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def llama_parameters(shape: LlamaShape) -> list[ParamInfo]:
    """The parameters of ``LlamaForCausalLM`` for ``shape`` (untied embeddings), torch layout [out, in]."""
    h, i, V = shape.hidden, shape.intermediate, shape.vocab
    out = [ParamInfo("model.embed_tokens.weight", (V, h), None, False)]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        out.append(ParamInfo(p + "input_layernorm.weight", (h,), layer, False))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append(ParamInfo(p + f"self_attn.{name}.weight", (h, h), layer, True))
        out.append(ParamInfo(p + "post_attention_layernorm.weight", (h,), layer, False))
        out.append(ParamInfo(p + "mlp.gate_proj.weight", (i, h), layer, True))
        out.append(ParamInfo(p + "mlp.up_proj.weight", (i, h), layer, True))
        out.append(ParamInfo(p + "mlp.down_proj.weight", (h, i), layer, True))
    out.append(ParamInfo("model.norm.weight", (h,), None, False))
    out.append(ParamInfo("lm_head.weight", (V, h), None, False))
    return out


def _adam8bit_blockwise(numel: int, block: int = 256, min_8bit_size: int = 4096) -> int:
    """GaLoreAdamW8bit: two uint8 moments plus one fp32 scale per block of 256 each; tensors smaller than
    ``min_8bit_size`` keep two fp32 moments (as bitsandbytes does)."""
    if numel < min_8bit_size:
        return 2 * 4 * numel
    return 2 * (numel + 4 * math.ceil(numel / block))


def _bnb_adamw8bit(numel: int) -> int:
    if numel >= 4096:  # bitsandbytes' min_8bit_size
        return 2 * (numel + 4 * math.ceil(numel / 256) + 4 * 256)  # uint8 states, absmax, qmap per state
    return 2 * 4 * numel


def _adafactor(shape: tuple[int, ...]) -> int:
    """Adafactor (no first moment, as transformers' default): fp32 row and column factors (or the full fp32
    second moment of a 1-D tensor), plus the weight's RMS as one fp32 scalar — for any weight dtype."""
    if len(shape) >= 2:
        rows = math.prod(shape[:-1])
        cols = math.prod(shape[:-2]) * shape[-1]
        return 4 * (rows + cols) + 4
    return 4 * math.prod(shape) + 4


def _inner_bytes(inner: str, shape: tuple[int, ...], state_bytes: int) -> int:
    numel = math.prod(shape)
    if inner == "adam":
        return 2 * state_bytes * numel
    if inner == "adam8bit":
        return _adam8bit_blockwise(numel)
    if inner == "bnb8bit":
        return _bnb_adamw8bit(numel)
    if inner == "adafactor":
        return _adafactor(shape)
    raise ValueError(f"unknown inner rule {inner!r}")


@dataclass
class MemoryEstimate:
    """Byte counts of one training configuration (``as_dict()`` for JSON, ``table()`` for people)."""

    model: str
    optimizer: str
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    total: int
    optimizer_states_detail: dict[str, int]
    n_params: int
    n_trainable: int
    n_projected: int
    settings: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["units"] = "bytes"
        return d

    def fits(self, budget_bytes: float) -> bool:
        return self.total <= budget_bytes

    def table(self) -> str:
        s = self.settings
        head = (
            f"{self.model} ({self.n_params / 1e6:,.1f}M parameters, {self.n_trainable / 1e6:,.1f}M trainable), "
            f"{self.optimizer}"
            + (f", rank {s['rank']}" if s.get("rank") is not None and OPTIMIZER_MODES[self.optimizer].projected else "")
            + (", per-layer updates" if s.get("layerwise") else "")
            + f", {s['dtype']}"
            + (f", batch {s['batch_size']} x seq {s['seq_len']}" if self.activations else ", no activations")
        )
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer_states),
            *((f"  {k}", v) for k, v in self.optimizer_states_detail.items() if v),
            ("activations", self.activations),
            ("total", self.total),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [head, f"{'':<{width}}  {'GB':>10}  {'GiB':>10}  {'bytes':>16}"]
        for name, value in rows:
            lines.append(f"{name:<{width}}  {value / 1e9:>10.3f}  {value / 2**30:>10.3f}  {value:>16,}")
        return "\n".join(lines)


def estimate_memory(
    model: str | LlamaShape = "llama_7b",
    optimizer: str = "adamw",
    rank: int | None = None,
    *,
    layerwise: bool = False,
    dtype: str = "bfloat16",
    state_dtype: str | None = None,
    batch_size: int = 0,
    seq_len: int = 0,
    proj_type: str = "std",
    projector: str = "svd",
    attention: str = "sdpa",
    vocab_size: int | None = None,
    active_layers: int | None = None,
    shards: int = 1,
) -> MemoryEstimate:
    """Analytic memory of training ``model`` with ``optimizer`` (see the module docstring for formulas).

    Args:
        model: a name of :data:`gradproj.models.LLAMA_CONFIGS` or a :class:`LlamaShape`.
        optimizer: a name of :data:`OPTIMIZER_MODES`.
        rank: subspace rank of projected optimizers (default hidden // 4).
        layerwise: per-layer updates (only the largest gradient is alive at a time).
        dtype: model (and gradient) dtype. ``state_dtype``: Adam state dtype (default: ``dtype``).
        batch_size, seq_len: activations are counted when both are > 0.
        proj_type, projector: the projection side rule and basis kind.
        attention: ``"sdpa"`` (no seq² buffers) or ``"eager"``.
        vocab_size: overrides the configuration's vocabulary.
        active_layers: with a layer sampler (LISA / OwLore), how many decoder blocks train at a time;
            frozen blocks hold no gradients and (gradproj frees their state) no optimizer state.
        shards: divide weights, gradients and optimizer states over this many devices (FSDP).
    """
    name = model if isinstance(model, str) else "custom"
    shape = get_shape(model) if isinstance(model, str) else model
    if vocab_size is not None:
        shape = shape.with_vocab(vocab_size)
    if optimizer not in OPTIMIZER_MODES:
        raise ValueError(f"unknown optimizer {optimizer!r}; the estimator knows {', '.join(OPTIMIZER_MODES)}")
    for arg, value, allowed in (("dtype", dtype, DTYPE_BYTES), ("projector", projector, PROJECTOR_KINDS), ("attention", attention, ATTENTION)):
        if value not in allowed:
            raise ValueError(f"{arg} = {value!r}; use one of {', '.join(allowed)}")
    if state_dtype is not None and state_dtype not in DTYPE_BYTES:
        raise ValueError(f"state_dtype = {state_dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    if proj_type not in ("std", "reverse_std", "left", "right", "full"):
        raise ValueError(f"proj_type = {proj_type!r}; use std, reverse_std, left, right or full")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank = {rank!r} must be a positive integer")
    if active_layers is not None and not 0 < active_layers <= shape.layers:
        raise ValueError(f"active_layers = {active_layers} must be in [1, {shape.layers}]")
    if shards < 1 or batch_size < 0 or seq_len < 0:
        raise ValueError("shards must be >= 1, batch_size and seq_len >= 0")

    mode = OPTIMIZER_MODES[optimizer]
    b = DTYPE_BYTES[dtype]
    s = DTYPE_BYTES[state_dtype or dtype]
    r = rank if rank is not None else max(1, shape.hidden // 4)
    params = llama_parameters(shape)
    trainable = [p for p in params if p.block is None or active_layers is None or p.block < active_layers]

    detail = {"moments": 0, "basis": 0, "shared": 0, "other": 0}
    n_projected = 0
    shared_dims: set[int] = set()
    for p in trainable:
        if mode.projected and p.linear and r < min(p.shape):
            n_projected += 1
            m, n = p.shape
            side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}.get(proj_type, proj_type)
            low = {"right": (m, r), "left": (r, n), "full": (r, r)}[side]
            detail["moments"] += _inner_bytes(mode.inner, low, s)
            if projector in ("svd", "randomized_svd"):
                detail["basis"] += b * ((m * r + r * n) if side == "full" else (r * n if side == "right" else m * r))
            elif projector == "dct":
                detail["basis"] += 4 * r * (2 if side == "full" else 1)
                shared_dims.update({"right": [n], "left": [m], "full": [m, n]}[side])
            detail["other"] += mode.per_matrix_extra
        else:
            detail["moments"] += _inner_bytes(mode.inner, p.shape, s)
        if mode.step_tensor:
            detail["other"] += 4
    detail["shared"] = sum(b * d * d for d in shared_dims)

    n_params = sum(p.numel for p in params)
    n_trainable = sum(p.numel for p in trainable)
    weights = b * n_params
    gradients = b * (max(p.numel for p in trainable) if layerwise else n_trainable)
    states = sum(detail.values())
    if shards > 1:
        weights, gradients, states = (math.ceil(x / shards) for x in (weights, gradients, states))
        detail = {k: math.ceil(v / shards) for k, v in detail.items()}
    activations = 0
    if batch_size and seq_len:
        h, i, a, V = shape.hidden, shape.intermediate, shape.heads, shape.vocab
        per_layer = b * (8 * h + 4 * i) + 8 * h + 4 * a
        if attention == "eager":
            per_layer += a * seq_len * (4 + (b if b < 4 else 0))
        activations = batch_size * seq_len * (shape.layers * per_layer + 4 * V + (b + 8) * h)
    return MemoryEstimate(
        model=name,
        optimizer=optimizer,
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        activations=activations,
        total=weights + gradients + states + activations,
        optimizer_states_detail=detail,
        n_params=n_params,
        n_trainable=n_trainable,
        n_projected=n_projected,
        settings={
            "rank": r if mode.projected else None,
            "layerwise": layerwise,
            "dtype": dtype,
            "state_dtype": state_dtype or dtype,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "proj_type": proj_type,
            "projector": projector,
            "attention": attention,
            "active_layers": active_layers,
            "shards": shards,
        },
        config=shape.as_dict(),
    )


__all__ = ["LLAMA_CONFIGS", "OPTIMIZER_MODES", "MemoryEstimate", "estimate_memory", "llama_parameters"]
