"""Adding a projector and an inner rule: one class and one registration line each (docs/architecture.md).

The two classes below are the worked example of the docs; they run through every part of the engine that
a built-in axis does: the schema (defaults written into the group, checks, unknown keys), the state check of
``load_state_dict``, the memory accounting, checkpoints that resume bit for bit.
"""

from __future__ import annotations

import io

import pytest
import torch

import gradproj
from gradproj.inner import INNER_RULES, InnerRule, register_inner_rule
from gradproj.options import Option, number
from gradproj.projectors import PROJECTORS, Projector, register_projector
from gradproj.state_layout import Spec
from problems import TinyNet, train


# ---------------------------------------------------------------- the example projector (14 lines + 1)
class PowerProjector(Projector):
    """The top subspace by ``power_iters`` steps of subspace iteration from a fixed random start."""

    name = "power_example"
    orthonormal = True
    options = (Option("power_iters", 2, "subspace iterations", number(integer=True, minimum=1)),)

    def compute_basis(self, G, state, step):
        A = G.float() if self.side == "right" else G.float().t()  # basis of A's rows: r x n
        Q = torch.randn(A.shape[1], self.rank, generator=torch.Generator().manual_seed(step), dtype=A.dtype)
        for _ in range(self.group["power_iters"]):
            Q, _ = torch.linalg.qr(A.t() @ (A @ Q))
        P = Q.t().contiguous() if self.side == "right" else Q.contiguous()
        return {"proj": P.to(G.dtype)}


# ---------------------------------------------------------------- the example inner rule (15 lines + 1)
class Momentum(InnerRule):
    """Heavy-ball momentum in the subspace: m ← μ·m + R; U = m; step size lr."""

    name = "momentum_example"
    options = (Option("momentum", 0.9, "decay of the momentum buffer", number(minimum=0.0, maximum=1.0)),)
    state_keys = ("exp_avg",)
    state_transforms = {"exp_avg": "linear"}

    def state_layout(self, shape, group):
        return {"exp_avg": Spec(tuple(shape))}

    def update(self, R, state, group, ctx):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(R.shape, dtype=ctx.state_dtype, device=R.device)
        state["exp_avg"].mul_(group["momentum"]).add_(R.to(ctx.state_dtype))
        return state["exp_avg"], group["lr"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_projector(PowerProjector)
    register_inner_rule(Momentum)
    yield
    PROJECTORS.pop(PowerProjector.name)
    INNER_RULES.pop(Momentum.name)


def make(model, **group):
    groups = gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=1.0, projector="power_example")
    for g in groups:
        g.update(group)
    return gradproj.GaLoreAdamW(groups, lr=1e-2)


def test_the_new_axes_train_and_take_their_options_from_the_schema():
    model = TinyNet()
    opt = make(model, inner="momentum_example")
    losses = train(model, opt, 30)
    assert losses[-1] < 0.7 * losses[0]
    projected = opt.param_groups[-1]
    assert projected["power_iters"] == 2 and projected["momentum"] == 0.9  # defaults written into the group
    assert "betas" not in projected  # the preset's (Adam's) options are not the group's
    with pytest.raises(ValueError, match="power_iters = 0"):
        make(TinyNet(), power_iters=0)
    with pytest.raises(TypeError, match="did you mean 'momentum'"):
        make(TinyNet(), inner="momentum_example", momentun=0.5)
    sizes = gradproj.optimizer_state_bytes(opt)
    assert sizes["basis"] > 0 and sizes["moments"] > 0


def test_the_new_axes_checkpoint_resume_and_are_checked_on_load():
    model = TinyNet()
    opt = make(model, inner="momentum_example")
    train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 3, seed=4)
    ck = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    model2 = TinyNet()
    model2.load_state_dict(ck["model"])
    opt2 = make(model2, inner="momentum_example")
    opt2.load_state_dict(ck["opt"])
    train(model2, opt2, 3, seed=4)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    bad = ck["opt"]
    key = next(k for k, s in bad["state"].items() if "proj" in s)
    bad["state"][key]["exp_avg"] = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="'exp_avg' has shape"):
        make(TinyNet(), inner="momentum_example").load_state_dict(bad)
