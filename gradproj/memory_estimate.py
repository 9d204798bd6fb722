r"""Analytic training memory of a LLaMA model: weights, gradients, optimizer states and activations.

``estimate_memory("llama_7b", "galore_adamw8bit", rank=1024, layerwise=True, batch_size=1, seq_len=256)``
answers "will it fit?" without building the model. Weights, gradients and activations come from the
formulas below; optimizer states come from the optimizers themselves: for every parameter the estimator
asks the registered projector, inner rule and residual rule (:mod:`gradproj.registry`) for the state they
keep (``state_layout()``, the same layouts ``load_state_dict`` checks a checkpoint against) and turns
those into bytes with :func:`gradproj.state_layout.layout_bytes`. The tests check the result against
``gradproj.optimizer_state_bytes`` of real optimizers, for every registered optimizer, projector and inner
rule. :mod:`gradproj.distributed.estimate` (per GPU, DDP / FSDP2) is a layer over :func:`parameter_state`.

Notation: h hidden size, i intermediate size, a heads, L layers, V vocabulary, b bytes per element of the
model dtype, s bytes per element of optimizer state (``state_dtype``, default the model dtype), r rank.

**Parameters.** Embedding V·h, per layer 4·h² (q, k, v, o) + 3·h·i (gate, up, down) + 2·h (norms), final
norm h, output head V·h (untied). Weights = b · #params.

**Gradients.** b · #trainable params. Per-layer updates (``layerwise``): each gradient is consumed and
freed during backward, so only the largest single gradient is counted. Projected backward
(``project_backward``, :func:`gradproj.project_backward`): a projected matrix's gradient is R, of its
low-rank shape (a step without a basis refresh; a refresh step holds the full gradients, as normal mode).

**Which weights are projected.** Every Linear of the decoder blocks (as ``gradproj.param_groups``), unless
r >= min(m, n) (then gradproj trains it unprojected). Embeddings, norms and the head are not. The side
and the shape of R are the projector's (``Projector.low_rank_shape``): for ``proj_type="std"`` an m x n
matrix with m >= n projects right (R is m x r, basis r x n), else left (R is r x n, basis m x r); ``full``
keeps both bases and an r x r R.

**Optimizer state per tensor X** (X = R for a projected matrix, the parameter itself otherwise) is the
inner rule's layout on X, the projector's layout (the basis) and the residual rule's, plus what the
optimizer keeps of its own (``OptimizerEntry.extra_state``). Floats of the basis are in the model dtype,
the inner rule's in its state dtype (``state_dtype``; without one, the model dtype, except Adafactor,
which keeps float32 statistics as transformers does; transformers' own Adafactor always float32). What
the layouts amount to:

| mode | bytes |
|---|---|
| Adam (torch AdamW, GaLore, Fira, FRUGAL) | 2·s·|X| (+4 per tensor for torch AdamW's ``step`` tensor) |
| 8-bit Adam, bitsandbytes ``AdamW8bit`` | |X| >= 4096: 2·(|X| + 4·⌈|X|/256⌉ + 4·256); smaller: 2·4·|X| (fp32) |
| 8-bit Adam inside GaLore | 2·(|X| + 4·⌈|X|/256⌉): one byte per element, one fp32 scale per block of 256 |
| Adafactor (transformers; fp32) | 2-D+: 4·(rows + cols) + 4; 1-D: 4·|X| + 4 (no first moment: beta1=None by default) |

plus, for a projected matrix, the basis: b·(r·n) or b·(m·r) for the dense bases (``svd``, ``eigh``,
``randomized_svd``; both for ``full``; ``golore`` in its first, dense phase; with ``basis_bits`` the codes,
N or ⌈N/2⌉ bytes for N entries, plus 4·⌈N/256⌉ of fp32 scales), 4·r for ``dct`` (int32
indices; the d x d DCT matrices they select from, one per distinct size and outside the optimizer state,
are counted once under ``shared``), nothing for ``random`` (regenerated from a seed) or ``identity``;
Fira adds one fp32 scalar per projected matrix (the limiter's previous norm). FRUGAL holds Adam state
only in the subspace and nothing for its sign-updated complement, so its count equals GaLore's at the
same rank.

**Activations** (saved for backward, no checkpointing, T = batch·seq tokens), fitted to what
``LlamaForCausalLM`` saves with SDPA attention: per layer and token b·(8h + 4i) + 8h + 4a bytes (the
norms keep fp32 copies); the head and loss 4V + (b + 8)·h per token (log-softmax output in fp32).
``attention="eager"`` adds the attention probabilities, a·seq·(4 + b) per layer and token (4 when b = 4).
Transient buffers (the fp32 logits at the loss, SVD workspaces, the CUDA context) are not included.

**Sharding.** ``shards=N`` (FSDP / ZeRO-3 style) divides weights, gradients and optimizer states by N;
:func:`gradproj.distributed.estimate.per_gpu_memory` has the exact per-GPU layout of FSDP2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .inner import InnerRule
from .models import LLAMA_CONFIGS, LlamaShape, get_shape
from .projectors import PROJ_TYPES
from .registry import PROJECTORS, OptimizerEntry, get_inner, get_optimizer, get_projector, get_residual
from .state_layout import Spec, layout_bytes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ATTENTION = ("sdpa", "eager")
#: the refresh interval put in the group of an estimated parameter (no layout depends on it)
UPDATE_PROJ_GAP = 200

#: inner rule -> the dtype of its state when the optimizer is given no ``state_dtype``, where that is not
#: the parameter's dtype (Adafactor keeps its statistics in float32 for half-precision weights, as
#: transformers does)
DEFAULT_STATE_DTYPE = {"adafactor": "float32"}
#: (inner rule, key) -> the group option without which the rule never creates that key (its
#: ``state_layout`` lists every key a state may hold: Adafactor's first moment exists only with ``beta1``)
OPTIONAL_KEYS = {("adafactor", "exp_avg"): "beta1"}


def __getattr__(name: str) -> Any:
    if name == "PROJECTOR_KINDS":  # the registered projectors, read when asked (registration may come later)
        return tuple(sorted(PROJECTORS))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class ParameterState:
    """The optimizer state of one parameter, by axis, as :mod:`gradproj.state_layout` specs.

    ``basis``: the projector's keys (floats in ``param_dtype``); ``inner``: the inner rule's, for a
    low-rank gradient of ``low_rank_shape`` (floats in ``inner_dtype``); ``other``: the residual rule's and
    the optimizer's own per-tensor state. ``side`` is None for an unprojected parameter.
    """

    shape: tuple[int, ...]
    low_rank_shape: tuple[int, ...]
    side: str | None
    basis: dict[str, Spec]
    inner: dict[str, Spec]
    other: dict[str, Spec]
    param_dtype: str
    inner_dtype: str
    rule: InnerRule
    group: dict[str, Any]

    @property
    def projected(self) -> bool:
        return self.side is not None

    @property
    def quantized(self) -> bool:
        """Whether the inner rule's codes are 8-bit here (R has at least the group's ``min_8bit_size`` elements)."""
        return math.prod(self.low_rank_shape) >= int(self.group.get("min_8bit_size") or 0)

    def layout(self) -> dict[str, Spec]:
        return {**self.basis, **self.inner, **self.other}

    def on_block(self, low_rank_shape: tuple[int, ...]) -> ParameterState:
        """The same parameter with the inner rule run on a block of R of ``low_rank_shape`` (a sharded R)."""
        shape = tuple(low_rank_shape)
        return replace(self, low_rank_shape=shape, inner=inner_layout(self.rule, shape, self.group))

    def state_bytes(self) -> dict[str, int]:
        """Bytes by part: ``moments`` (the inner rule's state), ``basis`` and ``other``."""
        whole, q = self.layout(), self.quantized
        return {
            "moments": layout_bytes(self.inner, self.inner_dtype, quantized=q, context=whole),
            "basis": layout_bytes(self.basis, self.param_dtype, quantized=q, context=whole),
            "other": layout_bytes(self.other, self.inner_dtype, quantized=q, context=whole),
        }


def inner_layout(rule: InnerRule, shape: tuple[int, ...], group: dict[str, Any]) -> dict[str, Spec]:
    """The keys ``rule`` keeps for a low-rank gradient of ``shape`` under ``group`` (its layout without the
    keys of options the group leaves off, :data:`OPTIONAL_KEYS`)."""
    layout = rule.state_layout(tuple(shape), group)
    return {k: v for k, v in layout.items() if group.get(OPTIONAL_KEYS.get((rule.name, k), ""), True) is not None}


def estimate_group(
    entry: OptimizerEntry,
    rank: int | None,
    proj_type: str,
    projector: str,
    state_dtype: str | None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The param group an optimizer of ``entry`` would give a matrix: the defaults of its inner rule,
    the projector and the residual, the entry's recipe (lr, constructor arguments, group keys), then
    ``options``."""
    rule, proj_cls, res_cls = get_inner(entry.inner), get_projector(projector), get_residual(entry.residual)
    group: dict[str, Any] = {**rule.defaults, **proj_cls.defaults, **res_cls.defaults, **entry.kwargs, **entry.group}
    group.update(
        lr=entry.lr,
        rank=rank,
        update_proj_gap=UPDATE_PROJ_GAP,
        proj_type=proj_type,
        projector=projector,
        residual=entry.residual,
        state_dtype=state_dtype,
    )
    group.update(options or {})
    if group.get("golore_switch_step") is None and group.get("total_steps") is None:
        group["total_steps"] = 0  # GoLore's switch point; its layout holds the keys of both phases either way
    return group


def default_projector() -> str:
    """The basis a projected group gets when it names none (the ``projector`` option's declared default)."""
    from .optimizers.engine import OPTIMIZER_OPTIONS  # here: the estimator itself does not import the engine

    return next(str(o.default) for o in OPTIMIZER_OPTIONS if o.name == "projector")


def parameter_state(
    optimizer: str | OptimizerEntry,
    shape: tuple[int, ...],
    *,
    rank: int | None,
    projected: bool = True,
    proj_type: str = "std",
    projector: str | None = None,
    dtype: str = "bfloat16",
    state_dtype: str | None = None,
    options: dict[str, Any] | None = None,
) -> ParameterState:
    """The state ``optimizer`` keeps for a parameter of ``shape`` (see :class:`ParameterState`).

    ``projected``: the parameter is in a projected group (a Linear weight of the blocks); it is then
    projected as ``ProjectedOptimizer`` would: 2-D or more, and ``rank < min(m, n)`` unless the projector
    is ``identity``. ``options``: group keys / constructor options that change the layout (``beta1``,
    ``min_8bit_size``, ...).
    """
    entry = optimizer if isinstance(optimizer, OptimizerEntry) else get_optimizer(optimizer)
    if projector is None:
        projector = entry.group.get("projector", default_projector())
    group = estimate_group(entry, rank, proj_type, projector, state_dtype, options)
    rule = get_inner(entry.inner)()
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    low, side, basis, other = shape, None, {}, {}
    if entry.projected and projected and rank is not None and len(shape) >= 2 and numel > 0:
        m, n = shape[0], numel // shape[0]
        if rank < min(m, n) or projector == "identity":
            proj = get_projector(projector)((m, n), rank, proj_type, group)
            low, side, basis = tuple(proj.low_rank_shape()), proj.side, proj.state_layout()
            other = get_residual(entry.residual)().state_layout()
    inner_dtype = entry.state_dtype or state_dtype or DEFAULT_STATE_DTYPE.get(rule.name, dtype)
    return ParameterState(
        shape=shape,
        low_rank_shape=low,
        side=side,
        basis=dict(basis),
        inner=inner_layout(rule, low, group),
        other={**other, **entry.extra_state},
        param_dtype=dtype,
        inner_dtype=inner_dtype,
        rule=rule,
        group=group,
    )


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
            + (f", rank {s['rank']}" if s.get("rank") is not None else "")
            + (", per-layer updates" if s.get("layerwise") else "")
            + (", projected backward" if s.get("project_backward") else "")
            + (f", per device of {s['shards']} (FSDP)" if s.get("shards", 1) > 1 else "")
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
    project_backward: bool = False,
    dtype: str = "bfloat16",
    state_dtype: str | None = None,
    batch_size: int = 0,
    seq_len: int = 0,
    proj_type: str = "std",
    projector: str | None = None,
    attention: str = "sdpa",
    vocab_size: int | None = None,
    active_layers: int | None = None,
    shards: int = 1,
    options: dict[str, Any] | None = None,
) -> MemoryEstimate:
    """Analytic memory of training ``model`` with ``optimizer`` (see the module docstring for formulas).

    Args:
        model: a name of :data:`gradproj.models.LLAMA_CONFIGS` or a :class:`LlamaShape`.
        optimizer: a name (or alias) of :data:`gradproj.registry.OPTIMIZERS`, installed or not.
        rank: subspace rank of projected optimizers (default: the optimizer's recipe, else hidden // 4).
        layerwise: per-layer updates (only the largest gradient is alive at a time).
        project_backward: projected matrices receive R instead of their gradient (a step without a refresh).
        dtype: model (and gradient) dtype. ``state_dtype``: Adam state dtype (default: ``dtype``).
        batch_size, seq_len: activations are counted when both are > 0.
        proj_type, projector: the projection side rule and basis kind (a registered projector; default: the
            optimizer's recipe, else the optimizers' default, :func:`default_projector`).
        attention: ``"sdpa"`` (no seq² buffers) or ``"eager"``.
        vocab_size: overrides the configuration's vocabulary.
        active_layers: with a layer sampler (LISA / OwLore), how many decoder blocks train at a time;
            frozen blocks hold no gradients and (gradproj frees their state) no optimizer state.
        shards: divide weights, gradients and optimizer states over this many devices (FSDP).
        options: group keys / constructor options of the optimizer that change its state (``beta1`` for
            Adafactor's first moment, ``min_8bit_size``, ...).
    """
    name = model if isinstance(model, str) else "custom"
    shape = get_shape(model) if isinstance(model, str) else model
    if vocab_size is not None:
        shape = shape.with_vocab(vocab_size)
    entry = get_optimizer(optimizer)
    if projector is None:
        projector = entry.group.get("projector", default_projector())
    for arg, value, allowed in (
        ("dtype", dtype, DTYPE_BYTES),
        ("projector", projector, sorted(PROJECTORS)),
        ("attention", attention, ATTENTION),
    ):
        if value not in allowed:
            raise ValueError(f"{arg} = {value!r}; use one of {', '.join(allowed)}")
    if state_dtype is not None and state_dtype not in DTYPE_BYTES:
        raise ValueError(f"state_dtype = {state_dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type = {proj_type!r}; use one of {', '.join(PROJ_TYPES)}")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank = {rank!r} must be a positive integer")
    if active_layers is not None and not 0 < active_layers <= shape.layers:
        raise ValueError(f"active_layers = {active_layers} must be in [1, {shape.layers}]")
    if project_backward and (layerwise or entry.residual != "none"):
        raise ValueError(
            "project_backward cannot be combined with layerwise=True or with a residual rule (here "
            f"{entry.residual!r}), which step from full gradients"
        )
    if shards < 1 or batch_size < 0 or seq_len < 0:
        raise ValueError("shards must be >= 1, batch_size and seq_len >= 0")

    b = DTYPE_BYTES[dtype]
    r = rank if rank is not None else entry.rank or max(1, shape.hidden // 4)
    if entry.projected:  # a combination the optimizer would refuse (Fira with proj_type="full") is refused here
        group = estimate_group(entry, r, proj_type, projector, state_dtype, options)
        get_projector(projector).validate_group(group, "the estimated group")
        get_residual(entry.residual)().validate_group(group, "the estimated group")
    params = llama_parameters(shape)
    trainable = [p for p in params if p.block is None or active_layers is None or p.block < active_layers]

    detail = {"moments": 0, "basis": 0, "shared": 0, "other": 0}
    n_projected = 0
    grad_elems = 0  # the gradients' elements alive after backward (R for projected matrices with project_backward)
    shared_dims: set[int] = set()
    for p in trainable:
        ps = parameter_state(
            entry,
            p.shape,
            rank=r,
            projected=p.linear,
            proj_type=proj_type,
            projector=projector,
            dtype=dtype,
            state_dtype=state_dtype,
            options=options,
        )
        for part, nbytes in ps.state_bytes().items():
            detail[part] += nbytes
        n_projected += ps.projected
        grad_elems += math.prod(ps.low_rank_shape) if project_backward and ps.projected else p.numel
        # a basis kept as indices selects rows of a d x d transform (the DCT) that is cached once per size
        shared_dims.update(spec.bound for spec in ps.basis.values() if spec.kind == "index" and spec.bound)
    detail["shared"] = sum(b * d * d for d in shared_dims)

    n_params = sum(p.numel for p in params)
    n_trainable = sum(p.numel for p in trainable)
    weights = b * n_params
    gradients = b * (max(p.numel for p in trainable) if layerwise else grad_elems)
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
        optimizer=entry.name,
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
            "rank": r if entry.projected else None,
            "layerwise": layerwise,
            "project_backward": project_backward,
            "dtype": dtype,
            "state_dtype": state_dtype or dtype,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "proj_type": proj_type,
            "projector": projector,
            "attention": attention,
            "active_layers": active_layers,
            "shards": shards,
            **({"options": dict(options)} if options else {}),
        },
        config=shape.as_dict(),
    )


__all__ = [
    "LLAMA_CONFIGS",
    "MemoryEstimate",
    "ParameterState",
    "estimate_memory",
    "inner_layout",
    "llama_parameters",
    "parameter_state",
]
