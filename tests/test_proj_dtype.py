"""Group option ``proj_dtype``: the projection GEMMs down (R = PᵀG, G Pᵀ) and up (P X, X P) in bfloat16 / float16.

Error bound (elementwise, for one GEMM C = A B with inner dimension k, A and B float32, C rounded back):
each operand is rounded to the low dtype with relative error at most u (u = 2^-8 for bfloat16's 8-bit
significand, 2^-11 for float16), so each product âᵢ b̂ᵢ = aᵢbᵢ(1+δ), |δ| ≤ 2u + u²; torch accumulates the k
products in float32 in any order (relative growth at most γ_k ≈ k·2^-24 of Σ|âᵢ||b̂ᵢ| ≤ (1+u)² Σ|aᵢ||bᵢ|); the
sum is rounded once more to the low dtype (u·|C| ≤ u·Σ|aᵢ||bᵢ| up to the terms above). Hence

    |Ĉ − C| ≤ (3u + 3u² + u³ + 1.01·k·2^-24·(1+u)³) · (|A| |B|)          (all products exact in float64)

which holds for any blocking / summation order, on any CPU (AMX, AVX-512, AVX2), since only the operand
roundings, a float32 accumulation and one final rounding are assumed. The result goes back to float32
exactly (bf16/fp16 → fp32 is exact). ``add_up_`` then adds α·Ĉ into W in float32: one more rounding of
W + α·Ĉ, at most 2^-24·|W + α·C| + its effect on Ĉ's error, which the bound below adds.
"""

import copy

import pytest
import torch

import gradproj
from gradproj.projectors.base import dense_down

U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
U32 = 2.0**-24


def gemm_bound(A: torch.Tensor, B: torch.Tensor, u: float) -> torch.Tensor:
    """The elementwise bound of the module docstring for A @ B (float64)."""
    k = A.shape[1]
    c = 3 * u + 3 * u**2 + u**3 + 1.01 * k * U32 * (1 + u) ** 3
    return c * (A.double().abs() @ B.double().abs())


def setup(shape, proj_type, proj_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
    W.grad = torch.randn(shape, generator=g)
    group = {"params": [W], "rank": 8, "update_proj_gap": 2, "scale": 0.25, "proj_type": proj_type}
    if proj_dtype is not ...:
        group["proj_dtype"] = proj_dtype
    opt = gradproj.GaLoreAdamW([group], lr=1e-2)
    return W, opt


@pytest.mark.parametrize("dtype_name, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
@pytest.mark.parametrize("shape, proj_type", [((48, 80), "left"), ((80, 48), "right"), ((64, 64), "left")])
def test_down_up_and_add_up_within_the_derived_bound(shape, proj_type, dtype_name, dtype):
    W, opt = setup(shape, proj_type, dtype_name)
    opt.step()  # the basis
    state, group = opt.state[W], opt.param_groups[0]
    proj = opt.engine.plan(W, group).projector
    P = state["proj"]
    assert P.dtype == torch.float32  # the stored basis stays in the parameter's dtype
    u = U[dtype]
    G = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    R = proj.down(G, state)
    assert R.dtype == torch.float32 and R.is_contiguous()
    A, B = (P.t(), G) if proj.side == "left" else (G, P.t())
    exact = A.double() @ B.double()
    err = (R.double() - exact).abs()
    assert (err <= gemm_bound(A, B, u)).all()
    # the low-precision path ran: float32's own bound (u = 2^-24 terms only) is exceeded somewhere
    assert (err > gemm_bound(A, B, U32)).any()

    X = torch.randn(R.shape, generator=torch.Generator().manual_seed(6))
    BX = proj.up(X, state)
    A, B = (P, X) if proj.side == "left" else (X, P)
    exact = A.double() @ B.double()
    bound = gemm_bound(A, B, u)
    assert BX.dtype == torch.float32 and ((BX.double() - exact).abs() <= bound).all()

    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    W1, alpha = W0.clone(), -0.3
    proj.add_up_(W1, X, state, alpha)
    ref = W0.double() + alpha * exact
    # |α|·(Ĉ's bound) + the float32 roundings of α·Ĉ and of the sum (each ≤ 2^-24 of its magnitude)
    slack = 1.01 * U32 * (abs(alpha) * (A.double().abs() @ B.double().abs()) * (1 + bound.max()) + ref.abs())
    assert ((W1.double() - ref).abs() <= abs(alpha) * bound + slack).all()


def test_the_optimizer_step_runs_both_gemms_in_bfloat16():
    """One step from a stored basis, against the same step written out with explicit bfloat16 GEMMs."""
    W, opt = setup((80, 48), "right", "bfloat16")
    opt.step()
    P = opt.state[W]["proj"].clone()
    m, v = opt.state[W]["exp_avg"].clone(), opt.state[W]["exp_avg_sq"].clone()
    W0, G = W.detach().clone(), W.grad.clone()
    opt.step()  # t = 1: no refresh (update_proj_gap = 2)
    assert torch.equal(opt.state[W]["proj"], P)
    b1, b2, eps, lr, scale, t = 0.9, 0.999, 1e-6, 1e-2, 0.25, 2
    R = (G.bfloat16() @ P.t().bfloat16()).float()
    m = b1 * m + (1 - b1) * R
    v = b2 * v + (1 - b2) * R * R
    step = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
    Uu = m / (v.sqrt() + eps)
    ref = W0 - step * scale * (Uu.bfloat16() @ P.bfloat16()).float()
    # R here and in the optimizer: the same bf16 operands, each GEMM within u + γ_k of their exact product, so
    # they differ by at most twice that; through Adam's m/√v (both first order in R), the update moves by the
    # same relative amount; the bf16 rounding of U before up adds u · |U||P| on each side. Then float32 adds.
    k = P.shape[1]
    rel = 2 * (2.0**-8 + 1.01 * k * U32)
    bound = step * scale * (4 * rel + 2 * 2.0**-8) * (Uu.abs() @ P.abs()) + 4 * U32 * W0.abs()
    assert ((W.detach() - ref).abs() <= bound).all()


def test_default_none_is_the_plain_float32_path():
    """proj_dtype=None (the default) runs the float32 GEMMs bit for bit as without the option."""
    W, opt = setup((48, 80), "left", ...)
    assert opt.param_groups[0]["proj_dtype"] is None
    W2, opt2 = setup((48, 80), "left", None)
    for _ in range(3):
        opt.step()
        opt2.step()
    assert torch.equal(W, W2)
    state, proj = opt.state[W], opt.engine.plan(W, opt.param_groups[0]).projector
    G, P = W.grad, state["proj"]
    assert torch.equal(proj.down(G, state), dense_down(G, P, "left"))
    X = torch.randn(8, 80)
    assert torch.equal(proj.up(X, state), P @ X)
    W1, W3 = W.detach().clone(), W.detach().clone()
    proj.add_up_(W1, X, state, 0.5)
    W3.addmm_(P, X, alpha=0.5)
    assert torch.equal(W1, W3)


@pytest.mark.parametrize("value", ["bf16", "float32", torch.bfloat16, 16, True])
def test_bad_values_are_refused_naming_the_option(value):
    with pytest.raises(ValueError, match="proj_dtype"):
        setup((48, 80), "left", value)
    W, opt = setup((48, 80), "left", None)
    opt.step()
    before, state = W.detach().clone(), copy.deepcopy(opt.state[W])
    opt.param_groups[0]["proj_dtype"] = value
    with pytest.raises(ValueError, match="proj_dtype"):
        opt.step()
    assert torch.equal(W, before)
    assert all(torch.equal(state[k], v) if torch.is_tensor(v) else state[k] == v for k, v in opt.state[W].items())


def test_refused_for_bases_without_a_stored_dense_matrix():
    W = torch.nn.Parameter(torch.randn(48, 80))
    group = {"params": [W], "rank": 8, "update_proj_gap": 2, "scale": 0.25, "projector": "random"}
    with pytest.raises(ValueError, match=r"proj_dtype.*projector='random'"):
        gradproj.GaLoreAdamW([{**group, "proj_dtype": "bfloat16"}])


def test_the_batched_step_leaves_a_proj_dtype_group_to_the_per_matrix_path():
    """The batched foreach step runs its own float32 GEMMs: it takes only groups whose projector stores_dense()."""
    W, opt = setup((48, 80), "left", "bfloat16")
    group = opt.param_groups[0]
    proj_cls = type(opt.engine.plan(W, group).projector)
    assert not proj_cls.stores_dense(group)
    assert proj_cls.stores_dense({**group, "proj_dtype": None})


def test_resume_is_exact_and_the_checkpoint_holds_no_low_precision_copy():
    """Refreshes every 2 steps: the cached bf16 basis must follow each refresh; a resumed optimizer (no cache)
    must continue bit for bit."""
    W, opt = setup((48, 80), "left", "bfloat16")
    for _ in range(3):
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert all(t.dtype == torch.float32 for s in saved["state"].values() for t in s.values() if torch.is_tensor(t))
    W2 = torch.nn.Parameter(W.detach().clone())
    W2.grad = W.grad.clone()
    opt2 = gradproj.GaLoreAdamW([{"params": [W2], "rank": 8, "update_proj_gap": 2, "scale": 0.25}], lr=1e-2)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["proj_dtype"] == "bfloat16"
    for i in range(4):
        g = torch.randn(W.shape, generator=torch.Generator().manual_seed(100 + i))
        W.grad, W2.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
        assert torch.equal(W, W2)


def test_a_refresh_replaces_the_cached_low_precision_basis():
    W, opt = setup((48, 80), "left", "bfloat16")
    opt.step()
    state, proj = opt.state[W], opt.engine.plan(W, opt.param_groups[0]).projector
    first = proj.gemm_basis(state, "proj", torch.bfloat16)
    assert proj.gemm_basis(state, "proj", torch.bfloat16) is first  # cast once per refresh
    W.grad = torch.randn(W.shape, generator=torch.Generator().manual_seed(9))
    opt.step()  # t = 1
    opt.step()  # t = 2: refresh from the new gradient
    again = proj.gemm_basis(state, "proj", torch.bfloat16)
    assert torch.equal(again, state["proj"].bfloat16()) and not torch.equal(again, first)


def test_project_backward_refuses_proj_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 16))
    opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4), proj_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"proj_dtype='bfloat16'.*proj_dtype=None"):
        gradproj.project_backward(model, opt)
    assert opt.engine.projected_backward is None
