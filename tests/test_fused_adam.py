"""adam_kernel="fused" (the default): Adam through torch's fused kernels.

Unprojected tensors are stepped by ``torch._fused_adamw_`` with GaLore's eps placement mapped onto torch's
(eps / √(1−β2^t)) and the decay after the update; the low-rank direction ψ = m / (√v + eps) comes from
``torch._fused_adam_`` in one pass. Both compute the reference's function with a different rounding order:
the bounds below are derived from the rounding steps, and ``adam_kernel="reference"`` restores the
reference's ops.
"""

from __future__ import annotations

import pytest
import torch

import gradproj
from gradproj.kernels.reference import adam_update, adam_update_fused
from gradproj.optimizers import multi_tensor
from gradproj.projectors import base as proj_base
from problems import clone_params, matrix_problem, train
from reference_algorithms import ReferenceAdamW

EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("shape", [(64, 129), (1000,), (7, 13)], ids=["matrix", "vector", "tail-only"])
@pytest.mark.parametrize("scale", [1.0, 1e-4, 1e3])
def test_fused_direction_is_the_reference_within_its_roundings(shape, scale):
    """m: the same lerp. v: β2·v + (1−β2)·R·R rounded once or twice per op (the kernel may contract the
    multiply-add): at most one rounding, eps·|v|. ψ: sqrt, add, divide are three roundings of at most eps/2
    relative on each side, plus half of v's difference through the square root: < 4·eps·|ψ|."""
    g = torch.Generator().manual_seed(0)
    R, m, v = (torch.randn(shape, generator=g) * scale for _ in range(3))
    v = v.abs() * scale
    m1, v1, m2, v2 = m.clone(), v.clone(), m.clone(), v.clone()
    U1 = adam_update(R, m1, v1, 0.9, 0.999, 1e-6)
    (U2,) = adam_update_fused([R], [m2], [v2], 0.9, 0.999, 1e-6)
    for a, b, k in ((m1, m2, 1), (v1, v2, 1), (U1, U2, 4)):
        assert ((a - b).abs() <= k * EPS32 * torch.maximum(a.abs(), b.abs())).all()
    out = torch.full(shape, float("nan"))  # a given buffer is overwritten, whatever it held
    m3, v3 = m.clone(), v.clone()
    adam_update_fused([R], [m3], [v3], 0.9, 0.999, 1e-6, out=[out])
    assert torch.equal(out, U2)


def test_unprojected_tensors_take_the_fused_adamw_kernel():
    params = [*matrix_problem([(12, 9)], seed=2)[0], torch.nn.Parameter(torch.zeros(9))]
    opt = gradproj.GaLoreAdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    assert multi_tensor.collect_dense(opt).ids == {id(p) for p in params}
    opt_ref = gradproj.GaLoreAdamW(clone_params(params), lr=1e-2, adam_kernel="reference")
    for p in opt_ref.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    assert not multi_tensor.collect_dense(opt_ref).ids


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_fused_adamw_is_galore_adamw_with_its_eps_and_decay(wd):
    """float64, so that rounding (1e-16 per op) cannot hide a misplaced eps (its effect here: eps/√v ~ 1e-4
    relative) or decay (lr·wd·step ~ 1e-3 of a step): the fused kernel must agree to ~1e-12."""
    params, loss_fn = matrix_problem([(12, 9), (7, 30)], seed=3, dtype=torch.float64)
    bias = torch.nn.Parameter(torch.linspace(-1, 1, 9, dtype=torch.float64))
    params = [*params, bias]
    ref_params = clone_params(params)
    ours = gradproj.GaLoreAdamW(params, lr=1e-2, weight_decay=wd, eps=1e-4)
    ref = ReferenceAdamW(ref_params, lr=1e-2, wd=wd, eps=1e-4)
    loss = lambda ps, index=None: loss_fn(ps[:2]) + ((ps[2] - 0.3) ** 2).sum()  # noqa: E731
    for _ in range(12):
        train(params, ours, 1, loss)
        train(ref_params, ref, 1, loss)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert all(ours.state[p]["step"] == 12 for p in params)


def test_reference_kernel_keeps_the_reference_ops():
    """adam_kernel="reference": the per-parameter path with the reference's ops, bit for bit the same as a
    run whose fused paths are switched off by hand."""
    params, loss_fn = matrix_problem([(20, 12), (12, 20), (9, 9)], seed=4)
    other = clone_params(params)
    groups = lambda ps: [{"params": ps[:2], "rank": 3, "update_proj_gap": 3, "scale": 0.5},  # noqa: E731
                         {"params": ps[2:]}]
    ref = gradproj.GaLoreAdamW(groups(params), lr=1e-2, adam_kernel="reference")
    fused = gradproj.GaLoreAdamW(groups(other), lr=1e-2)
    train(params, ref, 5, loss_fn)
    train(other, fused, 5, loss_fn)
    for a, b in zip(params, other):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # test_parity's float32 tolerance
    assert any(not torch.equal(a, b) for a, b in zip(params, other))  # the kernels did differ


def test_left_projection_layout_is_timed_once_and_gives_a_contiguous_r(monkeypatch):
    monkeypatch.setattr(proj_base, "_LEFT_LAYOUT", {})
    g = torch.Generator().manual_seed(5)
    G, P = torch.randn(30, 50, generator=g), torch.linalg.qr(torch.randn(30, 6, generator=g))[0]
    R = proj_base.dense_down(G, P, "left")
    assert list(proj_base._LEFT_LAYOUT) == [(30, 50, 6, torch.float32)]
    forms = {}
    for plain in (True, False):
        proj_base._LEFT_LAYOUT[(30, 50, 6, torch.float32)] = plain
        forms[plain] = proj_base.dense_down(G, P, "left")
        assert forms[plain].is_contiguous() and forms[plain].shape == (6, 50)
    assert torch.equal(R, forms[proj_base._LEFT_LAYOUT[(30, 50, 6, torch.float32)]])
    # the same product in two GEMM layouts: sums of 30 products, rounded differently (30·eps·Σ|P||G| bound)
    bound = 30 * EPS32 * (P.abs().t() @ G.abs())
    assert ((forms[True] - forms[False]).abs() <= bound).all()
    torch.testing.assert_close(forms[True], P.t() @ G)
