"""Projected backward: the gradient of a projected ``nn.Linear`` weight never exists at full rank.

``handle = gradproj.project_backward(model, optimizer)`` makes every ``nn.Linear`` whose weight the
optimizer projects compute, in its backward pass, the projection R of the weight's gradient directly from the
layer's input X (b x n) and output gradient dY (b x m), instead of G = dYᵀ X (m x n)::

    right (R = G Pᵀ, P r x n):   R = dYᵀ (X Pᵀ)        m x r
    left  (R = Pᵀ G, P m x r):   R = (dY P)ᵀ X         r x n
    full:                        R = (dY Pₗ)ᵀ (X Pᵣᵀ)  r x r

R is delivered as the ``.grad`` of a proxy parameter registered on the module
(``weight_projected_grad``, shaped like R, never read by the forward pass: one element broadcast to R's shape,
except under DDP, which needs parameters it can broadcast into, where it holds R's size): autograd sums it over
micro-batches like any gradient, ``model.zero_grad()`` clears it, and DDP all-reduces it like any other
parameter, with no hook. ``optimizer.step()`` then steps the weight from R (``Plan.low_rank_grad``: the
engine skips the projection GEMM and keeps the projector's back-projection and the inner rule).

At a step where a matrix's basis is refreshed (``Projector.needs_refresh``, the step's own rule: ``t %
update_proj_gap == 0``, the matrix's own gap with ``refresh="lazy"``, its own offset with
``refresh_stagger``; no basis yet, or state that no longer fits its group), the projector needs G: the
forward pass decides from the optimizer state — which does not change until ``step()`` — and that layer then
runs the ordinary ``F.linear``, so autograd computes exactly the gradient normal mode sees. Under DDP its proxy
gets a zero gradient then, so that DDP sees every parameter it reduces receive a gradient each step.

**What it refuses at switch-on** (``ValueError``/``TypeError``, before anything changes): an optimizer with
``layerwise=True`` (it steps from full gradients inside backward), a group whose residual needs the full
gradient (Fira, FRUGAL, APOLLO: ``residual != "none"``), ``compile=True`` (the compiled tail takes G as an
input), ``proj_dtype="bfloat16"`` / ``"float16"`` (R is formed in the parameter's dtype; ``"auto"``, the
default, is resolved to the parameter's dtype for the weights projected backward serves: their state records
that decision before each step, so the refresh steps, which take the normal path, run it too), a model
already wrapped in DDP (wrap after switching on), and DTensor parameters (FSDP2's ``fully_shard``: the
sharded step reduces the full gradient across ranks). Projected weights of other modules (embeddings,
convolutions, ``nn.Linear`` subclasses with their own ``forward``, a weight shared by several modules) stay on
the normal path.

**Clipping.** The optimizer's ``max_grad_norm`` clips R to that norm (‖R‖ ≤ ‖G‖ for an orthonormal basis,
so it never bites harder than on G), as in the layerwise mode's low-rank accumulation;
``clip_grad_norm_(model.parameters())`` sees R through the proxies. Where the clip does not bite, the
trajectory equals normal mode's up to the rounding of the reassociated products.

**DDP.** With ``torch.distributed`` initialized and more than one process, the projected weights are put on
DDP's ignore list (call this before wrapping the model), so DDP reduces the r-sized proxies instead of the
weights; at a refresh step the full gradients of the refreshed weights are averaged across ranks in an
optimizer step pre-hook. Mixed precision with ``torch.amp.GradScaler`` is not supported (the scaler does not
unscale the proxies).
"""

from __future__ import annotations

import logging
import types
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.reference import clip_by_norm
from ..projectors.base import AUTO_KEY, IdentityProjector, Projector
from ..projectors.golore import GoLoreProjector
from ..projectors.random_basis import DRAW_KEY
from ..projectors.regenerated import RegeneratedBasis
from ..residual.base import NoResidual
from ..state_layout import state_problem
from .sharding import is_dtensor

if TYPE_CHECKING:
    from .base import ProjectedOptimizer

log = logging.getLogger("gradproj")

#: the name of the proxy parameter on each handled module
PROXY = "weight_projected_grad"


class _ProjectedLinear(torch.autograd.Function):
    """``F.linear(x, W, b)`` whose backward gives dX, db and, for the proxy, R instead of dW."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, proxy, left, right):
        ctx.save_for_backward(x, weight, left, right)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy):
        x, weight, left, right = ctx.saved_tensors
        dx = dy.matmul(weight.to(dy.dtype)) if ctx.needs_input_grad[0] else None
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(dy.dtype)
        a = dy2 if left is None else dy2 @ left.to(dy.dtype)  # b x r (left) or b x m
        c = x2 if right is None else x2 @ right.to(dy.dtype).t()  # b x r (right) or b x n
        R = a.t() @ c if ctx.needs_input_grad[3] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, db, R, None, None


class _ZeroGradTo(torch.autograd.Function):
    """The identity on ``y`` that gives ``proxy`` a zero gradient (a refresh step under DDP, which expects one
    for every parameter it reduces)."""

    @staticmethod
    def forward(ctx: Any, y, proxy):
        ctx.shape, ctx.dtype = proxy.shape, proxy.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, dy):
        return dy, dy.new_zeros((), dtype=ctx.dtype).expand(ctx.shape)


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    handle: ProjectedBackward = getattr(module, "_projected_backward")  # noqa: B009  # set by the handle; typed here
    weight, proxy = module.weight, getattr(module, PROXY)
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return F.linear(x, weight, module.bias)
    bases = handle.bases(weight)
    if bases is None:  # the step needs the full gradient: ordinary autograd
        y = F.linear(x, weight, module.bias)
        return _ZeroGradTo.apply(y, proxy) if handle.distributed else y
    handle.projected.add(id(weight))
    return _ProjectedLinear.apply(x, weight.detach(), module.bias, proxy, bases.get("left"), bases.get("right"))


def _drop_proxy(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    state_dict.pop(prefix + PROXY, None)


def _proxy_not_missing(module: nn.Module, incompatible: Any) -> None:
    for key in [k for k in incompatible.missing_keys if k.endswith("." + PROXY) or k == PROXY]:
        incompatible.missing_keys.remove(key)


class ProjectedBackward:
    """The handle :func:`project_backward` returns; :meth:`remove` switches the mode off."""

    def __init__(self, model: nn.Module, optimizer: ProjectedOptimizer, distributed: bool | None = None):
        from .base import ProjectedOptimizer

        if not isinstance(optimizer, ProjectedOptimizer):
            raise TypeError(
                f"project_backward: optimizer is a {type(optimizer).__name__}; pass a gradproj optimizer "
                "(e.g. gradproj.GaLoreAdamW), whose projected groups say which weights to project"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"project_backward: model is a {type(model).__name__}; pass the nn.Module")
        _refuse_wrapped(model)
        engine = optimizer.engine
        if engine.projected_backward is not None:
            raise ValueError("project_backward: already on for this optimizer; call remove() on its handle first")
        if engine.layerwise is not None:
            raise ValueError(
                "project_backward: the optimizer has layerwise=True, which steps each weight from its full gradient "
                "inside backward; use one of the two (layerwise=False here)"
            )
        where: dict[int, tuple[int, int, dict]] = {}
        for gi, group in enumerate(optimizer.param_groups):
            engine.validate_group(group, gi)
            for pi, p in enumerate(group["params"]):
                where[id(p)] = (gi, pi, group)
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
            if is_dtensor(p):
                raise ValueError(
                    "project_backward: the model has DTensor parameters (FSDP2's fully_shard); the sharded step "
                    "reduces each weight's full gradient across ranks, so projected backward cannot run under "
                    "FSDP2: use DDP or one process"
                )
        modules: list[tuple[str, nn.Linear]] = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
                continue
            w = module.weight
            if id(w) not in where or uses.get(id(w), 0) != 1:
                continue  # not optimized here, or shared with another module (tied): the normal path
            gi, pi, group = where[id(w)]
            plan = engine.plan(w, group)
            if plan.shape2d is None or isinstance(plan.projector, IdentityProjector):
                continue  # unprojected: R would be G
            label = f"param group {gi} ({name}.weight, shape {tuple(w.shape)})"
            if not _dense_formula(plan.projector):
                raise ValueError(
                    f"project_backward: {label} uses projector={group['projector']!r}, whose down() is its own "
                    "computation rather than a product with a dense basis, so R cannot be formed from the layer's "
                    "input and output gradient; use a basis that stores or rebuilds a dense matrix (svd, eigh, "
                    "randomized_svd, golore, dct, random, sampled)"
                )
            if not isinstance(plan.residual, NoResidual):
                raise ValueError(
                    f"project_backward: {label} has residual={group['residual']!r}, which needs the weight's full "
                    "gradient at every step (Fira's scaled residual, FRUGAL's sign step, APOLLO's channel scales "
                    "all read G); projected backward only delivers R: use residual='none' (GaLore) for it"
                )
            if group["compile"]:
                raise ValueError(
                    f"project_backward: {label} has compile=True, whose compiled step takes the full gradient as "
                    "an input; set compile=False for projected backward"
                )
            if group.get("proj_dtype") not in (None, "auto"):
                raise ValueError(
                    f"project_backward: {label} has proj_dtype={group['proj_dtype']!r}, but the projected backward "
                    "forms R in the parameter's dtype; set proj_dtype=None or 'auto' (which resolves to the "
                    "parameter's dtype here) for projected backward"
                )
            modules.append((name, module))
        if not modules:
            raise ValueError(
                "project_backward: no nn.Linear weight of the model is in a projected group of the optimizer "
                "(a group with 'rank', a matrix smaller in rank than its shape): nothing would change. Build the "
                "optimizer with gradproj.param_groups(model, rank=...) first"
            )
        if distributed is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            distributed = bool(distributed) and torch.distributed.get_world_size() > 1
        # ------------------------------------------------------------------ nothing has changed up to here
        self._model, self._optimizer = model, optimizer
        self._where = {id(m.weight): where[id(m.weight)] for _, m in modules}
        self._modules = [m for _, m in modules]
        self._proxies: dict[int, nn.Parameter] = {}
        self._hooks: list = []
        self._warned: set = set()
        #: ids of the weights whose forward pass took the projected path since the last step / zero_grad
        self.projected: set[int] = set()
        for _, module in modules:
            w = module.weight
            gi, pi, group = where[id(w)]
            shape = engine.plan(w, group).projector.low_rank_shape()
            # its value is never read: one element broadcast to R's shape costs no memory; DDP broadcasts every
            # parameter into place when it wraps the model, which a broadcast tensor cannot take
            value = torch.zeros(1 if not distributed else shape, dtype=w.dtype, device=w.device)
            proxy = nn.Parameter(value.expand(shape))
            module.register_parameter(PROXY, proxy)
            self._proxies[id(w)] = proxy
            module._projected_backward = self  # type: ignore[assignment]
            module.forward = types.MethodType(_linear_forward, module)  # type: ignore[method-assign]
            self._hooks.append(module.register_state_dict_post_hook(_drop_proxy))
            self._hooks.append(module.register_load_state_dict_post_hook(_proxy_not_missing))
        self._ignored: list[str] = []
        self.distributed = distributed
        #: bytes of full gradients this handle has all-reduced (refresh steps under DDP)
        self.full_reduced_bytes = 0
        if distributed:
            self._ignored = [f"{name}.weight" for name, _ in modules]
            before = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
            self._ddp_ignore_before = before
            model._ddp_params_and_buffers_to_ignore = before + self._ignored  # type: ignore[assignment]
            self._hooks.append(optimizer.register_step_pre_hook(self._average_full_gradients))
        self._hooks.append(optimizer.register_step_pre_hook(self._auto_in_parameter_dtype))
        self._hooks.append(optimizer.register_step_post_hook(lambda *args: self.projected.clear()))
        self._zero_grad = optimizer.zero_grad
        optimizer.zero_grad = self._zero_grads  # type: ignore[method-assign]
        engine.projected_backward = self
        log.info("gradproj: projected backward on for %d nn.Linear weights", len(modules))

    # ------------------------------------------------------------------------------------------ forward
    def bases(self, weight: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The dense bases R is computed with at this step, or None when the step needs the full gradient
        (a refresh is due, no basis yet, the state no longer fits the group, the group is no longer projected
        with residual 'none')."""
        opt = self._optimizer
        group = self._locate(id(weight))[2]
        state = opt.state.get(weight)
        if not state:
            return None
        why = self._unprojectable(weight, group, state)
        if why is not None:
            if why not in ("due", "no basis") and why not in self._warned:
                self._warned.add(why)
                warnings.warn(
                    f"gradproj: projected backward computes full gradients for some weights because {why}; "
                    "they train correctly, without the memory saving",
                    stacklevel=4,
                )
            return None
        return _dense_bases(opt.engine.plan(weight, group).projector, state, weight)

    def _unprojectable(self, weight: torch.Tensor, group: dict, state: dict) -> str | None:
        """Why ``weight``'s next step needs its full gradient; None when R is all it needs."""
        engine = self._optimizer.engine
        plan = engine.plan(weight, group)
        proj = plan.projector
        if plan.shape2d is None:
            return "their group is no longer projected"
        if not isinstance(plan.residual, NoResidual):
            return f"their group's residual is {group['residual']!r}"
        if group["compile"]:
            return "their group has compile=True"
        if group.get("proj_dtype") not in (None, "auto"):  # set after switch-on: R is formed in the parameter's dtype
            return f"their group sets proj_dtype={group['proj_dtype']!r}"
        if state_problem(state, engine.state_layout(weight, group, plan)) is not None:
            return "their state no longer fits their group (it restarts)"
        if not proj.has_basis(state):
            return "no basis"
        if proj.needs_refresh(state, state.get("step", 0)):
            return "due"
        return None

    # --------------------------------------------------------------------------------------------- step
    def gather(self, engine: Any) -> list:
        """``(weight, placeholder, group, plan)`` for every weight whose gradient arrived projected, with
        ``plan.low_rank_grad`` the clipped R; raises before anything changes if one cannot be stepped from R."""
        work = []
        opt = self._optimizer
        for wid, proxy in self._proxies.items():
            R = proxy.grad
            gi, pi, group = self._locate(wid)
            w = group["params"][pi]
            if w.grad is not None and wid in self.projected:
                raise RuntimeError(
                    f"param group {gi}, parameter {pi} (shape {tuple(w.shape)}): it has a full gradient in .grad and "
                    "a projected one (project_backward) from a forward pass since the last step: was zero_grad() "
                    "skipped after a refresh step? Nothing was updated; zero the gradients and run the forward and "
                    "backward passes again"
                )
            if R is None or w.grad is not None:
                continue  # no gradient, or a full one (a refresh step: the normal path steps it)
            state = opt.state.get(w, {})
            why = self._unprojectable(w, group, state) if state else "no state"
            if why is not None:
                raise RuntimeError(
                    f"param group {gi}, parameter {pi} (shape {tuple(w.shape)}): its gradient arrived projected "
                    f"(project_backward), but this step needs the full gradient ({why}): the optimizer state or "
                    "group changed between the forward pass and step(). Nothing was updated; zero the gradients "
                    "and run the forward and backward passes again"
                )
            plan = engine.plan(w, group)
            if tuple(R.shape) != tuple(plan.projector.low_rank_shape()):
                raise RuntimeError(
                    f"param group {gi}, parameter {pi}: its projected gradient has shape {tuple(R.shape)}, expected "
                    f"{tuple(plan.projector.low_rank_shape())} (was the group's rank or proj_type changed after "
                    "project_backward? remove() the handle and switch it on again)"
                )
            plan.low_rank_grad = clip_by_norm(R, group["max_grad_norm"])
            work.append((w, torch.empty(w.shape, dtype=w.dtype, device="meta"), group, plan))
        return work

    def _auto_in_parameter_dtype(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """``proj_dtype="auto"`` is the parameter's dtype for the weights this handle serves (R is formed in it):
        the decision is written into their state before the step, so no refresh step times or picks another."""
        opt = self._optimizer
        for wid in self._proxies:
            _, pi, group = self._locate(wid)
            if group.get("proj_dtype") != "auto":
                continue
            w = group["params"][pi]
            if opt.state.get(w, {}).get(AUTO_KEY) == 0:
                continue
            plan = opt.engine.plan(w, group)
            if plan.shape2d is not None and AUTO_KEY in plan.projector.state_layout():
                opt.state[w][AUTO_KEY] = 0  # AUTO_CHOICES[0]: the parameter's dtype

    def _average_full_gradients(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """DDP does not reduce the projected weights: average the full gradients of a refresh step here."""
        import torch.distributed as dist

        world = dist.get_world_size()
        for w in self._weights():
            grad = w.grad
            if grad is not None:
                dist.all_reduce(grad)
                grad.div_(world)
                self.full_reduced_bytes += grad.numel() * grad.element_size()

    def _zero_grads(self, set_to_none: bool = True) -> None:
        self._zero_grad(set_to_none)
        self.projected.clear()
        for proxy in self._proxies.values():
            if proxy.grad is not None:
                if set_to_none:
                    proxy.grad = None
                else:
                    proxy.grad.zero_()

    # ------------------------------------------------------------------------------------------- remove
    def full_gradient_weights(self) -> list[torch.Tensor]:
        """The handled weights whose next step needs the full gradient (what the next backward computes at
        full rank)."""
        return [w for w in self._weights() if self.bases(w) is None]

    def _weights(self) -> list[torch.Tensor]:
        return [self._locate(wid)[2]["params"][self._where[wid][1]] for wid in self._proxies]

    def _locate(self, wid: int) -> tuple[int, int, dict]:
        """(group index, index in the group, the group) of a handled weight, the group read from the optimizer
        now: ``optimizer.load_state_dict`` replaces the group dicts (a resumed run's lr lives in the new ones)."""
        gi, pi, _ = self._where[wid]
        return gi, pi, self._optimizer.param_groups[gi]

    @property
    def proxies(self) -> list[nn.Parameter]:
        """The proxy parameters whose ``.grad`` is R (one per handled weight)."""
        return list(self._proxies.values())

    def remove(self) -> None:
        """Switch projected backward off: the modules compute full gradients again; R not yet stepped is
        dropped (call it between ``step()`` and the next backward)."""
        if self._optimizer.engine.projected_backward is not self:
            return
        for module in self._modules:
            del module.forward
            del module._projected_backward
            delattr(module, PROXY)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._ignored:
            self._model._ddp_params_and_buffers_to_ignore = self._ddp_ignore_before
        del self._optimizer.zero_grad
        self._optimizer.engine.projected_backward = None
        self._proxies.clear()


def _dense_formula(proj: Projector) -> bool:
    """Whether ``proj.down`` is the product with a dense basis that :func:`_dense_bases` returns."""
    if isinstance(proj, GoLoreProjector):  # one basis, then the other
        return _dense_formula(proj.before) and _dense_formula(proj.after)
    return isinstance(proj, RegeneratedBasis) or type(proj).down is Projector.down


def _dense_bases(proj: Projector, state: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dense bases ``proj.down`` multiplies a gradient like ``like`` with: ``left`` (m x r), ``right`` (r x n)."""
    if isinstance(proj, GoLoreProjector):
        return _dense_bases(proj.after if DRAW_KEY in state else proj.before, state, like)
    if isinstance(proj, RegeneratedBasis):
        left, right = proj.dense(state, like)
        return {k: v for k, v in (("left", left), ("right", right)) if v is not None}
    if proj.side == "full":
        return {
            "left": proj.basis_tensor(state, "proj_left", like.dtype),
            "right": proj.basis_tensor(state, "proj_right", like.dtype),
        }
    return {proj.side: proj.basis_tensor(state, "proj", like.dtype)}


def _refuse_wrapped(model: nn.Module) -> None:
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return
    if isinstance(model, DistributedDataParallel):
        raise ValueError(
            "project_backward: the model is already wrapped in DistributedDataParallel, which has fixed the "
            "gradients it reduces; switch projected backward on for the plain model, then wrap it"
        )


def project_backward(
    model: nn.Module, optimizer: ProjectedOptimizer, *, distributed: bool | None = None
) -> ProjectedBackward:
    """Make every projected ``nn.Linear`` weight of ``model`` deliver its projected gradient R to ``optimizer``
    instead of its full gradient (see :mod:`gradproj.optimizers.projected_backward`); returns a handle whose
    ``remove()`` undoes it.

    ``distributed``: None (default) detects a process group of more than one process and then prepares for
    DDP (call before wrapping the model); True / False force it.
    """
    return ProjectedBackward(model, optimizer, distributed)
