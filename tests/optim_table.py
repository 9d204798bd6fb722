"""The table of optimizers the generic tests run over, with the step modes each supports (like torch's
OptimizerInfo). A new optimizer joins every generic test, in every mode it supports, by one line.

Each row names a registered optimizer (:mod:`gradproj.registry`) and the options of one variant; the class
comes from the registry, and test_registry.py checks that every registered gradproj optimizer has a row.

A *mode* is a way of running the same step (:data:`MODES`): the per-parameter loop, the batched ``foreach``
step, the compiled tail, per-layer stepping in gradient hooks, and the Triton kernels. Which modes a row
supports is not listed by hand: :attr:`OptSpec.modes` derives it from what the library's axes declare
(``InnerRule.batched``, ``Residual.batched``, ``Projector.dense_basis`` / ``refreshes``,
``compiled.COMPILABLE_INNER``), so a new inner rule, residual or projector is placed by its own declarations;
tests/test_modes.py checks the derivation against what the optimizer actually does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import gradproj
from gradproj import kernels, registry
from gradproj.inner import INNER_RULES, InnerRule
from gradproj.optimizers import compiled
from gradproj.optimizers.engine import OPTIMIZER_OPTIONS
from gradproj.projectors import get_projector
from gradproj.residual import get_residual

#: dynamo's graph capture without a C++ compiler: graphs, guards and recompiles are what inductor would see,
#: in a fraction of the time (tests/test_compile.py)
AOT_EAGER = {"backend": "aot_eager"}


@dataclass(frozen=True)
class Mode:
    """One way of running the step: the constructor options that select it and what it promises."""

    name: str
    kwargs: dict[str, Any]  # constructor options; every mode names `foreach` so only it batches
    #: documented bit-identical to the per_param mode on the CPU (docs/memory_modes.md, docs/kernels.md);
    #: False: the same arithmetic rounded differently (compared to a tolerance in tests/test_modes.py)
    exact: bool
    doc: str = ""

    def group_options(self) -> dict[str, Any]:
        """The options that are param-group keys (a loaded checkpoint's groups carry their own values of them)."""
        keys = {o.name for o in OPTIMIZER_OPTIONS}
        return {k: v for k, v in self.kwargs.items() if k in keys}


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("per_param", {"foreach": False}, True, "the reference: one parameter at a time"),
    Mode("foreach", {"foreach": True}, True,
         "regular GaLore steps batched with torch._foreach_* (on the CPU one GEMM per matrix: the same ops)"),
    Mode("compile", {"foreach": False, "compile": AOT_EAGER}, False,
         "the tail of the step as one torch.compile graph (aot_eager)"),
    Mode("layerwise", {"foreach": False, "layerwise": True}, True,
         "each parameter stepped in its post-accumulate-grad hook (accumulation_steps=1)"),
    Mode("triton", {"foreach": False, "impl": "triton"}, False,
         "the fused Triton kernels (on the CPU under TRITON_INTERPRET=1)"),
)}


def triton_unavailable() -> str | None:
    """Why the Triton mode cannot run on the CPU tensors of the tests (None when it can)."""
    error = kernels.triton_import_error()
    if error is not None:
        return error
    if not kernels.interpreter_requested():
        return "the kernels run on CPU tensors only under TRITON_INTERPRET=1 (tests/conftest.py sets it)"
    return None


@dataclass
class OptSpec:
    id: str
    optimizer: str  # a name of gradproj.registry.OPTIMIZERS
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor kwargs
    group: dict[str, Any] = field(default_factory=dict)  # keys of the projected group
    sampler: Callable[[torch.nn.Module], Any] | None = None  # builds a LayerSampler for the model

    @property
    def cls(self) -> Callable[..., torch.optim.Optimizer]:
        cls = registry.get_optimizer(self.optimizer).resolve()
        if cls is None:
            raise ImportError(f"optimizer {self.optimizer!r} cannot be imported here")
        return cls

    def make(self, model, lr=1e-2, **extra):
        if self.sampler is not None:
            extra = {"sampler": self.sampler(model), **extra}
        groups = gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5, trainable_only=self.sampler is None,
                                       **self.group)
        return self.cls(groups, lr=lr, **{**self.kwargs, **extra})

    # ------------------------------------------------------------------------- what the row declares
    def option(self, key: str, default: Any = None) -> Any:
        """The projected group's value of ``key`` as this row sets it (group keys over constructor kwargs)."""
        return self.group.get(key, self.kwargs.get(key, default))

    @property
    def inner(self) -> type[InnerRule]:
        name = self.option("inner")
        return self.cls.inner_rule if name is None else INNER_RULES[name]

    @property
    def residual(self) -> str:
        return self.option("residual", self.cls.default_residual)

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this row runs in, from the declarations of its axes (see the module doc)."""
        modes = ["per_param"]
        if self.batched():
            modes.append("foreach")
        if self.inner.name in compiled.COMPILABLE_INNER and not self.option("stochastic_rounding"):
            modes.append("compile")
        modes.append("layerwise")  # every gradproj optimizer steps in gradient hooks
        modes.append("triton")  # every operation of the step has a Triton provider (kernels.KernelOps)
        return tuple(modes)

    def batched(self) -> bool:
        """Whether the projected group's regular steps take the batched ``foreach`` step: the conditions of
        gradproj/optimizers/multi_tensor.py, read from the axes' declarations and the row's options."""
        projector = get_projector(self.option("projector", "svd"))
        return (
            self.inner.batched
            and get_residual(self.residual).batched
            and projector.refreshes
            and projector.dense_basis
            and self.option("proj_type", "std") != "full"
            and self.option("norm_growth_limit") is None
            and self.option("max_grad_norm") is None
            and not self.option("stochastic_rounding")
            and not self.option("compile")
        )


OPTIMIZERS = [
    OptSpec("galore_adamw", "galore_adamw"),
    OptSpec("galore_adamw_full", "galore_adamw", group={"proj_type": "full"}),
    OptSpec("galore_adamw_wd", "galore_adamw", kwargs={"weight_decay": 0.1}),
    OptSpec("galore_adamw_foreach", "galore_adamw", kwargs={"weight_decay": 0.1, "foreach": True}),
    OptSpec("fira_adamw", "fira_adamw"),
    # seed 0 draws fc1, emb, fc1 at steps 0, 3, 6: the 7-step resume test crosses a free and a fresh return
    OptSpec("galore_adamw_sampler", "galore_adamw", sampler=lambda m: gradproj.LayerSampler(
        [m.emb, m.fc1], n_active=1, interval=3, probs=[1.0, 3.0])),
    OptSpec("frugal_adamw", "frugal_adamw"),
    OptSpec("galore_adamw_limited", "galore_adamw", kwargs={"norm_growth_limit": 1.01}),
    OptSpec("galore_rsvd", "galore_adamw", group={"projector": "randomized_svd"}),
    OptSpec("galore_eigh", "galore_adamw", group={"projector": "eigh"}),
    OptSpec("galore_dct", "galore_adamw", group={"projector": "dct"}),
    OptSpec("galore_random_project", "galore_adamw", group={"projector": "random", "moments_on_refresh": "project"}),
    OptSpec("galore_golore", "galore_adamw",  # switches to random bases at step 9: after the checkpoint at 7
            group={"projector": "golore", "golore_switch_step": 9, "random_kind": "orthonormal"}),
    OptSpec("fira_dct_project", "fira_adamw", group={"projector": "dct", "moments_on_refresh": "project"}),
    OptSpec("galore_adamw8bit", "galore_adamw8bit", kwargs={"min_8bit_size": 200}),  # emb/head 8-bit, fc fp32
    OptSpec("galore_adafactor", "galore_adafactor", kwargs={"relative_step": False}),
    OptSpec("apollo_adamw", "apollo_adamw"),
    OptSpec("apollo_adamw_svd", "apollo_adamw", group={"proj": "svd"}),
    OptSpec("apollo_mini", "apollo_mini", group={"scale_type": "tensor"}),
]


def ids(specs=OPTIMIZERS):
    return [s.id for s in specs]


def mode_cases(specs=OPTIMIZERS, modes=tuple(MODES)):
    """(spec, mode name) for every row and every mode of ``modes`` it supports."""
    return [(spec, mode) for spec in specs for mode in spec.modes if mode in modes]
