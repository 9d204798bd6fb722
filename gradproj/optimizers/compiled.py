"""``compile=True``: the per-step math of a parameter as one ``torch.compile`` graph.

What is compiled is the steady-state tail of :meth:`ProjectedOptimizer._update`, from the low-rank
gradient R to the weight update::

    ψ = adam_update(R, m, v)                       # moments updated in place
    ψ, S = residual.compute(G, R, ψ, ...)          # Fira's scaling and limiter, FRUGAL's sign, or nothing
    ψ, S = limit_update_growth(ψ, S, ...)           # the group's norm_growth_limit, if any
    W += projector.up(-step_size · scale · ψ) + (-residual_step) · S
    W += (-decay_lr · weight_decay) · W

with ``fullgraph=True``: no graph break can hide in it. What stays eager, by design: the basis refresh
(an SVD or eigendecomposition, with host-side checks for NaN and fall-backs), the projection
``R = down(G)`` (one GEMM, and for sharded left projections a collective), and a parameter's first step
after its state was created or reset (it allocates the moments).

The scalars that change from step to step (the bias-corrected step size, the learning rate of the
weight decay) enter the graph as 0-dim tensors, so neither the step count nor an LR scheduler causes a
recompile.

**Compile regions.** Dynamo keeps compiled graphs, and counts recompiles against its ``recompile_limit``
(8 by default), per code object. Each optimizer therefore compiles its own copy of the tail for each
*layout*: param group, 1-D or matrix, projector class and side, residual rule, dtype and device. Within a
layout only the sizes differ, so dynamo's automatic dynamic shapes compile one graph for the first shape
and one shape-generic graph at the second, whatever the number of distinct widths; optimizers never
share (or exhaust) each other's graphs. The weight enters the graph as a plain tensor (``p.detach()``):
dynamo keeps ``nn.Parameter`` inputs static (``force_parameter_static_shapes``), which pinned every width
and compiled one graph per shape until the limit was hit.

**Falling back to eager.** When compilation cannot serve a parameter (the recompile limit, a backend or
inductor error, anything dynamo raises), the step warns once per cause (:class:`CompileFallbackWarning`)
and the eager lines of ``_update`` run for that parameter; the same layout (for the recompile limit: the
same shapes) runs eagerly from then on. Nothing is half-applied:

* dynamo traces and compiles the whole frame before any of it runs (``fullgraph=True``: the frame is the
  graph), so a compile error — including the recompile limit, checked before tracing — leaves weights and
  state untouched; the test suite checks this with a backend that fails (``tests/test_compile.py``);
* a freshly compiled graph may still compile at its first run, after some kernels wrote (Triton
  autotuning, CUDA-graph recording, lazily built kernels). So the first call with tensors of a new
  signature (shapes, strides, dtypes) runs on copies of the weight and the state, committed with
  ``copy_`` only when it succeeded: one extra copy of the parameter, once per signature;
* a call that reuses a graph that already ran and fails with an error of the compiler (a recompile after
  a guard failure) is checked: the version counters of the weight and the state tensors must be
  unchanged, else the error is raised as it is, as is any other error of a graph that already ran (the
  eager step would fail the same way).
"""

from __future__ import annotations

import functools
import os
import sys
import types
import warnings
import weakref
from typing import Any

import torch

from ..inner.base import StepContext
from ..residual import limit_update_growth

#: inner rules whose moment update the compiled tail knows
COMPILABLE_INNER = ("adam",)


class CompileFallbackWarning(UserWarning):
    """``compile=True`` could not serve a parameter; it runs eagerly (same update, unfused)."""


def validate(option: Any, inner_name: str, where: str) -> None:
    """Check a group's ``compile`` option: ``False``, ``True`` or a dict of ``torch.compile`` keyword arguments."""
    if option is False or option is None:
        return
    if not (option is True or (isinstance(option, dict) and all(isinstance(k, str) for k in option))):
        raise ValueError(f"{where}: compile = {option!r}; use True, False or a dict of torch.compile arguments")
    if isinstance(option, dict) and option.get("fullgraph") is False:
        raise ValueError(f"{where}: compile={{'fullgraph': False}} is not supported: the step is compiled whole")
    if isinstance(option, dict):
        unknown = sorted(set(option) - _compile_arguments())
        if unknown:
            raise ValueError(
                f"{where}: compile={option!r}: torch.compile {torch.__version__} takes no argument "
                f"{', '.join(map(repr, unknown))}"
            )
    if inner_name not in COMPILABLE_INNER:
        raise ValueError(
            f"{where}: compile=True supports the inner rule(s) {', '.join(COMPILABLE_INNER)}; this optimizer's inner "
            f"rule is {inner_name!r}. Drop compile=True for it (or compile your own training step)."
        )


@functools.lru_cache(maxsize=1)
def _compile_arguments() -> frozenset[str]:
    import inspect

    params = inspect.signature(torch.compile).parameters
    return frozenset(name for name, p in params.items() if p.kind == p.KEYWORD_ONLY)


def _tail(
    W, G, R, state, step_size, residual_step, decay, projector, residual, group, ctx, beta1, beta2, eps, weight_decay
):
    U = ctx.ops.adam_update(R, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, eps)
    U, S = residual.compute(G, R, U, projector, state, group, ctx)
    U, S = limit_update_growth(U, S, projector, state, group, ctx)
    ctx.ops.apply_update(
        W,
        projector,
        state,
        U,
        S,
        step_size,
        ctx.scale,
        lr=decay,
        weight_decay=weight_decay,
        residual_step=residual_step,
    )


def _compile(options: dict) -> Any:
    """A ``torch.compile`` of a fresh copy of :func:`_tail`: its own code object, hence its own graphs and
    recompile count in dynamo."""
    code = _tail.__code__.replace()  # equal, but a distinct object (dynamo's caches hang off the object)
    fn = types.FunctionType(code, _tail.__globals__, _tail.__name__, _tail.__defaults__, _tail.__closure__)
    return torch.compile(fn, **{"fullgraph": True, **options})


@functools.lru_cache(maxsize=64)
def _scalar(value: float, device: torch.device, role: str) -> torch.Tensor:
    """A 0-dim float32 tensor holding ``value`` (shared by every parameter that steps with it). ``role`` keeps
    the arguments of one call distinct objects: dynamo guards on which inputs alias each other, so a step size
    that happened to equal the decay lr would otherwise recompile."""
    return torch.tensor(value, dtype=torch.float32, device=device)


class _Region:
    """One compiled copy of the tail (one optimizer, one layout) and what is known about its signatures."""

    __slots__ = ("broken", "eager", "fn", "ran")

    def __init__(self, fn: Any):
        self.fn = fn
        self.ran: set = set()  # signatures whose graph has run to completion
        self.eager: set = set()  # signatures that hit the recompile limit: they run eagerly
        self.broken = False  # compiling failed otherwise: the whole layout runs eagerly


class _Book:
    """The compile regions of one optimizer, and the causes it has warned about."""

    def __init__(self):
        self.regions: dict[tuple, _Region] = {}
        self.warned: set[str] = set()


#: an optimizer's engine -> its _Book (weak: the graphs go with the optimizer)
_BOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _book(engine: Any) -> _Book:
    book = _BOOKS.get(engine)
    if book is None:
        book = _BOOKS[engine] = _Book()
    return book


def _signature(W: torch.Tensor, G: torch.Tensor, R: torch.Tensor, state: dict) -> tuple:
    return tuple((t.shape, t.stride(), t.dtype) for t in (W, G, R)) + tuple(
        (k, v.shape, v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)
    )


def _versions(W: torch.Tensor, state: dict) -> tuple[int, ...]:
    return (W._version, *(v._version for v in state.values() if isinstance(v, torch.Tensor)))


#: where dynamo decides to (re)compile a frame; an error raised below it comes from compiling
_CONVERT_FRAME = os.path.join("_dynamo", "convert_frame.py")


def _is_compile_error(err: BaseException) -> bool:
    """Whether ``err`` comes from dynamo / inductor compiling (rather than from running a compiled graph)."""
    if (type(err).__module__ or "").startswith(("torch._dynamo", "torch._inductor")):
        return True
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(_CONVERT_FRAME):
            return True
        tb = tb.tb_next
    return False


def _is_recompile_limit(err: BaseException) -> bool:
    text = str(err) + str(err.__cause__ or "")
    return type(err).__name__ == "FailOnRecompileLimitHit" or "recompile limit" in text or "cache_size_limit" in text


def _first_line(err: BaseException) -> str:
    line = next((s for s in str(err).splitlines() if s.strip()), "")
    return f"{type(err).__name__}: {line.strip()[:300]}" if line else type(err).__name__


class CompiledTail:
    """Runs the compiled tail for one parameter, once its state exists."""

    def __init__(self, option: Any):
        self.options = dict(option) if isinstance(option, dict) else {}
        self.options_key = repr(sorted(self.options.items()))

    def run(
        self,
        engine: Any,
        p: torch.Tensor,
        G: torch.Tensor,
        R: torch.Tensor,
        state: dict,
        group: dict,
        plan: Any,
        ctx: StepContext,
    ) -> bool:
        """Apply the step (moments, residual, weight update, decay) and return True; return False, having
        changed nothing, on a step that must create state (the first, or the first after a reset) and when
        compilation cannot serve this parameter — the eager lines of ``_update`` then run."""
        inner = plan.inner
        if any(key not in state for key in inner.state_keys):
            return False
        from .engine import matrix_view

        book = _book(engine)
        region = self._region(book, engine, p, state, group, plan)
        if region.broken:
            return False
        s = float(inner.step_size(group, state, ctx))
        step_size = _scalar(s, R.device, "step")
        residual_step = _scalar(float(plan.residual.step_size(group, s)), R.device, "residual")
        decay = _scalar(float(inner.decay_lr(group, state)), R.device, "decay")
        beta1, beta2 = group["betas"]
        rest = (
            step_size,
            residual_step,
            decay,
            plan.projector,
            plan.residual,
            group,
            ctx,
            float(beta1),
            float(beta2),
            float(group["eps"]),
            float(group["weight_decay"]),
        )
        # the weight as a plain tensor: dynamo would keep a Parameter's (or its view's) sizes static
        with matrix_view(p.detach(), plan.shape2d) as W:
            sig = _signature(W, G, R, state)
            if sig in region.eager:
                return False
            if sig in region.ran:
                before = _versions(W, state)
                try:
                    region.fn(W, G, R, state, *rest)
                except Exception as err:
                    if not _is_compile_error(err):
                        raise  # a graph that ran before failed while running: as the eager step would
                    if _versions(W, state) != before:
                        raise RuntimeError(
                            "gradproj: the compiled step failed after it had started updating a parameter of "
                            f"shape {tuple(p.shape)}, so it cannot fall back to eager; the parameter and its state "
                            "are partly updated. Pass compile=False."
                        ) from err
                    self._fall_back(book, region, sig, err, p)
                    return False
                return True
            # A new signature: this call may compile, and a new graph may compile more on its first run after
            # it started writing. Run it on copies; commit only what a complete run produced.
            W_try = W.clone()
            state_try = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            try:
                region.fn(W_try, G, R, state_try, *rest)
            except Exception as err:
                self._fall_back(book, region, sig, err, p)
                return False
            W.copy_(W_try)
            for key in [k for k in state if k not in state_try]:
                del state[key]
            for key, value in state_try.items():
                old = state.get(key)
                if (
                    isinstance(old, torch.Tensor)
                    and isinstance(value, torch.Tensor)
                    and old.shape == value.shape
                    and old.dtype == value.dtype
                ):
                    old.copy_(value)  # keep the state's own tensors (a sharded step maps them back by identity)
                else:
                    state[key] = value
            region.ran.add(sig)
        return True

    def _region(self, book: _Book, engine: Any, p: torch.Tensor, state: dict, group: dict, plan: Any) -> _Region:
        group_index = next((i for i, g in enumerate(engine.optimizer.param_groups) if g is group), -1)
        moment = state.get("exp_avg")
        key = (
            self.options_key,
            group_index,
            plan.shape2d is None and p.dim(),
            type(plan.projector),
            getattr(plan.projector, "side", None),
            type(plan.residual),
            p.dtype,
            p.device.type,
            None if moment is None else moment.dtype,
        )
        region = book.regions.get(key)
        if region is None:
            try:
                fn = _compile(self.options)
            except Exception as err:  # e.g. an unknown backend name: no region, the layout runs eagerly
                region = book.regions[key] = _Region(None)
                self._fall_back(book, region, (), err, p)
                return region
            region = book.regions[key] = _Region(fn)
        return region

    @staticmethod
    def _fall_back(book: _Book, region: _Region, sig: tuple, err: BaseException, p: torch.Tensor) -> None:
        limit = _is_recompile_limit(err)
        if limit:
            region.eager.add(sig)
        else:
            region.broken = True
        cause = "recompile limit" if limit else type(err).__qualname__
        if cause in book.warned:
            return
        book.warned.add(cause)
        shape = tuple(p.shape)
        if limit:
            msg = (
                f"gradproj: compile=True falls back to eager for a parameter of shape {shape}: torch._dynamo reached "
                f"its recompile limit for this optimizer's compiled step ({_first_line(err)}). Parameters with "
                "these shapes train eagerly from now on (the same update, unfused). To compile them, leave "
                "compile's 'dynamic' unset or pass compile={'dynamic': True}, or raise the limit "
                "(torch._dynamo.config.recompile_limit, or compile={'recompile_limit': N} where torch.compile "
                "takes it)."
            )
        else:
            msg = (
                f"gradproj: compile=True falls back to eager for a parameter of shape {shape}: torch.compile failed "
                f"({_first_line(err)}). Parameters laid out like it (same param group, projection side and dtype) "
                "train eagerly from now on (the same update, unfused); nothing was half-applied. Check the "
                "compile backend (inductor needs a working C++ compiler on CPU and Triton on CUDA; "
                "TORCH_LOGS=dynamo shows the whole error), or pass compile=False to skip compiling."
            )
        warnings.warn(msg, CompileFallbackWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside gradproj and torch (the user's ``optimizer.step()``)."""
    inside = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(torch.__file__))
    level = 2  # 1: _fall_back's caller; warnings.warn counts from _fall_back
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
