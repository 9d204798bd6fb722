"""The composed optimizers against the plain reference of docs/algorithms.md and the original packages."""

import importlib.util

import warnings

import pytest
import torch

import gradproj
from problems import clone_params, direct_svd_projector, matrix_problem, train
from reference_algorithms import ReferenceAdamW, ReferenceGaLore

SHAPES = [(48, 20), (20, 48), (33, 33)]  # right, left and square (right under "std")


def step_both(ours, ref, p_ours, p_ref, loss_fn, steps):
    for _ in range(steps):
        train(p_ours, ours, 1, loss_fn)
        train(p_ref, ref, 1, loss_fn)


# float64 runs agree to rounding; in float32, Adam's normalisation of near-zero coordinates (m / sqrt(v))
# amplifies rounding differences of the fused GEMMs to ~1e-5 of a weight after 25 steps, i.e. ~1e-3 of one
# step (lr * scale = 1.5e-2): the tolerance says "the same algorithm", not "the same bits".
TOLS = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=3e-5)}


# Fira's fast path (projector.orthonormal) never materialises the residual: it takes the residual's norm from
# ‖G_i‖² − (2α − α²)‖R_i‖², exact for an orthonormal basis. The SVD runs in float32 (as in the reference), so
# the basis is orthonormal to float32 precision only, and so is the limiter's norm on this path even in
# float64 (with α = 1 the two terms nearly cancel): it is held to the float32 tolerance. The direct path
# (projector "svd_direct") is held to float64 rounding.
FACTORED_F64 = TOLS[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "proj_type,fira",
    [(t, False) for t in ("std", "reverse_std", "left", "right", "full")]
    + [(t, True) for t in ("std", "reverse_std", "left", "right")]  # Fira is defined for one-sided projections
    + [(t, "direct") for t in ("std", "left")],
)
def test_matches_reference_across_refreshes(proj_type, fira, dtype):
    params, loss_fn = matrix_problem(SHAPES, seed=1, dtype=dtype)
    ref_params = clone_params(params)
    cls = gradproj.FiraAdamW if fira else gradproj.GaLoreAdamW
    projector = direct_svd_projector() if fira == "direct" else "svd"
    # the reference refreshes every matrix at t % T == 0 (no stagger)
    ours = cls([{"params": params, "rank": 6, "update_proj_gap": 7, "scale": 0.5, "proj_type": proj_type,
                 "projector": projector, "refresh_stagger": False}], lr=3e-2, weight_decay=0.05)
    ref = ReferenceGaLore(ref_params, lr=3e-2, rank=6, gap=7, alpha=0.5, proj_type=proj_type, wd=0.05,
                          fira=bool(fira))
    step_both(ours, ref, params, ref_params, loss_fn, steps=25)  # refreshes at t = 0, 7, 14, 21
    tol = FACTORED_F64 if fira is True and dtype == torch.float64 else TOLS[dtype]
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, **tol)


def test_unprojected_group_is_reference_adamw():
    params, loss_fn = matrix_problem([(12, 9)], seed=2)
    ref_params = clone_params(params)
    ours = gradproj.GaLoreAdamW(params, lr=1e-2, weight_decay=0.1)
    ref = ReferenceAdamW(ref_params, lr=1e-2, wd=0.1)
    step_both(ours, ref, params, ref_params, loss_fn, steps=15)
    torch.testing.assert_close(params[0], ref_params[0], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(importlib.util.find_spec("galore_torch") is None, reason="galore-torch not installed")
@pytest.mark.parametrize("proj_type", ["std", "left", "right", "full"])
def test_matches_original_galore_package(proj_type):
    import galore_torch

    params, loss_fn = matrix_problem(SHAPES, seed=3, dtype=torch.float64)
    orig_params = clone_params(params)
    group = {"rank": 5, "update_proj_gap": 6, "scale": 0.25, "proj_type": proj_type}
    # galore-torch: exact SVD, every matrix refreshed at t % T == 0
    ours = gradproj.GaLoreAdamW([{"params": params, **group}], lr=2e-2, weight_decay=0.01, projector="svd",
                                refresh_stagger=False)
    orig = galore_torch.GaLoreAdamW([{"params": orig_params, **group}], lr=2e-2, weight_decay=0.01,
                                    no_deprecation_warning=True)
    step_both(ours, orig, params, orig_params, loss_fn, steps=20)
    for a, b in zip(params, orig_params):
        torch.testing.assert_close(a, b, **TOLS[torch.float64])


@pytest.mark.skipif(importlib.util.find_spec("fira") is None, reason="fira not installed")
@pytest.mark.parametrize("path", ["factored", "direct"])
@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_matches_original_fira_package(alpha, path):
    import fira

    params, loss_fn = matrix_problem(SHAPES, seed=4, dtype=torch.float64)
    orig_params = clone_params(params)
    group = {"rank": 5, "update_proj_gap": 6, "alpha": alpha, "proj_type": "std"}
    projector = direct_svd_projector() if path == "direct" else "svd"
    # fira: exact SVD, every matrix refreshed at t % T == 0
    ours = gradproj.FiraAdamW([{"params": params, **group, "projector": projector, "refresh_stagger": False}], lr=2e-2)
    orig = fira.FiraAdamW([{"params": orig_params, **group}], lr=2e-2, no_deprecation_warning=True)
    step_both(ours, orig, params, orig_params, loss_fn, steps=20)
    for a, b in zip(params, orig_params):
        torch.testing.assert_close(a, b, **(FACTORED_F64 if path == "factored" else TOLS[torch.float64]))


# torch.optim.AdamW adds eps to sqrt(v_hat) while GaLore adds it to sqrt(v) and folds the bias correction into
# the step size; with eps ~ 0 the two are the same function, which float64 then shows to ~1e-10.
def test_identity_projector_equals_torch_adamw():
    """Same subspace as the whole space and no weight decay: exactly torch.optim.AdamW."""
    params, loss_fn = matrix_problem([(30, 17), (17, 30)], seed=5, dtype=torch.float64)
    torch_params = clone_params(params)
    ours = gradproj.GaLoreAdamW(
        [{"params": params, "rank": 4, "update_proj_gap": 5, "scale": 1.0, "projector": "identity"}],
        lr=1e-2, eps=1e-16,
    )
    ref = torch.optim.AdamW(torch_params, lr=1e-2, eps=1e-16, weight_decay=0.0)
    step_both(ours, ref, params, torch_params, loss_fn, steps=20)
    for a, b in zip(params, torch_params):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_rank_at_least_min_dim_trains_like_adamw():
    params, loss_fn = matrix_problem([(8, 30)], seed=6, dtype=torch.float64)
    torch_params = clone_params(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = gradproj.GaLoreAdamW([{"params": params, "rank": 64, "update_proj_gap": 5, "scale": 0.25}],
                                    lr=1e-2, eps=1e-16)
        ref = torch.optim.AdamW(torch_params, lr=1e-2, eps=1e-16, weight_decay=0.0)
        step_both(ours, ref, params, torch_params, loss_fn, steps=10)
    torch.testing.assert_close(params[0], torch_params[0], rtol=1e-8, atol=1e-9)
    text = "".join(str(w.message) for w in caught)
    assert "no memory can be saved" in text
    assert text.count("no memory can be saved") == 1  # warned once, not every step
    assert "proj" not in ours.state[params[0]]


def test_fira_with_zero_residual_equals_galore():
    """Gradients that lie inside the rank-r subspace and alpha = 1 leave Fira nothing to add."""
    torch.manual_seed(0)
    m, n, r = 24, 16, 3
    A = torch.randn(m, r) @ torch.randn(r, n)  # rank-3 gradient direction, fixed
    W1 = torch.nn.Parameter(torch.randn(m, n))
    W2 = torch.nn.Parameter(W1.detach().clone())
    group = {"rank": r, "update_proj_gap": 4, "scale": 1.0}
    galore = gradproj.GaLoreAdamW([{"params": [W1], **group}], lr=1e-2)
    fira = gradproj.FiraAdamW([{"params": [W2], **group}], lr=1e-2)
    for k in range(12):
        for W, opt in ((W1, galore), (W2, fira)):
            W.grad = A * (1.0 + 0.1 * k)
            opt.step()
    torch.testing.assert_close(W1, W2, rtol=1e-5, atol=1e-5)
    assert fira.state[W2]["residual_norm"] < 1e-3 * A.norm()
