"""The Triton kernels against their torch twins, the dispatch rules, and stochastic rounding.

On the CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
every program instance costs milliseconds there, so shapes stay small. Tests marked ``gpu`` run the
compiled kernels on CUDA: ``TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_kernels.py``.

Tolerances are in units of the storage format's unit roundoff u (2⁻²⁴ for float32, 2⁻⁸ for bfloat16),
counted from how many roundings each twin makes (the kernels compute in float32 and round once on
store; the torch reference rounds after every operation, in the tensor's dtype).
"""

from __future__ import annotations

import io
import math
import os
import types

import pytest
import torch

import gradproj
from gradproj import kernels
from gradproj.kernels import reference as ref
from gradproj.projectors import IdentityProjector, get_projector
from problems import clone_params, matrix_problem, train

U_ROUND = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["f32", "bf16"]


def have_triton() -> bool:
    return kernels.triton_import_error() is None


needs_interpreter = pytest.mark.skipif(
    not (have_triton() and kernels.interpreter_requested()),
    reason="needs triton and TRITON_INTERPRET=1 (tests/conftest.py sets it) to run the kernels on the CPU",
)


def compiled_cuda() -> bool:
    return torch.cuda.is_available() and have_triton() and not kernels.interpreter_requested()


gpu = pytest.mark.gpu
compiled_only = pytest.mark.skipif(not compiled_cuda(), reason="needs CUDA, triton and TRITON_INTERPRET=0")


def T():
    return kernels.load_triton_ops()


def basis(m, n, r, side="std", dtype=torch.float32, device="cpu", seed=0):
    """An SVD projector with its basis refreshed from a random gradient, and that gradient."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(m, n, generator=g).to(device, dtype)
    proj = get_projector("svd")((m, n), r, side, {"update_proj_gap": 10})
    state = {}
    proj.refresh(G, state, 0)
    return proj, state, G


def randn(shape, dtype, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device, dtype)


# ------------------------------------------------------------------------------------------ dispatch
def test_both_ops_modules_provide_every_operation():
    import inspect

    if not have_triton():
        pytest.skip("triton not installed")
    for name in kernels.OPS:
        a, b = getattr(ref, name), getattr(T(), name)
        assert list(inspect.signature(a).parameters) == list(inspect.signature(b).parameters), name


def fake_cuda(dtype):
    """What resolve reads of a tensor, shaped like a CUDA tensor (this test machine may have none)."""
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda"))


def test_auto_uses_torch_on_cpu_even_under_the_interpreter():
    assert kernels.resolve("auto", torch.zeros(2)) is ref
    assert kernels.resolve("torch", torch.zeros(2)) is ref


@pytest.mark.skipif(not have_triton(), reason="triton not installed")
def test_auto_uses_triton_on_cuda_tensors_of_supported_dtypes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert kernels.resolve("auto", fake_cuda(dtype)) is T()
    assert kernels.resolve("auto", fake_cuda(torch.float64)) is ref  # unsupported dtype: quietly torch
    monkeypatch.setattr(kernels, "triton_import_error", lambda: "no triton")
    assert kernels.resolve("auto", fake_cuda(torch.float32)) is ref  # triton missing: quietly torch


def test_explicit_triton_raises_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if have_triton():
        with pytest.raises(ValueError, match="impl='triton' cannot run here.*CUDA device.*TRITON_INTERPRET=1"):
            kernels.resolve("triton", torch.zeros(2))
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(ValueError, match="float32, bfloat16 or float16.*not torch.float64"):
            kernels.resolve("triton", torch.zeros(2, dtype=torch.float64))
    monkeypatch.setattr(kernels, "triton_import_error", lambda: "triton cannot be imported (test)")
    with pytest.raises(ValueError, match="triton cannot be imported"):
        kernels.resolve("triton", torch.zeros(2))
    with pytest.raises(ValueError, match="unknown impl"):
        kernels.resolve("cuda", torch.zeros(2))


def test_optimizer_with_impossible_triton_raises_before_any_change(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    params, loss_fn = matrix_problem([(12, 9), (9, 12)], seed=0)
    before = [p.detach().clone() for p in params]
    opt = gradproj.FiraAdamW([{"params": params[:1]}, {"params": params[1:], "rank": 2, "update_proj_gap": 5,
                                                         "scale": 1.0, "impl": "triton"}], lr=0.1)
    loss_fn(params).backward()
    with pytest.raises(ValueError, match=r"param group 1, parameter 0 \(shape \(9, 12\)\): impl='triton' cannot run"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(len(opt.state[p]) == 0 for p in params)


def test_stochastic_rounding_option_is_validated():
    with pytest.raises(ValueError, match="stochastic_rounding = 'yes' must be True or False"):
        gradproj.GaLoreAdamW([torch.nn.Parameter(torch.randn(3))], stochastic_rounding="yes")


# ---------------------------------------------------------------------------------- (a) Adam kernel
# R's shapes at 67x131 (left projection: r x n) and 131x67 (right: m x r), at r = 1 and r = min(m, n);
# plus a transposed (non-contiguous) R, the CPU form of a left projection.
ADAM_SHAPES = [(1, 131), (67, 131), (131, 1), (131, 67), "transposed"]


@needs_interpreter
@pytest.mark.parametrize("state_dtype,r_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.bfloat16)], ids=["f32", "bf16", "bf16grad-f32state"])
@pytest.mark.parametrize("shape", ADAM_SHAPES, ids=str)
def test_adam_kernel_matches_reference(shape, state_dtype, r_dtype):
    check_adam(shape, state_dtype, r_dtype, "cpu")


def check_adam(shape, state_dtype, r_dtype, device):
    m_ref = torch.zeros((67, 131) if shape == "transposed" else shape, dtype=state_dtype, device=device)
    v_ref = torch.zeros_like(m_ref)
    m_tri, v_tri = m_ref.clone(), v_ref.clone()
    m_size, v_size = torch.zeros_like(m_ref, dtype=torch.float32), torch.zeros_like(m_ref, dtype=torch.float32)
    for step in range(3):  # the first step from zero moments, then the recursion
        R = randn(m_ref.shape[::-1] if shape == "transposed" else m_ref.shape, r_dtype, device, seed=step)
        R = R.t() if shape == "transposed" else R
        m_size = torch.maximum(m_size, m_ref.float().abs() + R.float().abs())
        v_size = torch.maximum(v_size, v_ref.float().abs() + R.float() ** 2)
        psi_ref = ref.adam_update(R, m_ref, v_ref, 0.9, 0.999, 1e-6)
        psi_tri = T().adam_update(R, m_tri, v_tri, 0.9, 0.999, 1e-6)
    # Errors are bounded in u of the sizes that enter each element (|m| + |r| for m, v + r² for v), not
    # of the result (m may cancel to ~0). m: each twin rounds once or twice per step (lerp, fused or not);
    # bfloat16 v: the reference rounds twice per step (mul_, addcmul_), the kernel once. Errors shrink by
    # β per step, so 3 steps add up to less than 3 per-step bounds. ψ = m / (√v + eps): m's error over
    # √v + eps, plus ψ's own roundings (3 in the reference, 1 in the kernel) and half of v's.
    u = U_ROUND[state_dtype]
    tol_m, tol_v = 6 * u * m_size, 6 * u * v_size
    denom = v_ref.float().sqrt() + 1e-6
    tol_psi = tol_m / denom + 8 * u * psi_ref.float().abs()
    for name, a, b, tol in (("m", m_ref, m_tri, tol_m), ("v", v_ref, v_tri, tol_v), ("psi", psi_ref, psi_tri, tol_psi)):
        assert b.dtype == a.dtype and b.shape == a.shape
        err = (b.float() - a.float()).abs()
        assert (err <= tol).all(), f"{name}: max err/tol {(err / tol).max():.2f}"


# ------------------------------------------------------------------------------------ (b) Fira kernels
# (m, n, r): a left projection (m < n) and a right one, each at r = 1 and r = min(m, n).
FIRA_CASES = [(67, 131, 1), (67, 131, 67), (131, 67, 1), (131, 67, 67)]


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,n,r", FIRA_CASES, ids=lambda v: str(v))
def test_fira_residual_and_limiter_match_reference(m, n, r, dtype):
    check_fira(m, n, r, dtype, "cpu")


def check_fira(m, n, r, dtype, device):
    proj, pstate, G = basis(m, n, r, dtype=dtype, device=device)
    alpha, gamma = 0.25, 1.01
    st_ref, st_tri = {}, {}
    # growth x1 (first step: not limited), x3 (limited to gamma), x0.5 (shrinking: not limited)
    for k, growth in enumerate((1.0, 3.0, 0.5)):
        G = G * growth
        R = proj.down(G, pstate)
        psi = randn(R.shape, dtype, device, seed=10 + k).abs() + 0.1  # the same ψ for both twins
        S_ref = ref.limit_norm_growth_(ref.fira_residual(G, R, psi, proj, pstate, alpha), st_ref, "n", gamma)
        S_tri = T().limit_norm_growth_(T().fira_residual(G, R, psi, proj, pstate, alpha), st_tri, "n", gamma)
        S_tri = S_tri.materialize()
        assert S_tri.dtype == S_ref.dtype and S_tri.shape == S_ref.shape
        # Elementwise bound, in u of the dtype, relative to the sizes that enter each element: the twins
        # form G − α·B(R) differently (the reference rounds B(R), α·B(R) and the difference; the kernel
        # path is one addmm), so the error scales with |G| + α|B(R)| (cancellation); φ and 1/k add a few u
        # of |S| (the reference rounds φ, D·φ and S/k; the kernel rounds S once).
        u = U_ROUND[dtype]
        phi = ref.fira_scaled_residual(torch.ones_like(G), torch.zeros_like(G), psi, R, alpha, proj.rank_axis()).float()
        size = (G.float().abs() + alpha * proj.up(R, pstate).float().abs()) * phi
        tol = 4 * u * size + 4 * u * S_ref.float().abs() + 1e-30
        err = (S_tri.float() - S_ref.float()).abs()
        assert (err <= tol).all(), f"step {k}: max err/tol {(err / tol).max():.2f}"
        # the stored norm: a sum of squares of S, so within the same relative bound as S's elements
        torch.testing.assert_close(st_tri["n"], st_ref["n"], rtol=8 * u + 1e-6, atol=0)
    assert st_ref["n"].dtype == st_tri["n"].dtype == torch.float32


# ----------------------------------------------------------------------------- (c) update epilogue
UPDATE_CASES = [  # (projector, W shape, rank, residual)
    ("svd", (131, 67), 5, None),  # right projection: the single-addmm path (no S, round to nearest)
    ("svd", (67, 131), 5, None),  # left
    ("svd-full", (67, 131), 5, None),
    ("svd", (131, 67), 5, "fira"),  # factored Fira residual through the Triton epilogue
    ("svd", (67, 131), 67, "fira"),  # left, r = min(m, n)
    ("svd", (131, 67), 1, "dense"),  # a dense residual tensor (any residual rule)
    ("identity", (67, 131), 0, None),  # unprojected matrix: epilogue with B(U) = U
    ("identity", (131,), 0, None),  # a 1-D parameter
]


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", UPDATE_CASES, ids=lambda c: f"{c[0]}-{c[1]}-r{c[2]}-{c[3]}")
def test_apply_update_matches_reference(case, dtype):
    check_update(case, dtype, "cpu")


def check_update(case, dtype, device):
    kind, shape, r, residual = case
    if kind == "identity":
        proj, pstate = IdentityProjector(shape if len(shape) == 2 else (shape[0], 1), 0, "std", {}), {}
        U = randn(shape, torch.float32, device, seed=1)
    else:
        proj, pstate, _ = basis(*shape, r, "full" if kind == "svd-full" else "std", dtype, device)
        U = randn(proj.low_rank_shape(), torch.float32, device, seed=1)
    W0 = randn(shape, dtype, device, seed=2)
    G = randn(shape, dtype, device, seed=3)
    # Unrealistically large steps, so that every term moves W by far more than the tolerance.
    step, scale, lr, wd = 0.1, 0.5, 1.0, 0.2
    S_ref = S_tri = None
    if residual == "fira":
        R = proj.down(G, pstate)
        psi = randn(R.shape, torch.float32, device, seed=4)
        st_ref, st_tri = {}, {}
        for _ in range(2):  # the second call, with G doubled, is limited: 1/k < 1
            S_ref = ref.limit_norm_growth_(ref.fira_residual(G, R, psi, proj, pstate, 0.5), st_ref, "n", 1.01)
            S_tri = T().limit_norm_growth_(T().fira_residual(G, R, psi, proj, pstate, 0.5), st_tri, "n", 1.01)
            G = G * 2
        S_ref = S_tri.materialize()  # the same S for both: this test is about the update
    elif residual == "dense":
        S_ref = S_tri = randn(shape, dtype, device, seed=5)
    W_ref, W_tri = W0.clone(), W0.clone()
    ref.apply_update(W_ref, proj, pstate, U, S_ref, step, scale, lr, wd)
    T().apply_update(W_tri, proj, pstate, U, S_tri, step, scale, lr, wd)
    # The reference rounds W after the GEMM, after adding S and after the decay; the kernel (and the
    # single addmm with beta) rounds once: 3 + 1 roundings, each within u of the larger of |W| before and
    # after. The terms' own errors are relative to their sizes, not to W (which may cancel to ~0): B(U)
    # is a GEMM, whose error is relative to |U|·|P| (summation order, and in the epilogue path B(U) is
    # rounded to W's dtype once), and S enters with its own rounding.
    u = U_ROUND[dtype]
    abs_state = {k: v.abs().float() for k, v in pstate.items()}
    sizes = scale * ref.back_project(proj, U.abs(), abs_state, torch.float32).float().reshape(shape)
    if S_ref is not None:
        sizes = sizes + S_ref.float().abs()
    tol = 4 * u * torch.maximum(W_ref.float().abs(), W0.float().abs()) + 8 * u * step * sizes + 1e-30
    err = (W_tri.float() - W_ref.float()).abs()
    assert (err <= tol).all(), f"max err/tol {(err / tol).max():.2f}"
    moved = (W_ref.float() - W0.float()).abs()
    assert moved.mean() > 5 * tol.mean()  # the update is far larger than the tolerance


# ----------------------------------------------------------------------------- stochastic rounding
def rounding_pair(dtype_shape=(67, 131), device="cpu"):
    """A bf16 W at ±1 and an update that lands a known fraction of an ulp between two bf16 values."""
    m, n = dtype_shape
    sign = torch.where(torch.arange(m * n, device=device).reshape(m, n) % 2 == 0, 1.0, -1.0)
    W = sign.to(torch.bfloat16)
    # below 1 in magnitude, bf16 values are 2^-8 apart: target |w| = 1 - f·2^-8 with f in (0, 1)
    f = torch.linspace(0.05, 0.95, m * n, device=device).reshape(m, n)
    U = sign * f * 2.0**-8 / 0.1  # step_size 0.1, scale 1
    exact = sign * (1.0 - f * 2.0**-8)  # float32, exactly representable
    return W, U, exact


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_stochastic_rounding_is_unbiased_and_stays_on_the_grid(impl):
    check_stochastic_rounding(impl, "cpu")


def check_stochastic_rounding(impl, device):
    ops = ref if impl == "torch" else T()
    proj = IdentityProjector((67, 131), 0, "std", {})
    W, U, exact = rounding_pair(device=device)
    out = W.clone()
    ops.apply_update(out, proj, {}, U, None, 0.1, 1.0, 0.0, 0.0, seed=1234)
    down = torch.sign(exact) * (1.0 - 2.0**-8)  # the two bf16 neighbours of every exact value
    up = torch.sign(exact)
    o = out.float()
    assert bool(((o == down) | (o == up)).all()), "stochastic rounding left the two neighbours"
    # P(round to the neighbour away from the lower one) = distance from it / ulp, so E[out] = exact.
    # Each element's rounding error has variance <= ulp²/4: over N elements the mean error has standard
    # deviation <= ulp / (2 √N) = 2.1e-5 here; allow 5 of them. Round-to-nearest would be off by 0.25 ulp.
    ulp, N = 2.0**-8, exact.numel()
    bias = ((o - exact) * torch.sign(exact)).mean().item()
    assert abs(bias) < 5 * ulp / (2 * math.sqrt(N)), bias
    # and per fraction: elements 5% of an ulp from "down" go up 5% of the time, at 95%: 95%
    went_up = (o == up).float().reshape(-1)
    frac = 1.0 - torch.linspace(0.05, 0.95, N, device=device)  # position above `down`, in ulps
    for lo, hi in ((0.05, 0.3), (0.7, 0.95)):
        sel = (frac >= lo) & (frac < hi)
        p, k = frac[sel].mean().item(), int(sel.sum())
        assert abs(went_up[sel].mean().item() - p) < 5 * math.sqrt(p * (1 - p) / k)
    # seeded: the same seed gives the same bits, another seed other bits
    again, other = W.clone(), W.clone()
    ops.apply_update(again, proj, {}, U, None, 0.1, 1.0, 0.0, 0.0, seed=1234)
    ops.apply_update(other, proj, {}, U, None, 0.1, 1.0, 0.0, 0.0, seed=4321)
    assert torch.equal(again, out) and not torch.equal(other, out)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_stochastic_rounding_keeps_updates_below_half_an_ulp(impl):
    """AdamW on a constant gradient moves each weight by ~lr per step; at 1.0 in bf16 that is a quarter
    of an ulp, so round-to-nearest never moves, while stochastic rounding drifts at the right rate."""
    lr, steps = 2.0**-10, 12  # bf16 ulp just below 1.0 is 2^-8
    finals = {}
    for sr in (False, True):
        torch.manual_seed(0)
        W = torch.nn.Parameter(torch.ones(32, 64, dtype=torch.bfloat16))
        opt = gradproj.GaLoreAdamW([W], lr=lr, eps=1e-12, impl=impl, stochastic_rounding=sr)
        for _ in range(steps):
            W.grad = torch.ones_like(W)  # Adam direction m̂/√v̂ = 1 exactly
            opt.step()
        finals[sr] = W.detach().float()
    assert torch.equal(finals[False], torch.ones(32, 64))  # every update lost to rounding
    drift = (1.0 - finals[True]).mean().item()  # expected lr·steps = 0.0117
    # each step's rounding error has sd <= ulp/2 per element; the mean over 2048 elements of 12 steps
    # has sd <= (2^-8/2)·√12/√2048 = 1.5e-4; allow 5 sd
    assert abs(drift - lr * steps) < 5 * 2.0**-9 * math.sqrt(steps / 2048), drift
    assert isinstance(opt.state[W][kernels.SR_SEED], int)


def test_stochastic_rounding_resumes_bit_for_bit():
    torch.manual_seed(0)
    params, loss_fn = matrix_problem([(24, 16)], seed=0, dtype=torch.bfloat16)

    def make(ps):
        return gradproj.GaLoreAdamW([{"params": ps, "rank": 4, "update_proj_gap": 3, "scale": 0.5}],
                                    lr=1e-3, stochastic_rounding=True)

    def float_loss(ps, _):
        return loss_fn(ps).float()

    opt = make(params)
    train(params, opt, 4, float_loss)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed_params = clone_params(params)
    torch.manual_seed(123)  # the global RNG differs after the "restart": the seed lives in the state
    train(params, opt, 4, float_loss)
    buf.seek(0)
    opt2 = make(resumed_params)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    train(resumed_params, opt2, 4, float_loss)
    assert torch.equal(params[0], resumed_params[0])


@needs_interpreter
def test_triton_checkpoint_resumes_bit_for_bit_and_crosses_impls():
    """Save → weights_only load → continue equals the uninterrupted run (the limiter's norm included), and a
    checkpoint written under impl='triton' loads and runs under impl='torch' (the same state layout)."""
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(24, 40, generator=g), torch.randn(24, generator=g)] for _ in range(4)]

    def make(impl):
        W = torch.nn.Parameter(torch.randn(24, 40, generator=torch.Generator().manual_seed(1)))
        b = torch.nn.Parameter(torch.zeros(24))
        opt = gradproj.FiraAdamW([{"params": [W], "rank": 4, "update_proj_gap": 3, "scale": 0.5}, {"params": [b]}],
                                 lr=1e-2, weight_decay=0.1, impl=impl)
        return [W, b], opt

    def run(ps, opt, steps):
        for gs in steps:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()

    ps, opt = make("triton")
    run(ps, opt, grads[:2])
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in ps]}, buf)
    run(ps, opt, grads[2:])
    for impl in ("triton", "torch"):
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        ps2, opt2 = make(impl)
        with torch.no_grad():
            for p, saved in zip(ps2, ckpt["params"]):
                p.copy_(saved)
        opt2.load_state_dict(ckpt["opt"])
        run(ps2, opt2, grads[2:])
        if impl == "triton":
            assert all(torch.equal(a, b) for a, b in zip(ps, ps2))
        else:  # the torch twin continues the same run, up to rounding
            for a, b in zip(ps, ps2):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- whole-optimizer trajectories
def trajectory(cls, impl, dtype, device, steps=6, lr=0.05):
    # weights at an LLM's init scale (0.02), so that in bf16 one step moves a weight by many ulps
    shapes = [(40, 24), (24, 40), (20, 12)]
    params = [torch.nn.Parameter(randn(s, dtype, device, seed=i, scale=0.02)) for i, s in enumerate(shapes)]
    bias = torch.nn.Parameter(torch.linspace(-0.02, 0.02, 24, dtype=dtype, device=device))
    groups = [{"params": params[:2], "rank": 6, "update_proj_gap": 3, "scale": 0.5},  # refreshes at 0, 3
              {"params": [params[2], bias]}]  # unprojected: a matrix and a 1-D tensor
    opt = cls(groups, lr=lr, weight_decay=0.1, impl=impl)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in [*params, bias]:  # fixed random gradients with a decaying spectrum, the same for both
            p.grad = (torch.randn(p.shape, generator=g) * torch.logspace(0, -2, p.shape[-1])).to(device, dtype)
        opt.step()
    return [p.detach() for p in [*params, bias]], opt


TRAJECTORY_OPTIMIZERS = [gradproj.GaLoreAdamW, gradproj.FiraAdamW, gradproj.FrugalAdamW]
TRAJECTORY_IDS = ["galore", "fira", "frugal"]  # frugal: the residual moves with its own step size (lr)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cls", TRAJECTORY_OPTIMIZERS, ids=TRAJECTORY_IDS)
def test_optimizer_triton_trajectory_matches_torch(cls, dtype):
    check_trajectory(cls, dtype, "cpu")


def check_trajectory(cls, dtype, device, steps=6, lr=0.05):
    start, _ = trajectory(cls, "torch", dtype, device, steps=0)
    ours, opt_t = trajectory(cls, "triton", dtype, device, steps, lr)
    theirs, opt_r = trajectory(cls, "torch", dtype, device, steps, lr)
    for a, b, w0 in zip(ours, theirs, start):
        moved = (b.float() - w0.float()).abs()
        err = (a.float() - b.float()).abs()
        if dtype == torch.float32:
            # 6 steps of per-step differences of a few u; Adam's m/√v divides by small √v, amplifying
            # them for coordinates with tiny gradients (same reasoning as test_parity): 1e-5 relative.
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            # bf16, with bf16 moments: per step the reference rounds W up to three times and the kernel
            # once (<= 2 ulp <= 4u·|W| apart), and ψ differs by a few u (the reference rounds m, v and ψ
            # after every operation), a few u of the step (~lr). The gradients are fixed, so nothing
            # pulls the two back together: the differences add up over the steps.
            w_max = torch.maximum(torch.maximum(a.float().abs(), b.float().abs()), w0.float().abs())
            tol = steps * 4 * U_ROUND[dtype] * (w_max + 2 * lr)
            assert (err <= tol).all(), f"max err/tol {(err / tol).max():.2f}"
            # and they are rounding noise: on average far below how far the weights moved
            assert err.mean() < 0.1 * moved.mean()
        assert moved.mean() > 0.01  # the trajectory went somewhere (~20x the bf16 ulp at 0.02)
    for p_t, p_r in zip(opt_t.state, opt_r.state):  # the same state layout (checkpoints interchange)
        s_t, s_r = opt_t.state[p_t], opt_r.state[p_r]
        assert s_t.keys() == s_r.keys()
        for k in s_t:
            if torch.is_tensor(s_t[k]):
                assert s_t[k].dtype == s_r[k].dtype and s_t[k].shape == s_r[k].shape, k


# --------------------------------------------------------------------------------------- real GPU
AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gradproj.kernels import adam, fira, update
from gradproj.kernels._triton_common import LAUNCH

def compile_(fn, sig, const):
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=LAUNCH).asm["ptx"]
    assert ".entry " + fn.__name__ in ptx, fn.__name__

b = "*bf16"
compile_(adam._adam_kernel, dict(R=b, M=b, V=b, PSI=b, numel="i32", one_minus_beta1="fp32", beta2="fp32",
         one_minus_beta2="fp32", eps="fp32"), dict(BLOCK=adam.BLOCK))
compile_(fira._phi_kernel, dict(PSI=b, R=b, PHI="*fp32", F="i32", K="i32", s_pf="i32", s_pk="i32", s_rf="i32",
         s_rk="i32"), dict(BLOCK_F=fira.PHI_BLOCK_F, BLOCK_K=fira.PHI_BLOCK_K))
compile_(fira._scaled_sumsq_kernel, dict(D=b, PHI="*fp32", INV_K="*fp32", PARTIAL="*fp32", M="i32", N="i32",
         s_dm="i32", s_dn="i32"), dict(HAS_PHI=True, PHI_AXIS=1, HAS_INV_K=True, BM=fira.TILE_M, BN=fira.TILE_N))
compile_(fira._limiter_kernel, dict(PARTIAL="*fp32", P="i32", PREV="*fp32", INV_K="*fp32", gamma="fp32"),
         dict(HAS_PREV=True, BLOCK=fira.SUM_BLOCK))
compile_(fira._axis_sumsq_kernel, dict(X="*fp32", SSQ="*fp32", SCALE="*fp32", M="i32", N="i32", s_m="i32",
         s_n="i32"), dict(AXIS=0, BM=fira.TILE_M, BN=fira.TILE_N))
compile_(fira._axis_sumsq_kernel, dict(X="*fp32", SSQ="*fp32", SCALE="*fp32", M="i32", N="i32", s_m="i32",
         s_n="i32"), dict(AXIS=1, BM=fira.TILE_M, BN=fira.TILE_N))
compile_(update._update_kernel, dict(W=b, BU=b, S=b, PHI="*fp32", INV_K="*fp32", M="i32", N="i32", s_wm="i32",
         s_wn="i32", s_bm="i32", s_bn="i32", s_sm="i32", s_sn="i32", step="fp32", scale="fp32", res_step="fp32", decay="fp32",
         seed="i32"), dict(HAS_S=True, HAS_PHI=True, PHI_AXIS=0, HAS_INV_K=True, STOCHASTIC=True,
         BM=update.TILE_M, BN=update.TILE_N))
print("compiled")
"""


@pytest.mark.skipif(not have_triton(), reason="triton not installed")
def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter runs the kernels' Python; this compiles them to PTX for sm_90 (no GPU needed), so
    type errors that only the compiler sees (integer widths, constexpr branches) fail here too."""
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this triton has no ahead-of-time compile API: {err}")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@gpu
@compiled_only
@pytest.mark.parametrize("shape", [(1, 3000), (1024, 3000), (3000, 1024)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_adam_kernel(shape, dtype):
    check_adam(shape, dtype, dtype, "cuda")


@gpu
@compiled_only
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,n,r", [(1024, 3000, 128), (3000, 1024, 128), (257, 515, 257)], ids=str)
def test_gpu_fira_kernels(m, n, r, dtype):
    check_fira(m, n, r, dtype, "cuda")


@gpu
@compiled_only
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [("svd", (1024, 3000), 64, "fira"), ("svd", (3000, 1024), 64, "dense"),
                                  ("svd", (3000, 1024), 64, None), ("identity", (1000, 3001), 0, None),
                                  ("identity", (4097,), 0, None)], ids=lambda c: f"{c[0]}-{c[1]}-{c[3]}")
def test_gpu_apply_update(case, dtype):
    check_update(case, dtype, "cuda")


@gpu
@compiled_only
def test_gpu_stochastic_rounding():
    check_stochastic_rounding("triton", "cuda")
    check_stochastic_rounding("torch", "cuda")


@gpu
@compiled_only
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cls", TRAJECTORY_OPTIMIZERS, ids=TRAJECTORY_IDS)
def test_gpu_trajectory(cls, dtype):
    check_trajectory(cls, dtype, "cuda")


@gpu
@compiled_only
def test_gpu_auto_picks_triton():
    assert kernels.resolve("auto", torch.zeros(2, device="cuda")) is T()
    assert kernels.resolve("auto", torch.zeros(2, device="cuda", dtype=torch.float64)) is ref

