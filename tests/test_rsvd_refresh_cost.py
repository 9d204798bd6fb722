"""The cheaper warm randomized-SVD refresh: block Gram–Schmidt for the warm start, the float32 Ritz eigensolver and
the power iteration's G Z in bfloat16 where ``proj_dtype="auto"`` chose bfloat16 for the matrix.

Each is checked against an independent float64 computation (the same algorithm with a full Householder QR and a
float64 eigensolver), with tolerances derived from float32's (or bfloat16's) unit roundoff below."""

import importlib

import pytest
import torch

from gradproj.projectors import get_projector, randomized_svd
from gradproj.projectors.base import AUTO_KEY
from gradproj.projectors.linalg import (
    extend_orthonormal,
    finite_flag,
    in_safe_range,
    orthonormalize,
    top_eigenvectors,
)

# the module (the package exports the function under the module's name)
rsvd_module = importlib.import_module("gradproj.projectors.randomized_svd")
EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7


def orthonormal(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def spectrum_matrix(m, n, s, seed):
    """m x n float64 matrix with singular values ``s`` (length min(m, n)) and random singular vectors."""
    return (orthonormal(m, len(s), seed) * s) @ orthonormal(n, len(s), seed + 1).T


def projector_distance(P, Q):
    """Spectral norm of P Pᵀ - Q Qᵀ: the sine of the largest principal angle between the column spans."""
    P, Q = P.double(), Q.double()
    return torch.linalg.matrix_norm(P @ P.T - Q @ Q.T, ord=2).item()


def test_extend_orthonormal_is_orthonormal_even_when_the_fresh_block_lies_almost_in_the_span():
    d, r, p = 300, 40, 8
    g = torch.Generator().manual_seed(0)
    S = orthonormal(d, r, 1).float()
    # fresh columns 1e-5 away from S's span: one projection leaves components of about
    # eps·‖X‖/‖(I - S Sᵀ) X‖ ~ 1e-7 · 6 / 1.7e-4 ~ 4e-3 in S's span (classical Gram–Schmidt's loss)
    X = (S @ torch.randn(r, p, generator=g) + 1e-5 * torch.randn(d, p, generator=g)).float()
    Z = extend_orthonormal(S, X)
    assert Z.shape == (d, r + p)
    assert torch.equal(Z[:, :r], S)  # the previous basis is kept as it is
    # float32 inner products of length d carry at most d·eps relative error (γ_d); two projections leave
    # the block orthogonal to S, and the QR orthonormal, to a small multiple of that (Giraud et al. 2005)
    tol = 2 * d * EPS32  # 7e-5
    err = (Z.T @ Z - torch.eye(r + p)).abs().max().item()
    assert err <= tol, err
    # the check separates: a single projection is not enough here
    once = torch.cat([S, orthonormalize(X - S @ (S.T @ X))], dim=1)
    assert (once.T @ once - torch.eye(r + p)).abs().max().item() > tol


def test_extend_orthonormal_spans_what_the_qr_of_the_whole_block_spans():
    d, r, p = 300, 40, 8
    g = torch.Generator().manual_seed(1)
    S = orthonormal(d, r, 2).float()
    X = torch.randn(d, p, generator=g)
    Z = extend_orthonormal(S, X)
    reference = torch.linalg.qr(torch.cat([S, X], dim=1).double())[0]  # float64 Householder QR of the same data
    # the fresh directions are determined by (I - S Sᵀ) X, whose float32 rounding is about d·eps·‖X‖: relative
    # to its smallest singular value, that is the angle the span may move by
    Xd = X.double()
    perp = Xd - S.double() @ (S.double().T @ Xd)
    kappa = (torch.linalg.matrix_norm(Xd, ord=2) / torch.linalg.svdvals(perp)[-1]).item()
    assert projector_distance(Z, reference) <= 2 * d * EPS32 * kappa


def reference_warm_rsvd(A, rank, start, generator, oversample=8):
    """The same warm-started subspace iteration (q = 1) in float64 with a full QR of [start | Aᵀ Ω']."""
    A = A.double()
    m = A.shape[0]
    k = rank + oversample
    omega = torch.randn(m, k - start.shape[1], generator=generator).double()
    Z = torch.linalg.qr(torch.cat([start.double(), A.T @ omega], dim=1))[0]
    Z = torch.linalg.qr(A.T @ (A @ Z))[0]
    Y = A @ Z
    _, W = torch.linalg.eigh(Y.T @ Y)
    return Z @ W.flip(1)[:, :rank]


@pytest.mark.parametrize("shape", [(260, 180), (180, 180)])
def test_warm_randomized_svd_matches_the_float64_full_qr_iteration(shape):
    m, n = shape
    r = 24
    # a gap at r (σ_r = 0.5, σ_{r+1} = 0.25), so that the top-r subspace is well determined
    s = torch.cat([torch.linspace(1, 0.5, r), 0.25 * torch.linspace(1, 0.01, min(m, n) - r)]).double()
    A = spectrum_matrix(m, n, s, seed=3)
    previous = A + 0.3 * spectrum_matrix(m, n, s, seed=5)
    start = torch.linalg.svd(previous)[2][:r].T.float()
    _, Vh = randomized_svd(A.float(), r, generator=torch.Generator().manual_seed(7), start=start)
    ref = reference_warm_rsvd(A, r, start, torch.Generator().manual_seed(7))
    # float32 rounding perturbs AᵀA by about n·eps·σ_1² (inner products of length n, ‖A‖ = σ_1 = 1); by
    # Davis–Kahan the top-r subspace of the Ritz problem then moves by at most that over σ_r² - σ_{r+1}² = 0.1875
    tol = 4 * n * EPS32 / (0.5**2 - 0.25**2)
    assert projector_distance(Vh.T, ref) <= tol
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(r), rtol=0, atol=2 * n * EPS32)


def spectrum_problem(m, n, r, decay, warm, seed):
    """Singular values σ_i = i^-decay, an m x n matrix with them (``seed``), and for a warm start the top-r right
    singular vectors of a perturbed copy (``seed + 2``) as columns, else None."""
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -decay
    A = spectrum_matrix(m, n, s, seed=seed)
    start = torch.linalg.svd(A + 0.3 * spectrum_matrix(m, n, s, seed=seed + 2))[2][:r].T.float() if warm else None
    return s, A, start


def energy(A, Vh):
    return (A.double() @ Vh.double().T).square().sum().item()


@pytest.mark.parametrize("decay", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("warm", [False, True])
def test_float32_ritz_solve_captures_the_float64_solves_energy(decay, warm):
    m, n, r = 240, 160, 24
    _, A, start = spectrum_problem(m, n, r, decay, warm, seed=11)
    run = lambda dtype: randomized_svd(  # noqa: E731
        A.float(), r, generator=torch.Generator().manual_seed(0), start=start, solve_dtype=dtype
    )[1]
    e32, e64 = energy(A, run(torch.float32)), energy(A, run(torch.float64))
    # the float32 eigensolver's error moves each Ritz vector by about eps·σ_1²/gap, which costs at most about
    # eps·σ_1² of captured energy per vector: k·eps·σ_1² in all, k = r + 8 (σ_1 = 1)
    assert abs(e32 - e64) <= (r + 8) * EPS32


@pytest.mark.parametrize("decay", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("warm", [False, True])
def test_bfloat16_power_iteration_keeps_the_captured_energy(decay, warm):
    m, n, r = 300, 200, 32
    s, A, start = spectrum_problem(m, n, r, decay, warm, seed=21)
    best = (s[:r] ** 2).sum().item()
    run = lambda dtype: randomized_svd(  # noqa: E731
        A.float(), r, generator=torch.Generator().manual_seed(0), start=start, power_dtype=dtype
    )[1]
    low, full = run(torch.bfloat16), run(None)
    # the acceptance criterion for the bfloat16 G Z (docs/bases.md): within 1e-4 of the float32 iteration's
    # captured energy. Its rounding (2^-8 relative per product) reaches the subspace multiplied by Gᵀ, which
    # damps it by σ_i in direction i; rounding Gᵀ (G Z) as well measured up to 3e-4 on recorded gradients
    assert (energy(A, full) - energy(A, low)) / best <= 1e-4
    assert torch.equal(low, run(torch.bfloat16))  # deterministic
    torch.testing.assert_close(low @ low.T, torch.eye(r), rtol=0, atol=2 * n * EPS32)  # still orthonormal


@pytest.mark.parametrize(
    "group,code,expected",
    [
        ({"proj_dtype": "auto"}, 1, torch.bfloat16),
        ({"proj_dtype": "auto"}, 2, torch.bfloat16),  # bfloat16 inputs: operands rounded to bfloat16 too
        ({"proj_dtype": "auto"}, 0, None),
        ({"proj_dtype": "auto"}, None, None),  # no decision (made after the first refresh)
        ({"proj_dtype": None}, 1, None),  # a decision "auto" no longer applies to
        ({"proj_dtype": "bfloat16"}, None, torch.bfloat16),  # what "auto" runs when it chose bfloat16
        ({"proj_dtype": "float16"}, None, None),  # G's range need not fit float16
        ({"proj_dtype": "auto", "residual": "fira"}, 1, None),
        ({"proj_dtype": "auto", "rsvd_warm_start": False}, 1, None),  # cold refreshes stay float32
    ],
)
def test_a_warm_refresh_s_power_iteration_follows_the_matrix_s_gemm_dtype(monkeypatch, group, code, expected):
    seen = []
    real = rsvd_module.randomized_svd

    def spy(*args, **kwargs):
        seen.append(kwargs["power_dtype"])
        return real(*args, **kwargs)

    monkeypatch.setattr(rsvd_module, "randomized_svd", spy)
    g = torch.Generator().manual_seed(0)
    proj = get_projector("randomized_svd")((40, 30), 4, "std", {"update_proj_gap": 1, **group})
    proj.param_index = 0
    state = {} if code is None else {AUTO_KEY: code}
    state.update(proj.compute_basis(torch.randn(40, 30, generator=g), state, 0))  # the first, cold refresh
    assert proj.compute_basis(torch.randn(40, 30, generator=g), state, 1) is not None  # warm, where allowed
    assert seen == [None, expected]


def test_a_non_finite_float32_ritz_solve_falls_back_to_float64(monkeypatch):
    real = torch.linalg.eigh

    def broken(C):  # a float32 solve that returns NaN instead of raising
        values, vectors = real(C)
        return (values * float("nan"), vectors) if C.dtype == torch.float32 else (values, vectors)

    C = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    values, vectors = top_eigenvectors(C, 2, torch.float32)
    torch.testing.assert_close(values, torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(vectors, torch.eye(3)[:, :2])


def test_the_bfloat16_copy_of_g_reuses_the_projection_buffer_in_g_s_layout():
    G = torch.randn(30, 50, generator=torch.Generator().manual_seed(0))
    for A in (G, G.t()):  # a right basis decomposes G, a left one Gᵀ (a transposed view)
        low = rsvd_module.low_copy(A, torch.bfloat16)
        assert torch.equal(low, A.to(torch.bfloat16)) and low.stride() == A.stride()
        again = rsvd_module.low_copy(A * 2, torch.bfloat16)
        assert again.data_ptr() == low.data_ptr() and torch.equal(again, (A * 2).to(torch.bfloat16))


@pytest.mark.parametrize("scale", [1.0, 2.0**40, 2.0**-40])  # in range (used as is), above and below it (rescaled)
def test_in_safe_range_reads_a_transposed_view_like_its_contiguous_copy(scale):
    G = torch.randn(20, 30, generator=torch.Generator().manual_seed(0)) * scale
    A = G.t()  # what a left basis decomposes
    out, ref = in_safe_range(A), in_safe_range(A.contiguous())
    assert torch.equal(out, ref)
    assert (out is A) == (scale == 1.0)  # no copy where no rescaling is needed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_finiteness_check_answers_as_the_elementwise_one(dtype):
    """finite_flag (a sum first, the elementwise check only when the sum is not finite) against
    torch.isfinite(t).all(): NaN, +Inf, -Inf, +Inf with -Inf (a NaN sum), and finite elements whose sum
    overflows (the elementwise check then decides: finite)."""
    big = torch.finfo(dtype).max
    base_t = torch.randn(64, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    cases = {"finite": base_t.clone(), "overflowing sum": torch.full((64, 48), big, dtype=dtype)}
    for name, values in (
        ("nan", [float("nan")]),
        ("inf", [float("inf")]),
        ("-inf", [float("-inf")]),
        ("inf and -inf", [float("inf"), float("-inf")]),
    ):
        t = base_t.clone()
        for k, x in enumerate(values):
            t[5 + k, 7] = x
        cases[name] = t
    for name, t in cases.items():
        assert bool(finite_flag(t)) == bool(torch.isfinite(t).all()), name
    assert bool(finite_flag(cases["overflowing sum"])) and not bool(finite_flag(cases["nan"]))
