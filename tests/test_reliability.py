"""Bad input raises a clear error before anything changes; checkpoints are checked against the model on load;
a group whose rank or projector changes between steps restarts cleanly; odd tensors are handled."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import gradproj
from problems import TinyNet, tiny_batch, tiny_loss, train


def frozen(model, opt):
    """A deep copy of the weights and every optimizer-state entry (tensors cloned, scalars as they are)."""
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, state


def assert_unchanged(model, opt, before):
    weights, state = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    now = {id(p): s for p, s in opt.state.items() if s}
    assert now.keys() == {k for k, s in state.items() if s}
    for pid, entries in state.items():
        if not entries:
            continue
        assert now[pid].keys() == entries.keys()
        for k, v in entries.items():
            got = now[pid][k]
            if torch.is_tensor(v):
                assert got.dtype == v.dtype and torch.equal(got, v), k
            else:
                assert got == v, k


def galore(model, **kw):
    return gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4, update_proj_gap=2, scale=0.5), lr=1e-2, **kw)


# ------------------------------------------------------------------------------------ group options
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5, 0.0, "0.25", True, None])
@pytest.mark.parametrize("key", ["scale", "alpha"])
def test_scale_must_be_a_finite_positive_number(key, value):
    W = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=f"param group 0: {key} = "):
        gradproj.FiraAdamW([{"params": [W], "rank": 2, "update_proj_gap": 2, key: value}])


@pytest.mark.parametrize("value", [float("nan"), -0.5, "0.25"])
def test_scale_set_between_steps_raises_before_any_change(value):
    model = TinyNet()
    opt = galore(model)
    train(model, opt, 1)
    opt.param_groups[-1]["scale"] = value
    opt.zero_grad()
    tiny_loss(model, tiny_batch(1)).backward()
    before = frozen(model, opt)
    with pytest.raises(ValueError, match="scale"):
        opt.step()
    assert_unchanged(model, opt, before)


@pytest.mark.parametrize("key,suggestion", [
    ("projecter", "projector"), ("proj_typ", "proj_type"), ("moment_on_refresh", "moments_on_refresh"),
    ("weight_decays", "weight_decay"), ("max_grad_nrom", "max_grad_norm"), ("rsvd_oversampel", "rsvd_oversample"),
])
def test_misspelled_group_keys_are_refused_with_a_suggestion(key, suggestion):
    W = nn.Parameter(torch.randn(8, 8))
    group = {"params": [W], "rank": 2, "update_proj_gap": 2, "scale": 1.0, key: "dct"}
    with pytest.raises(TypeError, match=f"param group 0: unexpected param-group key '{key}' \\(did you mean '{suggestion}'"):
        gradproj.GaLoreAdamW([group])
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": 2, "scale": 1.0}])
    with pytest.raises(TypeError, match=f"did you mean '{suggestion}'"):  # as a constructor option
        gradproj.GaLoreAdamW([W], **{key: "dct"})
    with pytest.raises(TypeError, match=f"did you mean '{suggestion}'"):  # through add_param_group
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], key: 1})
    assert len(opt.param_groups) == 1
    opt.param_groups[0][key] = "dct"  # written into a group between steps
    W.grad = torch.randn(8, 8)
    with pytest.raises(TypeError, match=f"did you mean '{suggestion}'"):
        opt.step()
    assert not opt.state[W]


def test_keys_the_torch_stack_writes_are_accepted():
    model = TinyNet()
    opt = galore(model)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)  # initial_lr, max_lr, ...
    train(model, opt, 3, scheduler=sched)
    custom = gradproj.GaLoreAdamW([{"params": [nn.Parameter(torch.randn(4, 4))], "tag": "mine"}],
                                  extra_group_keys=["tag"])
    assert custom.param_groups[0]["tag"] == "mine"


# ------------------------------------------------------------------------------------ checkpoints
def trained(cls=gradproj.GaLoreAdamW, steps=3, model=None, **group):
    model = model or TinyNet()
    opt = cls(gradproj.param_groups(model, rank=4, update_proj_gap=2, scale=0.5, **group), lr=1e-2)
    train(model, opt, steps)
    return model, opt


def fresh_and_state(sd_edit, cls=gradproj.GaLoreAdamW, **group):
    model, opt = trained(cls, **group)
    sd = opt.state_dict()
    sd_edit(sd, model)
    buf = io.BytesIO()
    torch.save(sd, buf)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    target_model, target = trained(cls, steps=1, **group)
    return target_model, target, sd


def _projected_index(sd):
    return next(i for i, s in sd["state"].items() if "proj" in s or "proj_idx" in s)


@pytest.mark.parametrize("edit,message", [
    (lambda sd, m: sd["state"][_projected_index(sd)].pop("exp_avg_sq"), "'exp_avg' without 'exp_avg_sq'"),
    (lambda sd, m: sd["state"][_projected_index(sd)].update(proj=torch.zeros(3, 3)), "'proj' has shape"),
    (lambda sd, m: sd["state"][_projected_index(sd)].update(exp_avg=torch.zeros(2, 2)), "'exp_avg' has shape"),
    (lambda sd, m: sd["state"][_projected_index(sd)].update(bogus=1), "holds 'bogus'"),
    (lambda sd, m: sd["state"][_projected_index(sd)].pop("proj"), "no basis"),
    (lambda sd, m: sd["param_groups"].reverse(), "param group"),  # groups permuted to other shapes
])
def test_bad_checkpoints_are_refused_before_anything_loads(edit, message):
    model, opt, sd = fresh_and_state(edit)
    before = frozen(model, opt)
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert_unchanged(model, opt, before)
    assert [dict(g) for g in opt.param_groups] == groups


def test_dct_indices_out_of_range_are_refused():
    def edit(sd, model):
        sd["state"][_projected_index(sd)]["proj_idx"][0] = 10_000

    model, opt, sd = fresh_and_state(edit, projector="dct")
    with pytest.raises(ValueError, match="'proj_idx' holds indices in"):
        opt.load_state_dict(sd)


def test_state_of_a_wider_model_is_refused():
    _, wide = trained(model=TinyNet(hidden=48))
    model, opt = trained(steps=1)
    before = frozen(model, opt)
    with pytest.raises(ValueError, match="has shape"):
        opt.load_state_dict(wide.state_dict())
    assert_unchanged(model, opt, before)


def test_a_torch_adamw_state_dict_is_refused_unless_asked_for():
    model = TinyNet()
    groups = gradproj.param_groups(model, rank=4, update_proj_gap=2, scale=0.5)
    adamw = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-2)
    train(model, adamw, 1)
    opt = galore(model)
    with pytest.raises(ValueError, match="torch.optim optimizer .*strict=False"):
        opt.load_state_dict(adamw.state_dict())
    assert opt.param_groups[-1]["rank"] == 4
    with pytest.warns(UserWarning, match="train unprojected"):
        opt.load_state_dict(adamw.state_dict(), strict=False)
    assert all(g.get("rank") is None for g in opt.param_groups)
    train(model, opt, 1, seed=1)  # AdamW's moments continue as the unprojected Adam state
    assert all(isinstance(s["step"], int) and s["step"] == 2 for s in opt.state.values())


def test_a_good_checkpoint_still_resumes_bit_exactly():
    model, opt = trained(steps=3)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": sd}, buf)
    train(model, opt, 1, seed=3)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ck = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    model2 = TinyNet()
    model2.load_state_dict(ck["m"])
    opt2 = galore(model2)
    opt2.load_state_dict(ck["o"])
    train(model2, opt2, 1, seed=3)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, ref[k]), k


# ------------------------------------------------------------------------------------ changed groups
@pytest.mark.parametrize("change", [{"rank": 2}, {"proj_type": "reverse_std"}, {"projector": "dct"},
                                    {"projector": "random"}, {"rank": None}])
def test_changing_rank_or_projector_between_steps_restarts_that_state(change):
    model, opt = trained(steps=3)
    group = opt.param_groups[-1]
    for k, v in change.items():
        if v is None:
            for key in ("rank", "update_proj_gap", "scale"):
                group.pop(key)
        else:
            group[k] = v
    with pytest.warns(UserWarning, match="basis and moments restart"):
        train(model, opt, 1, seed=3)
    train(model, opt, 3, seed=4)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for p in group["params"]:
        state = opt.state[p]
        assert state["step"] == 7
        assert state["inner_start"] == 3
        plan = opt.engine.plan(p, group)
        assert gradproj.state_layout.state_problem(state, opt.engine.state_layout(p, group, plan)) is None
    # the same change made by hand: a fresh optimizer state at step 3 gives the same weights
    ref_model, ref = trained(steps=3)
    ref_group = ref.param_groups[-1]
    for k, v in change.items():
        if v is None:
            for key in ("rank", "update_proj_gap", "scale"):
                ref_group.pop(key)
        else:
            ref_group[k] = v
    for p in ref_group["params"]:
        kept = ref.state[p]["step"]
        ref.state[p].clear()
        ref.state[p].update(step=kept, inner_start=kept)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(ref_model, ref, 4, seed=3)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ odd tensors
def test_zero_size_parameters_in_a_rank_group_are_stepped_as_nothing():
    empty = nn.Parameter(torch.zeros(0, 8))
    W = nn.Parameter(torch.randn(8, 8))
    opt = gradproj.GaLoreAdamW([{"params": [empty, W], "rank": 2, "update_proj_gap": 2, "scale": 1.0}])
    train([empty, W], opt, 3, lambda ps, _: ps[1].square().sum() + ps[0].sum())
    assert empty.shape == (0, 8) and opt.state[W]["step"] == 3


def test_a_gradient_of_the_wrong_shape_raises_before_any_change():
    model = TinyNet()
    opt = galore(model)
    train(model, opt, 1)
    opt.zero_grad()
    tiny_loss(model, tiny_batch(1)).backward()
    bad = model.head.weight.grad
    bad.set_(torch.zeros(5, 5))
    before = frozen(model, opt)
    with pytest.raises(ValueError, match=r"parameter \d+ \(shape \(23, 16\)\): its gradient has shape \(5, 5\)"):
        opt.step()
    assert_unchanged(model, opt, before)


def test_a_first_refresh_that_fails_raises_before_any_parameter_is_stepped(monkeypatch):
    model = TinyNet()
    opt = galore(model, projector="svd")  # the failure is injected into the exact SVD
    real = torch.linalg.svd

    def failing(A, *args, **kwargs):
        if A.shape == (16, 40):  # fc2's gradient: the second projected matrix
            raise torch.linalg.LinAlgError("did not converge")
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", failing)
    opt.zero_grad()
    tiny_loss(model, tiny_batch(0)).backward()
    before = frozen(model, opt)
    with pytest.raises(ValueError, match=r"shape \(16, 40\)"):
        opt.step()
    assert_unchanged(model, opt, before)
    assert not any(opt.state.values())


def test_subpackages_are_reachable_after_import_gradproj():
    """``import gradproj`` alone gives ``gradproj.distributed``, ``.integrations`` and ``.train`` (imported on first
    use), in a fresh interpreter where no other test imported them first; a misspelled attribute still raises."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import gradproj\n"
        "assert callable(gradproj.distributed.replicated_state_mismatches)\n"
        "assert gradproj.integrations.__name__ == 'gradproj.integrations'\n"
        "assert gradproj.train.__name__ == 'gradproj.train'\n"
        "try:\n    gradproj.distributd\nexcept AttributeError as e:\n    print(e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "has no attribute 'distributd'" in out.stdout
