"""The regular step's fast paths against the reference forms they replace.

* ψ written over R (``adam_update_fused_``): torch's fused AdamW kernel with R as its own gradient; the same
  kernel arithmetic as the buffered ``adam_update_fused``, so the same bits.
* The decay as the GEMM's beta (``apply_update_decay_in_gemm``, ``adam_kernel="fused"`` where it measures
  faster): the two-pass update's function, rounded differently, within a bound derived from the roundings.
"""

from __future__ import annotations

import pytest
import torch

import gradproj
from gradproj.kernels import reference as ref
from gradproj.projectors.svd import SVDProjector
from problems import clone_params, matrix_problem, train

EPS32 = torch.finfo(torch.float32).eps
U32 = EPS32 / 2  # unit roundoff of float32


@pytest.mark.parametrize("numel", [1, 15, 16, 17, 1000, 44033])  # tails around the 16-lane vector width
def test_psi_over_r_is_the_buffered_kernel_bit_for_bit(numel):
    g = torch.Generator().manual_seed(numel)
    Rs = [torch.randn(numel, generator=g) * s for s in (1.0, 1e-6, 1e6)]
    ms = [torch.randn(numel, generator=g) for _ in Rs]
    vs = [torch.rand(numel, generator=g) for _ in Rs]
    Rs[0][0] = float("nan")  # non-finite entries give ψ = NaN either way
    Rs[2][-1] = float("inf")
    m1, v1, m2, v2 = ([t.clone() for t in x] for x in (ms, vs, ms, vs))
    buffered = ref.adam_update_fused([R.clone() for R in Rs], m1, v1, 0.9, 0.999, 1e-6)
    inputs = [R.clone() for R in Rs]
    in_place = ref.adam_update_fused_(inputs, m2, v2, 0.9, 0.999, 1e-6)
    for a, b, R in zip(buffered, in_place, inputs):
        assert b is R  # written over R: no new buffer
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(a.isnan(), b.isnan())
    for a, b in zip(m1 + v1, m2 + v2):
        assert torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def _basis(m, n, r, side, g):
    Q = torch.linalg.qr(torch.randn(max(m, n), r, generator=g))[0]
    return Q[:m] if side == "left" else Q[:n].t().contiguous()


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=["right", "left"])
@pytest.mark.parametrize("wd", [0.1, 1e-3])
def test_decay_in_the_gemm_is_the_two_pass_update_within_its_roundings(shape, wd, monkeypatch):
    """Both forms compute (1 − lr·wd)·(W − a·B(U)), a = step·scale. Derived bound (docstring of
    apply_update_decay_in_gemm): elementwise (8u + 2γ_k)·(|W| + a·|P||U|), γ_k = k·u/(1 − k·u)."""
    m, n = shape
    r = 6
    side = "right" if m >= n else "left"
    g = torch.Generator().manual_seed(7)
    proj = SVDProjector((m, n), r, "std", {"rank": r, "update_proj_gap": 10})
    P = _basis(m, n, r, side, g)
    state = {"proj": P}
    U = torch.randn(proj.low_rank_shape(), generator=g) * 30
    W = torch.randn(m, n, generator=g)
    step, scale, lr = 1e-2, 0.25, 1e-2
    two_pass = W.clone()
    ref.apply_update(two_pass, proj, state, U, None, step, scale, lr=lr, weight_decay=wd)
    monkeypatch.setattr(ref, "decay_in_gemm_pays", lambda *a: True)
    folded = W.clone()
    assert ref.apply_update_decay_in_gemm(folded, proj, state, U, step, scale, lr, wd)
    a = step * scale
    PU = U.abs() @ P.abs() if side == "right" else P.abs() @ U.abs()
    gamma = r * U32 / (1 - r * U32)
    bound = (8 * U32 + 2 * gamma) * (W.abs() + a * PU)
    assert ((folded - two_pass).abs() <= bound).all()
    assert not torch.equal(folded, two_pass)  # the folded GEMM ran (it rounds differently somewhere)
    exact = (1 - lr * wd) * (W.double() - a * (U.double() @ P.double() if side == "right" else P.double() @ U.double()))
    assert ((folded.double() - exact).abs() <= bound.double()).all()


def test_decay_in_the_gemm_declines_without_decay_or_where_it_does_not_pay(monkeypatch):
    g = torch.Generator().manual_seed(8)
    proj = SVDProjector((30, 20), 4, "std", {"rank": 4, "update_proj_gap": 10})
    state = {"proj": _basis(30, 20, 4, "right", g)}
    U, W = torch.randn(30, 4, generator=g), torch.randn(30, 20, generator=g)
    before = W.clone()
    monkeypatch.setattr(ref, "decay_in_gemm_pays", lambda *a: True)
    assert not ref.apply_update_decay_in_gemm(W, proj, state, U, 1e-2, 1.0, 1e-2, 0.0)
    monkeypatch.setattr(ref, "decay_in_gemm_pays", lambda *a: False)
    assert not ref.apply_update_decay_in_gemm(W, proj, state, U, 1e-2, 1.0, 1e-2, 0.1)
    assert torch.equal(W, before)


def test_decay_choice_is_timed_once_per_shape(monkeypatch):
    monkeypatch.setattr(ref, "_DECAY_IN_GEMM", {})
    W, A, B = torch.randn(32, 16), torch.randn(32, 4), torch.randn(4, 16)
    before = W.clone()
    first = ref.decay_in_gemm_pays(W, A, B)
    assert list(ref._DECAY_IN_GEMM) == [(32, 16, 4, torch.float32)]
    assert torch.equal(W, before)  # timed on a copy
    ref._DECAY_IN_GEMM[(32, 16, 4, torch.float32)] = not first
    assert ref.decay_in_gemm_pays(W, A, B) is (not first)


@pytest.mark.parametrize("fold", [True, False])
def test_both_step_paths_make_the_same_decay_choice(fold, monkeypatch):
    """The per-parameter and the batched step ask the same cached choice, so they give the same bits."""
    monkeypatch.setattr(ref, "decay_in_gemm_pays", lambda *a: fold)
    params, loss_fn = matrix_problem([(20, 12), (12, 20), (20, 12)], seed=9)
    other = clone_params(params)
    group = {"rank": 3, "update_proj_gap": 4, "scale": 0.5}
    a = gradproj.GaLoreAdamW([{"params": params, **group}], lr=1e-2, weight_decay=0.1, foreach=False)
    b = gradproj.GaLoreAdamW([{"params": other, **group}], lr=1e-2, weight_decay=0.1, foreach=True)
    train(params, a, 6, loss_fn)
    train(other, b, 6, loss_fn)
    for x, y in zip(params, other):
        assert torch.equal(x, y)


def test_folded_training_stays_with_the_reference_order(monkeypatch):
    """Ten steps with the decay in the GEMM against the two-pass order (all else equal): the per-step difference
    is the bound above, a few float32 roundings of |W|, so the runs agree to test_parity's float32 tolerance."""
    params, loss_fn = matrix_problem([(20, 12), (12, 20)], seed=10)
    other = clone_params(params)
    group = {"rank": 3, "update_proj_gap": 4, "scale": 0.5}
    runs = []
    for ps, fold in ((params, True), (other, False)):
        monkeypatch.setattr(ref, "decay_in_gemm_pays", lambda *a, fold=fold: fold)
        opt = gradproj.GaLoreAdamW([{"params": ps, **group}], lr=1e-2, weight_decay=0.1)
        train(ps, opt, 10, loss_fn)
        runs.append(ps)
    for x, y in zip(*runs):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize("options", [{}, {"residual": "fira"}, {"foreach": True}, {"state_dtype": "float32"}])
def test_a_step_leaves_the_gradients_as_they_were(options):
    """ψ is written over R only where R is the step's own projection: never over a gradient (an unprojected
    tensor's R is its gradient) or an R that a residual rule reads afterwards."""
    params, _ = matrix_problem([(20, 12), (12, 20)], seed=11)
    params.append(torch.nn.Parameter(torch.randn(12)))
    residual = options.pop("residual", None)
    cls = gradproj.FiraAdamW if residual else gradproj.GaLoreAdamW
    opt = cls(
        [{"params": params[:2], "rank": 3, "update_proj_gap": 4, "scale": 0.5}, {"params": params[2:]}],
        lr=1e-2,
        **options,
    )
    g = torch.Generator().manual_seed(12)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        grads = [p.grad.clone() for p in params]
        opt.step()
        for p, before in zip(params, grads):
            assert torch.equal(p.grad, before)


def test_a_non_finite_gradient_stays_in_its_own_parameter():
    """No buffer is shared between same-shaped matrices: a NaN gradient of one leaves the others' steps as in
    a run without it."""
    params, _ = matrix_problem([(20, 12)] * 3, seed=13)
    alone = clone_params(params[1:])
    # the exact basis without stagger: a matrix's randomized sketch and stagger offset depend on its position in
    # the group, which differs between the two runs; this test is about buffers, not bases
    group = {"rank": 3, "update_proj_gap": 100, "scale": 0.5, "projector": "svd", "refresh_stagger": False}
    opt = gradproj.GaLoreAdamW([{"params": params, **group}], lr=1e-2)
    opt_alone = gradproj.GaLoreAdamW([{"params": alone, **group}], lr=1e-2)
    g = torch.Generator().manual_seed(14)
    for step in range(4):
        grads = [torch.randn(20, 12, generator=g) for _ in range(3)]
        if step == 2:
            grads[0] = torch.full((20, 12), float("nan"))
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        for p, gr in zip(alone, grads[1:]):
            p.grad = gr.clone()
        opt.step()
        opt_alone.step()
    assert params[0].isnan().all()
    for x, y in zip(params[1:], alone):
        assert torch.equal(x, y)
