"""The optimizers ``gradproj train`` / ``compare`` know by name: those of :mod:`gradproj.registry`.

Adding one is one :func:`gradproj.registry.register_optimizer` call: the class (as ``"module:Name"``,
imported only when used), its default learning rate, whether it takes GaLore's projected param groups,
default constructor arguments / projected-group keys, and how its state is laid out (for the memory
estimators). A name whose class cannot be imported in this installation (an optional dependency missing,
or a class this version of gradproj does not have) is listed as unavailable and rejected with a clear
message, so the table can name optimizers before they exist. Aliases (old spellings such as
``galore_8bit``) are accepted wherever a name is.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .. import registry
from ..models import LlamaShape
from ..registry import OPTIMIZERS as OPTIMIZERS  # re-exported: the registry's one table
from ..registry import OptimizerEntry

log = logging.getLogger("gradproj")

#: the registry's entry type, under the name this module has always used
OptimizerSpec = OptimizerEntry


#: packages an inner rule needs beyond torch (the 8-bit rule quantizes with bitsandbytes' functional ops)
INNER_RULE_PACKAGES: dict[str, tuple[str, ...]] = {"adam8bit": ("bitsandbytes",)}
#: what each optional package is for, as ``gradproj list`` reports it
OPTIONAL_PACKAGES: dict[str, str] = {
    "bitsandbytes": "8-bit optimizer state (adamw8bit, galore_adamw8bit, inner=adam8bit)",
    "triton": "fused CUDA kernels (impl=triton; impl=auto takes them on CUDA)",
    "datasets": "--data hf:NAME",
}


def installed(package: str) -> bool:
    """Whether ``package`` can be imported here, found without importing it (``importlib.util.find_spec``)."""
    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def required_packages(spec: OptimizerEntry, inner: str | None = None) -> list[str]:
    """The packages beyond gradproj and torch that optimizer ``spec`` needs (with inner rule ``inner``)."""
    top = spec.target.partition(":")[0].split(".")[0]
    needs = [] if top in ("gradproj", "torch") else [top]
    for rule in (spec.inner, inner):
        needs += [p for p in INNER_RULE_PACKAGES.get(rule or "", ()) if p not in needs]
    return needs


def missing_packages(spec: OptimizerEntry, inner: str | None = None) -> list[str]:
    """The packages of :func:`required_packages` that are not installed (nothing is imported)."""
    return [p for p in required_packages(spec, inner) if not installed(p)]


def available_names() -> list[str]:
    """The canonical optimizer names whose packages are installed (found without importing them)."""
    return [name for name, spec in OPTIMIZERS.items() if not missing_packages(spec)]


def get_spec(name: str, inner: str | None = None) -> OptimizerEntry:
    """The registered entry of ``name`` (or of an alias); ValueError when unknown or its packages are missing.

    Only the packages are looked for (nothing is imported), so naming an optimizer costs nothing.
    """
    try:
        spec = registry.get_optimizer(name)
    except ValueError:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(available_names())}") from None
    missing = missing_packages(spec, inner)
    if missing:
        raise ValueError(
            f"optimizer {name!r} needs {' and '.join(missing)}, which is not installed here: "
            f"pip install {' '.join(missing)} (available now: {', '.join(available_names())})"
        )
    return spec


def available_projectors() -> list[str]:
    return registry.projector_names()


@dataclass
class OptimizerChoice:
    """Everything that selects and configures the optimizer of a run (plain values: goes into config.json)."""

    name: str = "galore_adamw"
    lr: float | None = None  # None: the spec's default
    weight_decay: float = 0.0
    rank: int | None = None  # None: the spec's, else hidden // 4, GaLore's ratio at 60M, 350M, 1B and 7B
    update_proj_gap: int = 200
    scale: float | None = None  # None: the spec's default (0.25; FRUGAL 1.0, with AdamW's lr)
    proj_type: str = "std"
    projector: str | None = None  # None: the optimizer's default (randomized_svd)
    target_modules: list[str] | None = None  # None: every Linear of the decoder blocks
    layerwise: bool = False
    #: projected nn.Linear weights receive R = PᵀG from the backward pass (gradproj.project_backward)
    project_backward: bool = False
    group_options: dict[str, Any] = field(default_factory=dict)
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    sampler: str | None = None  # "uniform" (LISA) or "owl" (OwLore)
    active_layers: int = 2
    sample_interval: int = 50
    #: with ``sampler``: keep a deactivated block's optimizer state for its return (LayerSampler's option)
    keep_inactive_state: bool = False
    #: lr of every parameter outside the target matrices (embeddings, norms, head); None: ``lr`` for all of them
    embed_lr: float | None = None

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_spec(self.name).lr

    def resolved(self, hidden: int) -> OptimizerChoice:
        """A copy with the recipe's defaults written out: ``lr``, and for an optimizer that projects, ``rank``
        and ``scale``; for one that does not, the projection settings it ignores are dropped (``None``). What
        ``config.json`` stores; building from either gives the same optimizer."""
        spec = get_spec(self.name, self.group_options.get("inner"))
        out = replace(self, lr=self.learning_rate())
        if spec.projected:
            out.rank = self.rank if self.rank is not None else spec.rank or max(1, hidden // 4)
            out.scale = self.scale if self.scale is not None else spec.scale
        else:
            out.rank = out.scale = out.projector = None
            out.group_options = {}
        return out


class _Block(nn.Module):
    """A LLaMA decoder block's parameters under transformers' names (no forward), on the meta device."""

    def __init__(self, shape: LlamaShape, dtype: torch.dtype):
        super().__init__()
        h, i = shape.hidden, shape.intermediate
        self.self_attn = nn.ModuleDict({k: _linear(h, h, dtype) for k in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.ModuleDict(
            {"gate_proj": _linear(h, i, dtype), "up_proj": _linear(h, i, dtype), "down_proj": _linear(i, h, dtype)}
        )
        self.input_layernorm = nn.RMSNorm(h, device="meta", dtype=dtype)
        self.post_attention_layernorm = nn.RMSNorm(h, device="meta", dtype=dtype)


def _linear(n_in: int, n_out: int, dtype: torch.dtype) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False, device="meta", dtype=dtype)


class StandInModel(nn.Module):
    """The parameters of ``LlamaForCausalLM`` (names and shapes; no forward) of ``shape`` with ``vocab_size``
    entries, on the meta device: for checking an optimizer's options without transformers, allocating
    nothing."""

    def __init__(self, shape: LlamaShape, vocab_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        h = shape.hidden
        self.model = nn.Module()
        # an explicit weight: nn.Embedding's own initialisation would import torch._dynamo (a second) for nothing
        embedding = torch.empty(vocab_size, h, device="meta", dtype=dtype)
        self.model.embed_tokens = nn.Embedding(vocab_size, h, _weight=embedding)
        self.model.layers = nn.ModuleList(_Block(shape, dtype) for _ in range(shape.layers))
        self.model.norm = nn.RMSNorm(h, device="meta", dtype=dtype)
        self.lm_head = _linear(h, vocab_size, dtype)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def check_optimizer(
    choice: OptimizerChoice,
    shape: LlamaShape,
    vocab_size: int,
    *,
    seed: int = 0,
    accumulation_steps: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> None:
    """Every check of :func:`build_optimizer` without a model: the optimizer is built on a
    :class:`StandInModel` on the meta device (no memory, no data, well under a second); raises what building
    it for the real model would (ValueError naming the option), refuses a rank above every projected
    matrix's min(m, n) (nothing would be projected), ``impl="triton"`` where the kernels cannot run on
    ``device`` (which the first step would find), and with ``project_backward`` every refusal of
    :func:`gradproj.project_backward`, switched on for the stand-in."""
    impl = choice.group_options.get("impl", choice.optimizer_options.get("impl"))
    if impl == "triton" and device is not None:
        from ..kernels import why_not_triton

        reason = why_not_triton(torch.empty(0, dtype=dtype, device=device))
        if reason is not None:
            raise ValueError(f"impl='triton' cannot run here: {reason}. Use impl='auto' or impl='torch'")
    model = StandInModel(shape, vocab_size, dtype)
    optimizer = build_optimizer(model, choice, shape.hidden, seed=seed, accumulation_steps=accumulation_steps)
    # every >= 2-D weight of the model, not only those left in a projected group: param_groups moves the
    # matrices a rank covers into a group without projection (with a warning)
    full = [min(p.shape[0], p[0].numel()) for g in optimizer.param_groups for p in g["params"] if p.dim() >= 2]
    if full and get_spec(choice.name).projected and choice.rank is not None and choice.rank > max(full):
        raise ValueError(
            f"rank = {choice.rank} exceeds min(m, n) = {max(full)} of the largest projected matrix of this model, "
            f"so nothing would be projected; use a rank below {max(full)} (or an optimizer that does not project)"
        )
    if choice.project_backward:
        switch_on_project_backward(model, optimizer, choice, distributed=False)  # its own checks, on the stand-in


def switch_on_project_backward(
    model: nn.Module, optimizer: torch.optim.Optimizer, choice: OptimizerChoice, *, distributed: bool | None = None
) -> Any:
    """:func:`gradproj.project_backward` for ``--project-backward``: its refusals (a residual rule, compile, no
    projected ``nn.Linear``), and an optimizer that projects nothing or ``--layerwise``, as a ValueError naming
    the flag; returns the handle."""
    if not get_spec(choice.name).projected:
        raise ValueError(
            f"--project-backward delivers the projected gradient R of the weights an optimizer projects, and "
            f"{choice.name} projects nothing; use it with a projecting optimizer such as galore_adamw, or drop it"
        )
    if choice.layerwise:
        raise ValueError(
            "--project-backward cannot be combined with --layerwise, which steps each weight from its full "
            "gradient inside backward; drop one of them"
        )
    import gradproj

    try:
        return gradproj.project_backward(model, optimizer, distributed=distributed)  # type: ignore[arg-type]
    except (ValueError, TypeError) as err:
        text = str(err).removeprefix("project_backward: ")
        raise ValueError(f"--project-backward cannot be used with {choice.name} here: {text}") from None


def build_optimizer(
    model: nn.Module, choice: OptimizerChoice, hidden: int, seed: int = 0, accumulation_steps: int = 1
) -> torch.optim.Optimizer:
    """Build the optimizer ``choice`` describes for ``model``; raises ValueError naming the bad option.

    ``accumulation_steps``: backward passes per optimizer step; with ``choice.layerwise`` the per-layer
    hooks accumulate that many gradients before stepping each weight (``--grad-accum``).
    """
    spec = get_spec(choice.name, choice.group_options.get("inner"))
    cls = spec.resolve()
    if cls is None:
        raise ValueError(f"optimizer {choice.name!r}: {spec.target.replace(':', '.')} cannot be imported here")
    kwargs: dict[str, Any] = {
        **spec.kwargs,
        "lr": choice.learning_rate(),
        "weight_decay": choice.weight_decay,
        **choice.optimizer_options,
    }
    if choice.layerwise:
        kwargs["layerwise"] = True
        if accumulation_steps > 1:
            kwargs.setdefault("accumulation_steps", accumulation_steps)
    trainable_only = True
    if choice.keep_inactive_state is not False and choice.sampler is None:
        raise ValueError(
            f"keep_inactive_state = {choice.keep_inactive_state!r} keeps the optimizer state of the blocks a layer "
            "sampler deactivates, and no sampler is set; add --sampler uniform (or owl), or drop "
            "--keep-inactive-state"
        )
    if choice.sampler is not None:
        kwargs["sampler"] = _build_sampler(model, choice, seed)
        trainable_only = False
    if spec.projected:
        if choice.projector is not None and choice.projector not in available_projectors():
            raise ValueError(f"unknown projector {choice.projector!r}; available: {', '.join(available_projectors())}")
        import gradproj

        extra = {**spec.group, **choice.group_options}
        if choice.projector is not None:
            extra["projector"] = choice.projector
        params: Any = gradproj.param_groups(
            model,
            target_modules=choice.target_modules,
            rank=choice.rank if choice.rank is not None else spec.rank or max(1, hidden // 4),
            update_proj_gap=choice.update_proj_gap,
            scale=choice.scale if choice.scale is not None else spec.scale,
            proj_type=choice.proj_type,
            trainable_only=trainable_only,
            **extra,
        )
        if choice.embed_lr is not None:
            for group in params:
                if "rank" not in group:
                    group["lr"] = choice.embed_lr
    elif choice.embed_lr is not None:  # the same split as the projected methods': target matrices / the rest
        params = _split_groups(model, choice, trainable_only)
    else:
        params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    if not spec.projected:
        flags = (("--projector", choice.projector), ("--rank", choice.rank), ("--scale", choice.scale))
        ignored = [k for k, v in flags if v is not None]
        if choice.group_options:
            ignored.append("--group-option")
        if ignored:
            log.warning("gradproj: %s does not project gradients; ignoring %s", choice.name, ", ".join(ignored))
    try:
        return cls(params, **kwargs)
    except TypeError as err:
        raise ValueError(f"optimizer {choice.name!r} rejected its options {sorted(kwargs)}: {err}") from None


def _split_groups(model: nn.Module, choice: OptimizerChoice, trainable_only: bool) -> list[dict[str, Any]]:
    """Plain groups for an optimizer that projects nothing: the target matrices at its lr, the rest at
    ``choice.embed_lr`` (the split gradproj.param_groups makes, without its log line about projecting)."""
    import gradproj

    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        groups = gradproj.param_groups(  # rank 1: the split only, so no matrix counts as covered by the rank
            model, target_modules=choice.target_modules, rank=1, trainable_only=trainable_only
        )
    finally:
        log.setLevel(level)
    return [{"params": g["params"], **({} if "rank" in g else {"lr": choice.embed_lr})} for g in groups]


def _build_sampler(model: nn.Module, choice: OptimizerChoice, seed: int):
    from ..sampling import LayerSampler as sampler_cls

    if choice.sampler not in ("uniform", "owl"):
        raise ValueError(f"sampler = {choice.sampler!r}; use 'uniform' (LISA) or 'owl' (OwLore)")
    blocks: Any = model.model.layers  # type: ignore[union-attr]  # a LLaMA's decoder layers (nn.Module.__getattr__)
    try:
        if choice.sampler == "owl" and isinstance(model, StandInModel):  # no weights to measure outliers of
            raise ValueError("a freshly initialised model has no outlier weights")
        return sampler_cls(
            blocks,
            choice.active_layers,
            choice.sample_interval,
            probs=choice.sampler,
            seed=seed,
            keep_inactive_state=choice.keep_inactive_state,
        )
    except ValueError as err:
        if choice.sampler != "owl":
            raise
        raise ValueError(
            "--sampler owl draws blocks by their share of outlier weights, and the freshly initialised model "
            f"gradproj train builds has none ({err}). OwLore is for fine-tuning a pretrained model: use it from "
            "Python (docs/owlore.md), or --sampler uniform here"
        ) from None
