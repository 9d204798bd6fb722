"""Projector properties: sides, shapes, orthonormality, refresh schedule, rank clipping, non-finite input."""

import pytest
import torch

import gradproj
from gradproj.projectors import SVDProjector, choose_side
from problems import matrix_problem, train


@pytest.mark.parametrize(
    "shape,proj_type,side",
    [
        ((40, 20), "std", "right"), ((20, 40), "std", "left"), ((30, 30), "std", "right"),
        ((40, 20), "reverse_std", "left"), ((20, 40), "reverse_std", "right"),
        ((40, 20), "left", "left"), ((20, 40), "right", "right"), ((20, 40), "full", "full"),
    ],
)
def test_side_shapes_and_orthonormal_basis(shape, proj_type, side):
    m, n = shape
    r = 5
    assert choose_side(m, n, proj_type) == side
    G = torch.randn(m, n, dtype=torch.float64)
    proj = SVDProjector((m, n), r, proj_type, {"update_proj_gap": 10})
    state = {}
    assert proj.needs_refresh(state, 3)  # no basis yet
    assert proj.refresh(G, state, 0)
    R = proj.down(G, state)
    expected = {"right": (m, r), "left": (r, n), "full": (r, r)}[side]
    assert R.shape == expected == proj.low_rank_shape()
    assert proj.up(R, state).shape == (m, n)
    eye = torch.eye(r, dtype=torch.float64)
    tol = dict(rtol=0, atol=1e-5)  # the SVD runs in float32 (as the reference's does), then is cast back
    if side == "right":
        torch.testing.assert_close(state["proj"] @ state["proj"].T, eye, **tol)
    elif side == "left":
        torch.testing.assert_close(state["proj"].T @ state["proj"], eye, **tol)
    else:
        torch.testing.assert_close(state["proj_left"].T @ state["proj_left"], eye, **tol)
        torch.testing.assert_close(state["proj_right"] @ state["proj_right"].T, eye, **tol)
    # the basis spans the top-r singular subspace: B(down(G)) is the best rank-r approximation of G
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    torch.testing.assert_close(proj.up(R, state), best, rtol=1e-4, atol=1e-4)


def test_basis_in_param_dtype_and_svd_in_fp32():
    G = torch.randn(24, 12).bfloat16()
    proj = SVDProjector((24, 12), 4, "std", {"update_proj_gap": 1})
    state = {}
    proj.refresh(G, state, 0)
    assert state["proj"].dtype == torch.bfloat16 and state["proj"].shape == (4, 12)


def test_refresh_exactly_every_T_steps(monkeypatch):
    calls = []
    original = SVDProjector.compute_basis

    def counting(self, G, state, step):
        calls.append(step)
        return original(self, G, state, step)

    monkeypatch.setattr(SVDProjector, "compute_basis", counting)
    params, loss_fn = matrix_problem([(20, 12)], seed=0)
    # svd: the counter hooks its decomposition; one matrix, so its stagger offset is 0 either way
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": 3, "update_proj_gap": 4, "scale": 1.0}], lr=1e-2,
                               projector="svd")
    train(params, opt, 13, loss_fn)
    assert calls == [0, 4, 8, 12]


def test_basis_changes_only_at_refresh():
    params, loss_fn = matrix_problem([(20, 12)], seed=0)
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": 3, "update_proj_gap": 5, "scale": 1.0}], lr=1e-2)
    bases = []
    for _ in range(11):
        train(params, opt, 1, loss_fn)
        bases.append(opt.state[params[0]]["proj"].clone())
    for t in range(1, 11):
        same = torch.equal(bases[t], bases[t - 1])
        assert same == (t % 5 != 0), t


def test_rank_larger_than_min_dim_is_clipped_to_unprojected():
    W = torch.nn.Parameter(torch.randn(6, 40))
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 10, "update_proj_gap": 2, "scale": 0.25}], lr=1e-2)
    W.grad = torch.randn(6, 40)
    with pytest.warns(UserWarning, match=r"rank 10 >= min\(6, 40\)"):
        opt.step()
    assert opt.state[W]["exp_avg"].shape == (6, 40)


def test_conv_weight_is_projected_as_out_by_rest():
    conv = torch.nn.Conv2d(3, 8, 3)  # weight 8 x 3 x 3 x 3 -> matrix 8 x 27: left projection
    opt = gradproj.GaLoreAdamW(
        [{"params": [conv.weight], "rank": 2, "update_proj_gap": 5, "scale": 1.0}, {"params": [conv.bias]}], lr=1e-2
    )
    x = torch.randn(4, 3, 9, 9)
    before = conv.weight.detach().clone()
    conv(x).square().mean().backward()
    opt.step()
    st = opt.state[conv.weight]
    assert st["proj"].shape == (8, 2) and st["exp_avg"].shape == (2, 27)
    assert conv.weight.shape == (8, 3, 3, 3) and not torch.equal(conv.weight, before)
    assert opt.state[conv.bias]["exp_avg"].shape == (8,)  # 1-D: full-rank Adam


def test_one_dim_tensor_in_rank_group_gets_full_rank_adam():
    b = torch.nn.Parameter(torch.randn(16))
    opt = gradproj.GaLoreAdamW([{"params": [b], "rank": 4, "update_proj_gap": 5, "scale": 0.25}], lr=1e-1)
    b.grad = torch.ones(16)
    before = b.detach().clone()
    opt.step()
    assert set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(b, before - 0.1, rtol=0, atol=1e-5)  # first Adam step: lr * sign(g), no scale


def test_non_finite_gradient_at_later_refresh_keeps_previous_basis(caplog):
    W = torch.nn.Parameter(torch.randn(12, 8))
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 3, "update_proj_gap": 2, "scale": 1.0}], lr=1e-2)
    for _ in range(2):
        W.grad = torch.randn(12, 8)
        opt.step()
    basis = opt.state[W]["proj"].clone()
    W.grad = torch.randn(12, 8)
    W.grad[3, 4] = float("nan")
    with caplog.at_level("WARNING", logger="gradproj"), \
            pytest.warns(gradproj.BasisRefreshWarning, match="non-finite gradient"):
        opt.step()  # step count 2: a refresh step
    assert "non-finite gradient" in caplog.text and "12x8, step 2" in caplog.text
    assert torch.equal(opt.state[W]["proj"], basis)
    assert torch.isfinite(opt.state[W]["proj"]).all()


def test_non_finite_gradient_at_first_refresh_raises_before_any_change():
    a = torch.nn.Parameter(torch.randn(12, 8))
    b = torch.nn.Parameter(torch.randn(12, 8))
    opt = gradproj.GaLoreAdamW([{"params": [a, b], "rank": 3, "update_proj_gap": 2, "scale": 1.0}], lr=1e-2)
    a.grad = torch.randn(12, 8)
    b.grad = torch.full((12, 8), float("inf"))
    before = a.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf at its first basis refresh"):
        opt.step()
    assert torch.equal(a, before)
    assert all(len(s) == 0 for s in opt.state.values())


def test_moments_reset_at_refresh_restart_adam_in_the_new_basis():
    """With moments_on_refresh='reset', the step after a refresh is a first Adam step (|update| = lr·α per
    coordinate of ψ = sign(R)), exactly as a fresh optimizer started at that point would take."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(10, 6))
    group = {"rank": 2, "update_proj_gap": 3, "scale": 1.0, "moments_on_refresh": "reset"}
    opt = gradproj.GaLoreAdamW([{"params": [W], **group}], lr=1e-2)
    grads = [torch.randn(10, 6) for _ in range(4)]
    for g in grads[:3]:
        W.grad = g
        opt.step()
    W_before = W.detach().clone()
    W.grad = grads[3]
    opt.step()  # t = 3: refresh + reset
    fresh_W = torch.nn.Parameter(W_before.clone())
    fresh = gradproj.GaLoreAdamW([{"params": [fresh_W], **group}], lr=1e-2)
    fresh_W.grad = grads[3]
    fresh.step()
    torch.testing.assert_close(W, fresh_W)
    assert opt.state[W]["step"] == 4 and opt.state[W]["inner_start"] == 3


def test_moments_kept_at_refresh_by_default():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(10, 6))
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": 3, "scale": 1.0}], lr=1e-2)
    for _ in range(3):
        W.grad = torch.randn(10, 6)
        opt.step()
    m = opt.state[W]["exp_avg"].clone()
    W.grad = torch.randn(10, 6)
    opt.step()
    expected = 0.9 * m + 0.1 * (W.grad @ opt.state[W]["proj"].T)
    torch.testing.assert_close(opt.state[W]["exp_avg"], expected)
