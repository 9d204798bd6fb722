"""Analytic state bytes and the constructor-level error messages."""

import pytest
import torch
from torch import nn

import gradproj
from problems import TinyNet, train


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_state_bytes_equal_the_analytic_count(dtype, proj_type):
    model = TinyNet(vocab=23, dim=16, hidden=40).to(dtype)
    r = 4
    opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=r, proj_type=proj_type), lr=1e-3)
    train(model, opt, 1)
    e = torch.finfo(dtype).bits // 8
    # projected: fc1.weight 40x16 (m >= n: right; basis r x 16, moments 40 x r), fc2.weight 16x40 (left; basis
    # 16 x r, moments r x 40). Full: both bases (m x r + r x n) and r x r moments.
    if proj_type == "std":
        basis = r * 16 + 16 * r
        moments = 2 * (40 * r + r * 40)
    else:
        basis = 2 * (40 * r + r * 16)
        moments = 2 * 2 * (r * r)
    # unprojected, full-rank Adam: embedding 23x16, fc1.bias 40, fc2.bias 16, norm 16 + 16, head 23x16
    full = 2 * (23 * 16 + 40 + 16 + 16 + 16 + 23 * 16)
    got = gradproj.optimizer_state_bytes(opt)
    assert got["basis"] == basis * e
    assert got["moments"] == (moments + full) * e
    assert got["total"] == (basis + moments + full) * e
    adamw = 2 * sum(p.numel() for p in model.parameters()) * e
    assert got["total"] < adamw


def test_fira_adds_one_scalar_per_matrix():
    model = TinyNet()
    galore = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4), lr=1e-3)
    train(model, galore, 1)
    model2 = TinyNet()
    fira = gradproj.FiraAdamW(gradproj.param_groups(model2, rank=4), lr=1e-3)
    train(model2, fira, 1)
    a, b = gradproj.optimizer_state_bytes(galore), gradproj.optimizer_state_bytes(fira)
    assert b["total"] - a["total"] == 2 * 4  # two projected matrices, one fp32 norm each


@pytest.mark.parametrize(
    "group,message",
    [
        ({"rank": -3, "update_proj_gap": 200, "scale": 0.25}, "rank = -3 must be a positive integer"),
        ({"rank": 2.5, "update_proj_gap": 200, "scale": 0.25}, "rank = 2.5"),
        ({"rank": 4, "scale": 0.25}, "has 'rank' but no 'update_proj_gap'"),
        ({"rank": 4, "update_proj_gap": 10}, "has 'rank' but no 'scale'"),
        ({"rank": 4, "update_proj_gap": 10, "scale": 0.25, "proj_type": "top"}, "proj_type = 'top'"),
        ({"rank": 4, "update_proj_gap": 10, "scale": 0.25, "projector": "pca"}, "unknown projector 'pca'"),
        ({"rank": 4, "update_proj_gap": 10, "scale": 0.25, "residual": "x"}, "unknown residual 'x'"),
        ({"rank": 4, "update_proj_gap": 10, "scale": 0.25, "alpha": 0.5}, "both scale=0.25 and alpha=0.5"),
        ({"update_proj_gap": 10, "scale": 0.25}, "no 'rank'"),
        ({"rank": 4, "update_proj_gap": 10, "scale": 0.25, "betas": (0.9, 1.5)}, r"betas\[1\] = 1.5"),
    ],
)
def test_bad_groups_raise_clear_errors(group, message):
    W = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=message) as info:
        gradproj.GaLoreAdamW([{"params": [W], **group}])
    assert "param group 0" in str(info.value)


def test_fira_rejects_full_projection():
    W = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="residual='fira' needs a one-sided projection"):
        gradproj.FiraAdamW([{"params": [W], "rank": 2, "update_proj_gap": 10, "alpha": 1.0, "proj_type": "full"}])


def test_bad_add_param_group_leaves_optimizer_unchanged():
    W = nn.Parameter(torch.randn(8, 8))
    opt = gradproj.GaLoreAdamW([W])
    with pytest.raises(ValueError, match="param group 1"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "rank": 0, "update_proj_gap": 1, "scale": 1})
    assert len(opt.param_groups) == 1


def test_unknown_constructor_option_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected option"):
        gradproj.GaLoreAdamW([nn.Parameter(torch.randn(3))], rnak=4)
    with pytest.raises(ValueError, match="impl = 'cuda'"):
        gradproj.GaLoreAdamW([nn.Parameter(torch.randn(3))], impl="cuda")
    with pytest.raises(ValueError, match="state_dtype"):
        gradproj.GaLoreAdamW([nn.Parameter(torch.randn(3))], state_dtype=torch.int8)


def test_fira_accepts_alpha_spelling():
    W = nn.Parameter(torch.randn(8, 6))
    opt = gradproj.FiraAdamW([{"params": [W], "rank": 2, "update_proj_gap": 10, "alpha": 0.5}], lr=1e-2)
    W.grad = torch.randn(8, 6)
    opt.step()
    assert "residual_norm" in opt.state[W]


def test_rank_as_constructor_default_projects_matrices_only():
    model = TinyNet()
    opt = gradproj.GaLoreAdamW(model.parameters(), lr=1e-2, rank=4, update_proj_gap=5, scale=0.5)
    train(model, opt, 1)
    assert "proj" in opt.state[model.fc1.weight]
    assert "proj" not in opt.state[model.fc1.bias]


def test_loading_a_checkpoint_with_bad_groups_changes_nothing():
    W = nn.Parameter(torch.randn(8, 6))
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": 10, "scale": 1.0}], lr=1e-2)
    W.grad = torch.randn(8, 6)
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["rank"] = -1
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[W].items()}
    with pytest.raises(ValueError, match="rank = -1"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["rank"] == 2
    assert torch.equal(opt.state[W]["proj"], before["proj"])


def test_checkpoint_without_a_newer_option_loads_with_its_default_and_resumes_identically():
    """A checkpoint written before an option existed (here: ``foreach``) gets the option's default."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(8, 6))
    W2 = nn.Parameter(W.detach().clone())
    make = lambda p: gradproj.GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 3, "scale": 1.0}], lr=1e-2)
    a, b = make(W), make(W2)
    grads = [torch.randn(8, 6) for _ in range(6)]
    for g in grads[:3]:
        W.grad = g.clone()
        a.step()
    sd = a.state_dict()
    del sd["param_groups"][0]["foreach"]
    for g in grads[:3]:
        W2.grad = g.clone()
        b.step()
    b.load_state_dict(sd)
    assert b.param_groups[0]["foreach"] is None
    for g in grads[3:]:
        W.grad, W2.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(W, W2)
