"""Large finite gradients: norms that do not overflow, Fira through a ×1e20 spike (against fira 1.0.2), the
Triton twins under the same spike, bases of huge and tiny gradients, and a failing decomposition.

A float32 entry above ~1.8e19 squares to inf; ``torch.linalg.vector_norm`` sums squares, so the norm of
such a tensor is inf although the norm itself (~1e21) is representable, and a ratio of two such norms NaN.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings

import pytest
import torch

import gradproj
from gradproj import kernels
from gradproj.kernels import reference as ref
from gradproj.projectors import BasisDecompositionError, BasisRefreshWarning, NonFiniteGradientError, get_projector
from problems import direct_svd_projector

EPS32 = torch.finfo(torch.float32).eps
SPIKE = 1e20


# ------------------------------------------------------------------------------------------ norms
def test_vector_norm_overflows_where_safe_norm_does_not():
    x = torch.full((16,), 1e20)
    assert torch.isinf(torch.linalg.vector_norm(x))  # what the fix is about: the squares overflow
    assert math.isclose(float(ref.safe_norm(x)), 4e20, rel_tol=2 * EPS32)


@pytest.mark.parametrize("dim", [None, 0, 1])
def test_safe_norm_matches_float64_on_huge_and_mixed_rows(dim):
    """Rows from 1e-15 to 1e30 (below ~1e-19 the squares underflow, as in vector_norm: not an overflow)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 7, generator=g) * torch.logspace(-15, 30, 9)[:, None]
    got = ref.safe_norm(x, dim, keepdim=dim is not None)
    exact = torch.linalg.vector_norm(x.double(), dim=dim, keepdim=dim is not None)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert torch.isfinite(got).all()
    # one rounding per square and per addition (7 or 9 of them), plus the sqrt: a few u of the result
    torch.testing.assert_close(got.double(), exact, rtol=16 * EPS32, atol=0)


@pytest.mark.parametrize("dim", [None, 0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scaled_norm_has_the_bits_of_the_plain_norm_on_ordinary_inputs(dim, dtype):
    """The path taken where the plain norm overflowed (and always off the CPU) divides by powers of two: where
    nothing overflows it returns the very bits of vector_norm, so safe_norm is the same function everywhere."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(33, 20, generator=g, dtype=torch.float64) * 3.0).to(dtype)
    acc = ref.accumulation_dtype(x)
    for keepdim in (False, True):
        assert torch.equal(ref.scaled_norm(x, dim, keepdim, acc), ref.plain_norm(x, dim, keepdim, acc))


def test_safe_norm_keeps_inf_and_nan():
    assert torch.isinf(ref.safe_norm(torch.tensor([1.0, float("inf")])))
    assert torch.isnan(ref.safe_norm(torch.tensor([1e30, float("nan")])))


def test_limiter_stores_a_finite_norm_when_the_ratio_overflows():
    """k = max(‖S‖/(N + 1e-8), γ)/γ is inf for ‖S‖ = 1e38 over N = 0: S is scaled to 0, and N becomes
    γ·(N + 1e-8) (what ‖S‖/k equals), not inf/inf = NaN."""
    state = {"n": torch.tensor(0.0)}
    k = ref.norm_growth_divisor(torch.tensor(1e38), state, "n", 1.01)
    assert torch.isinf(k) and float(1.0 / k) == 0.0
    assert math.isclose(float(state["n"]), 1.01e-8, rel_tol=1e-6)
    k = ref.norm_growth_divisor(torch.tensor(5e-9), state, "n", 1.01)  # shrinking: not limited
    assert float(k) == 1.0 and float(state["n"]) == pytest.approx(5e-9)


# ----------------------------------------------------------------------------- Fira through a spike
def quadratic_run(make, spike, steps, shape=(24, 16), t_spike=10):
    """min ½‖W − T‖² from W = 0 with a little gradient noise; the gradient of step ``t_spike`` times ``spike``.
    Returns the losses, the weights after each step and the optimizer's state of W."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(*shape, generator=g)
    W = torch.nn.Parameter(torch.zeros(*shape))
    opt = make(W)
    losses, weights = [], []
    for t in range(steps):
        G = (W.detach() - target) + 0.01 * torch.randn(*shape, generator=g)
        W.grad = G * (spike if t == t_spike else 1.0)
        opt.step()
        weights.append(W.detach().clone())
        losses.append(0.5 * float((W.detach() - target).square().sum()))
    return losses, weights, opt.state[W]


def fira_group(path, **extra):
    projector = direct_svd_projector() if path == "direct" else "svd"
    return {"rank": 4, "update_proj_gap": 5, "scale": 1.0, "projector": projector, **extra}


@pytest.mark.skipif(importlib.util.find_spec("fira") is None, reason="fira not installed")
@pytest.mark.parametrize("limit", [None, 1.01], ids=["fira", "fira+norm_growth_limit"])
@pytest.mark.parametrize("path", ["factored", "direct"])
def test_fira_survives_a_gradient_spike_like_fira_1_0_2(path, limit):
    """A finite ×1e20 gradient spike: every later step and every piece of state stays finite, as with fira
    1.0.2 (whose overflowing norms happen to give 0, not NaN). Before the fix the factored norm was inf − inf
    and the limiter's stored norm inf/inf, so every step after the spike was NaN."""
    import fira

    def ours(W):
        return gradproj.FiraAdamW([{"params": [W], **fira_group(path)}], lr=1e-2, norm_growth_limit=limit)

    def original(W):
        group = {"rank": 4, "update_proj_gap": 5, "alpha": 1.0, "proj_type": "std"}
        return fira.FiraAdamW([{"params": [W], **group}], lr=1e-2, no_deprecation_warning=True)

    states = {}
    for make in (ours, original):
        losses, weights, states[make] = quadratic_run(make, SPIKE, steps=30)
        assert all(torch.isfinite(w).all() for w in weights), make.__name__
        assert all(math.isfinite(x) for x in losses), make.__name__
        for name, value in states[make].items():
            if torch.is_tensor(value):
                assert torch.isfinite(value).all(), (make.__name__, name)
    # the limiter's norm is back at the size of ordinary residuals (fira 1.0.2's restarts from 0 at the spike)
    assert 1e-3 < float(states[ours]["residual_norm"]) < 1e3
    assert float(states[original]["scaling_grad"]) >= 0.0
    if limit is not None:
        assert 0.0 < float(states[ours]["update_norm"]) < 1e3


@pytest.mark.parametrize("path", ["factored", "direct"])
def test_fira_recovers_from_a_spike_once_the_moments_restart(path):
    """A ×1e20 spike leaves Adam's second moment ~1e37, which freezes any Adam (torch.optim.AdamW too) until
    the moments restart. With ``moments_on_refresh="reset"`` they restart at the next refresh, and the run
    must then train as if the spike had not happened (before the fix: NaN from the spike on)."""
    def make(W):
        return gradproj.FiraAdamW([{"params": [W], **fira_group(path, moments_on_refresh="reset")}], lr=1e-2)

    clean, _, _ = quadratic_run(make, 1.0, steps=200)
    spiked, weights, state = quadratic_run(make, SPIKE, steps=200)
    assert all(torch.isfinite(w).all() for w in weights)
    assert spiked[-1] < 0.15 * spiked[10]  # trained down after the spike
    assert spiked[-1] < 1.1 * clean[-1]  # close to the run without the spike
    assert math.isfinite(float(state["residual_norm"]))


def test_fira_factored_norm_of_a_spike_matches_the_materialised_one():
    """The factored path's ‖S‖ (from row norms of G and R) on a ×1e20 gradient is the norm of the dense S,
    computed in float64, to float32 rounding of the basis (with α = 0.5 nothing cancels)."""
    g = torch.Generator().manual_seed(2)
    G = torch.randn(40, 24, generator=g) * SPIKE
    proj = get_projector("svd")((40, 24), 5, "std", {"update_proj_gap": 10})
    state = {}
    proj.refresh(torch.randn(40, 24, generator=g), state, 0)
    R = proj.down(G, state)
    psi = torch.randn(R.shape, generator=g)
    phi, norm = ref.fira_residual_factors(G, R, psi, 0.5, proj.rank_axis())
    assert torch.isfinite(phi).all() and torch.isfinite(norm)
    S = (G.double() - 0.5 * proj.up(R, state).double()) * phi.double()
    torch.testing.assert_close(norm.double(), torch.linalg.vector_norm(S), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- Triton twins, interpreted
needs_interpreter = pytest.mark.skipif(
    not (kernels.triton_import_error() is None and kernels.interpreter_requested()),
    reason="needs triton and TRITON_INTERPRET=1 (tests/conftest.py sets it) to run the kernels on the CPU",
)


@needs_interpreter
@pytest.mark.parametrize("side", ["std", "reverse_std"])
def test_triton_fira_kernels_through_a_spike_match_the_reference(side):
    """φ, the tile sums of squares and the limiter under a ×1e20 gradient: finite, and the twins agree to the
    bounds of tests/test_kernels.py (a few u of |S| and of the stored norm)."""
    T = kernels.load_triton_ops()
    g = torch.Generator().manual_seed(3)
    G = torch.randn(70, 45, generator=g)
    proj = get_projector("svd")((70, 45), 5, side, {"update_proj_gap": 10})
    pstate = {}
    proj.refresh(G, pstate, 0)
    st_ref, st_tri = {}, {}
    for k, growth in enumerate((1.0, SPIKE, 1.0 / SPIKE)):  # ordinary, spike (limited), back to ordinary
        G = G * growth
        R = proj.down(G, pstate)
        psi = torch.randn(R.shape, generator=g).abs() + 0.1
        S_ref = ref.limit_norm_growth_(ref.fira_residual(G, R, psi, proj, pstate, 0.5), st_ref, "n", 1.01)
        S_tri = T.limit_norm_growth_(T.fira_residual(G, R, psi, proj, pstate, 0.5), st_tri, "n", 1.01)
        S_tri = S_tri.materialize()
        assert torch.isfinite(S_tri).all() and torch.isfinite(S_ref).all(), k
        assert torch.isfinite(st_tri["n"]) and torch.isfinite(st_ref["n"]), k
        # the elementwise bound of test_kernels.check_fira, with |G| + α|B(R)| scaled by φ/k
        phi = ref.fira_scaled_residual(torch.ones_like(G), torch.zeros_like(G), psi, R, 0.5, proj.rank_axis())
        unlimited = ref.fira_residual(G, R, psi, proj, pstate, 0.5).double()
        k_ref = torch.linalg.vector_norm(unlimited) / torch.linalg.vector_norm(S_ref.double())  # the limiter's k
        size = (G.abs() + 0.5 * proj.up(R, pstate).abs()).double() * phi.double() / k_ref
        tol = 4 * EPS32 * size + 4 * EPS32 * S_ref.double().abs() + 1e-30
        assert ((S_tri.double() - S_ref.double()).abs() <= tol).all(), k
        torch.testing.assert_close(st_tri["n"], st_ref["n"], rtol=8 * EPS32 + 1e-6, atol=0)


@needs_interpreter
def test_triton_phi_of_a_spike_is_finite_and_matches_the_reference():
    T = kernels.load_triton_ops()
    g = torch.Generator().manual_seed(4)
    R = torch.randn(37, 6, generator=g) * torch.logspace(-20, 30, 37)[:, None]
    psi = torch.randn(37, 6, generator=g)
    phi_tri = T.fira_scaled_residual(torch.ones(37, 9), torch.zeros(37, 9), psi, R, 1.0, 1).phi
    phi_ref = ref.fira_scaled_residual(torch.ones(37, 9), torch.zeros(37, 9), psi, R, 1.0, 1)[:, 0]
    assert torch.isfinite(phi_tri).all() and (phi_tri[-10:] > 0).all()  # overflowing ‖R‖ used to give φ = 0
    torch.testing.assert_close(phi_tri, phi_ref, rtol=8 * EPS32, atol=0)


@needs_interpreter
@pytest.mark.parametrize("axis", [0, 1])
def test_triton_axis_norms_match_float64_on_huge_and_ordinary_entries(axis):
    """Rows (or columns) from 1e-15 to 1e30, strided and contiguous, across several tiles."""
    from gradproj.kernels.fira import axis_norms

    g = torch.Generator().manual_seed(6)
    x = torch.randn(70, 300, generator=g) * torch.logspace(-15, 30, 70)[:, None]
    for X in (x, x.t().contiguous().t()):  # row-major and column-major storage
        got = axis_norms(X, axis)
        exact = torch.linalg.vector_norm(X.double(), dim=axis, keepdim=True)
        assert got.shape == exact.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), exact, rtol=16 * EPS32, atol=0)


@needs_interpreter
@pytest.mark.parametrize("side", ["std", "reverse_std"])
@pytest.mark.parametrize("magnitude", [1.0, SPIKE], ids=["ordinary", "spike"])
def test_triton_fira_residual_factors_match_the_reference(side, magnitude):
    T = kernels.load_triton_ops()
    g = torch.Generator().manual_seed(7)
    G = torch.randn(70, 45, generator=g)
    proj = get_projector("svd")((70, 45), 5, side, {"update_proj_gap": 10})
    pstate = {}
    proj.refresh(G, pstate, 0)
    G = G * magnitude
    R = proj.down(G, pstate)
    psi = torch.randn(R.shape, generator=g)
    for alpha in (1.0, 0.5):
        phi_t, norm_t = T.fira_residual_factors(G, R, psi, alpha, proj.rank_axis())
        phi_r, norm_r = ref.fira_residual_factors(G, R, psi, alpha, proj.rank_axis())
        assert torch.isfinite(phi_t).all() and torch.isfinite(norm_t)
        torch.testing.assert_close(phi_t, phi_r, rtol=16 * EPS32, atol=0)
        # with α = 1 the residual's norm is a difference of nearly equal squares: a few u of ‖G‖, not of itself
        scale = float(ref.safe_norm(G * phi_r)) if alpha == 1.0 else float(norm_r)
        assert abs(float(norm_t) - float(norm_r)) <= 64 * EPS32 * scale


# ----------------------------------------------------------------------------------------- bases
SIGMA = (10.0, 9.0, 8.0, 7.0, 6.0, 1.0, 0.5)  # rank 7, top r = 5 separated by a gap 6 → 1
RANK = 5


def gapped_matrix(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(SIGMA), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(SIGMA), generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(SIGMA, dtype=torch.float64)) @ V.T


def subspace_projectors(name, G, proj_type):
    proj = get_projector(name)(tuple(G.shape), RANK, proj_type, {"update_proj_gap": 1})
    state = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no refresh may fall back on anything
        assert proj.refresh(G, state, 0)
    out = {}
    for side, P in proj.basis_matrices(state).items():
        P = P.double()
        out[side] = P @ P.T if side == "left" else P.T @ P  # the orthogonal projector onto the subspace
    return out


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("magnitude", [1e30, 1e-30], ids=["1e30", "1e-30"])
@pytest.mark.parametrize("name", ["eigh", "randomized_svd"])
def test_gram_bases_of_huge_and_tiny_gradients_match_svd(name, magnitude, proj_type):
    """Entries ~1e30 (finite in float32) overflow G Gᵀ, entries ~1e-30 underflow it; the bases rescale G first
    and find the same subspace as ``svd``. Tolerance: the Gram route perturbs the squared spectrum by ~u·σ₁²
    against a gap σ_r² − σ_{r+1}², the SVD its spectrum by ~u·σ₁ against σ_r − σ_{r+1} (Davis–Kahan / Wedin),
    with a factor 64 for the dimension-dependent rounding of the products (n <= 48)."""
    G = (gapped_matrix(48, 20) * magnitude).float()
    assert torch.isfinite(G).all() and (G.abs().max() > 1e29 if magnitude > 1 else G.abs().max() < 1e-29)
    s1, sr, sr1 = SIGMA[0], SIGMA[RANK - 1], SIGMA[RANK]
    tol = 64 * EPS32 * (s1**2 / (sr**2 - sr1**2) + s1 / (sr - sr1))
    expected = subspace_projectors("svd", G, proj_type)
    got = subspace_projectors(name, G, proj_type)
    assert got.keys() == expected.keys()
    for side in got:
        err = torch.linalg.matrix_norm(got[side] - expected[side], ord=2)  # ‖sin Θ‖ between the subspaces
        assert err <= tol, (side, float(err), tol)


@pytest.mark.parametrize("name", ["svd", "eigh", "randomized_svd"])
def test_a_large_finite_gradient_trains_with_every_exact_basis(name):
    """Through the optimizer: the first refresh of a 1e25-scaled gradient succeeds and the weights stay finite."""
    W = torch.nn.Parameter(torch.randn(24, 16))
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 4, "update_proj_gap": 2, "scale": 1.0, "projector": name}],
                               lr=1e-2)
    g = torch.Generator().manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BasisRefreshWarning)
        for t in range(4):
            W.grad = torch.randn(24, 16, generator=g) * (1e25 if t == 0 else 1.0)
            opt.step()
    assert torch.isfinite(W).all() and torch.isfinite(opt.state[W]["proj"]).all()


# ----------------------------------------------------------------------------- failed decompositions
def failing(*args, **kwargs):
    raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")


FAILING = {"svd": "svd", "eigh": "eigh", "randomized_svd": "qr"}  # the torch.linalg function each one needs


@pytest.mark.parametrize("name", list(FAILING))
def test_failed_decomposition_at_the_first_refresh_raises_basis_decomposition_error(name, monkeypatch):
    proj = get_projector(name)((40, 24), 5, "std", {"update_proj_gap": 1})
    G = torch.randn(40, 24)
    monkeypatch.setattr(torch.linalg, FAILING[name], failing)
    with pytest.raises(BasisDecompositionError, match=r"40x24 parameter .* first basis refresh \(step 0\)") as info:
        proj.refresh(G, {}, 0)
    assert not isinstance(info.value, NonFiniteGradientError)  # the gradient is finite: not that error
    assert "simulated" in str(info.value) and "max_grad_norm" in str(info.value)
    assert isinstance(info.value.__cause__, torch.linalg.LinAlgError)


@pytest.mark.parametrize("name", list(FAILING))
def test_failed_decomposition_later_keeps_the_previous_basis_and_warns_once(name, monkeypatch, caplog):
    proj = get_projector(name)((40, 24), 5, "std", {"update_proj_gap": 1})
    state = {}
    proj.refresh(torch.randn(40, 24), state, 0)
    basis = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    monkeypatch.setattr(torch.linalg, FAILING[name], failing)
    with caplog.at_level(logging.WARNING, logger="gradproj"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: a warning shown once per text and place
        for step in (1, 2):
            assert proj.refresh(torch.randn(40, 24), state, step) is False
    kept = [w for w in caught if issubclass(w.category, BasisRefreshWarning)]
    assert len(kept) == 1 and "keeping the previous basis" in str(kept[0].message)  # once per cause
    assert caplog.text.count("keeping the previous basis") == 2  # every occurrence is logged...
    assert "40x24, step 2" in caplog.text  # ... with the parameter's shape and the step
    for k, v in basis.items():
        assert torch.equal(state[k], v), k


def test_failed_decomposition_in_the_optimizer(monkeypatch):
    """The first step raises BasisDecompositionError (exported from gradproj); a later failing refresh keeps
    the basis and training goes on."""
    W = torch.nn.Parameter(torch.randn(24, 16))
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 4, "update_proj_gap": 2, "scale": 1.0, "projector": "eigh"}],
                               lr=1e-2)
    W.grad = torch.randn(24, 16)
    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "eigh", failing)
        with pytest.raises(gradproj.BasisDecompositionError, match="24x16"):
            opt.step()
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 4, "update_proj_gap": 2, "scale": 1.0, "projector": "eigh"}],
                               lr=1e-2)
    opt.step()
    opt.step()
    basis = opt.state[W]["proj"].clone()
    before = W.detach().clone()
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.warns(gradproj.BasisRefreshWarning, match="eigendecomposition of the Gram matrix failed"):
        opt.step()  # step count 2: a refresh
    assert torch.equal(opt.state[W]["proj"], basis)
    assert torch.isfinite(W).all() and not torch.equal(W.detach(), before)


def test_errors_are_exported_side_by_side():
    assert gradproj.BasisDecompositionError is gradproj.projectors.BasisDecompositionError
    assert gradproj.NonFiniteGradientError is gradproj.projectors.NonFiniteGradientError
    assert issubclass(gradproj.BasisDecompositionError, ValueError)
    assert not issubclass(gradproj.BasisDecompositionError, gradproj.NonFiniteGradientError)
    assert issubclass(gradproj.BasisRefreshWarning, RuntimeWarning)
