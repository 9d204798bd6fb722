"""The subspace bases other than the exact SVD: training, subspace quality, determinism, state, moment projection.

Captured energy of a basis is ‖Pᵀ G‖² (left), ‖G Pᵀ‖² (right) or ‖Pₗᵀ G Pᵣᵀ‖² (full); the exact top-r
subspace captures Σ_{i<=r} σ_i². Tolerances used below (documented in docs/bases.md):

* ``eigh``: the exact subspace, energy ratio >= 1 - 1e-5 and the projector PPᵀ within 1e-3 of the SVD's
  when the spectrum has a gap at r.
* ``randomized_svd`` (defaults p = 8, q = 1): ratio >= 0.99 on a spectrum σ_i = i^-1; a warm start from
  the exact basis stays exact (>= 1 - 1e-5).
* ``dct`` with ℓ2 scores: the best r DCT directions, i.e. exactly the r largest column energies of S.
* ``random``: an orthonormal random basis captures r/d of ‖G‖² in expectation (mean of 200 draws within 10 %).
"""

import math

import pytest
import torch

import gradproj
from gradproj.projectors import (
    DCTProjector,
    EighProjector,
    RandomizedSVDProjector,
    RandomProjector,
    dct_fft,
    dct_matrix,
    get_projector,
    randomized_svd,
)
from gradproj.projectors import dct as dct_module
from problems import matrix_problem, train

BASES = ["svd", "randomized_svd", "eigh", "dct", "random", "golore"]


def spectrum_matrix(m, n, decay, seed=0, dtype=torch.float64):
    """m x n matrix with singular values i^-decay and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=dtype))
    s = torch.arange(1, k + 1, dtype=dtype) ** -decay
    return (U * s) @ V.T, s


def captured(G, state, projector):
    """‖R‖² for the projector's current basis, computed from its dense basis (not from its down())."""
    b = projector.basis_matrices(state)
    R = G.double()
    if "left" in b:
        R = b["left"].double().T @ R
    if "right" in b:
        R = R @ b["right"].double().T
    return R.square().sum().item()


def refresh(name, G, rank, proj_type="std", step=0, state=None, **options):
    proj = get_projector(name)(tuple(G.shape), rank, proj_type, {"update_proj_gap": 1, **options})
    state = {} if state is None else state
    assert proj.refresh(G, state, step)
    return proj, state


# --------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.parametrize("name", BASES)
def test_every_basis_trains_a_least_squares_problem_down(name, proj_type):
    """Linear least squares min ‖(W − W*) X‖² with a decaying input spectrum, one tall and one wide matrix."""
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 24), (24, 48)]
    targets = [torch.randn(s, generator=g) for s in shapes]
    inputs = [torch.randn(s[1], 96, generator=g) * torch.logspace(0, -1.5, s[1])[:, None] for s in shapes]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]

    def loss_fn(ps, index=None):
        return sum(((W - T) @ X).square().mean() for W, T, X in zip(ps, targets, inputs))

    group = {"params": params, "rank": 6, "update_proj_gap": 10, "scale": 1.0, "projector": name, "proj_type": proj_type}
    if name == "golore":
        group["golore_switch_step"] = 40
    opt = gradproj.GaLoreAdamW([group], lr=0.1)
    losses = train(params, opt, 80, loss_fn)
    # a two-sided projection trains r² = 36 of the 1152 coordinates per interval: for the bases that are not
    # fitted to the gradient (DCT, random) that is slow on this unstructured target
    assert losses[-1] < (0.4 if proj_type == "std" else 0.8) * losses[0], (losses[0], losses[-1])


# -------------------------------------------------------------------------------- subspace quality
def test_eigh_spans_the_exact_top_subspace():
    G, s = spectrum_matrix(60, 90, 1.0)
    G = G.float()
    r = 8
    best = (s[:r] ** 2).sum().item()
    for proj_type, side in [("std", "left"), ("reverse_std", "right"), ("full", "full")]:
        proj, state = refresh("eigh", G, r, proj_type)
        assert captured(G, state, proj) / best >= 1 - 1e-5
        U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        b = proj.basis_matrices(state)
        if "left" in b:
            P = b["left"].double()
            torch.testing.assert_close(P @ P.T, U[:, :r] @ U[:, :r].T, rtol=0, atol=1e-3)
        if "right" in b:
            P = b["right"].double()
            torch.testing.assert_close(P.T @ P, Vh[:r].T @ Vh[:r], rtol=0, atol=1e-3)
            torch.testing.assert_close(P @ P.T, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_randomized_svd_captures_the_exact_energy(proj_type):
    G, s = spectrum_matrix(120, 200, 1.0, seed=1)
    r = 16
    proj, state = refresh("randomized_svd", G.float(), r, proj_type)
    best = (s[:r] ** 2).sum().item()
    if proj_type == "full":  # two-sided: compare with the exact two-sided subspace (the same Σ σ_i²)
        assert captured(G, state, proj) / best >= 0.98
    else:
        assert captured(G, state, proj) / best >= 0.99
    for P in proj.basis_matrices(state).values():
        Q = P if P.shape[0] > P.shape[1] else P.T
        torch.testing.assert_close(Q.T @ Q, torch.eye(r), rtol=0, atol=1e-5)


def test_randomized_svd_power_iterations_and_warm_start():
    G, s = spectrum_matrix(150, 220, 0.5, seed=2)  # slow decay: one iteration is not enough
    A, r = G.float(), 20
    best = (s[:r] ** 2).sum().item()

    def energy(Vh):
        return (A.double() @ Vh.double().T).square().sum().item() / best

    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    e = [energy(randomized_svd(A, r, power_iters=q, generator=gen())[1]) for q in (0, 1, 3)]
    assert e[0] < e[1] < e[2] and e[2] > 0.99, e
    # warm start from the exact basis: one iteration keeps the exact subspace
    _, _, Vh = torch.linalg.svd(A, full_matrices=False)
    _, warm = randomized_svd(A, r, power_iters=1, generator=gen(), start=Vh[:r].T)
    assert energy(warm) >= 1 - 1e-5
    # a warm start from a cold estimate improves on it
    _, cold = randomized_svd(A, r, power_iters=1, generator=gen())
    _, again = randomized_svd(A, r, power_iters=1, generator=gen(), start=cold.T)
    assert energy(again) > energy(cold)


def test_randomized_svd_reads_its_warm_start_from_the_state():
    G, s = spectrum_matrix(80, 120, 0.5, seed=3)
    G, r = G.float(), 10
    best = (s[:r] ** 2).sum().item()
    cold = {"rsvd_warm_start": False}
    proj, state = refresh("randomized_svd", G, r, **cold)
    e_first = captured(G, state, proj) / best
    proj, state_cold = refresh("randomized_svd", G, r, step=1, state=dict(state), **cold)
    proj, state_warm = refresh("randomized_svd", G, r, step=1, state={k: v.clone() if torch.is_tensor(v) else v
                                                                     for k, v in state.items()})
    assert captured(G, state_warm, proj) / best > max(e_first, captured(G, state_cold, proj) / best)


def test_dct_l2_selection_is_the_best_set_of_dct_directions():
    g = torch.Generator().manual_seed(0)
    m, n, r = 30, 50, 7
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    for proj_type, dim in [("std", 0), ("reverse_std", 1)]:  # 30x50: std is a left projection (rows of S)
        proj, state = refresh("dct", G, r, proj_type, dct_norm="l2")
        d = G.shape[dim]
        C = dct_matrix(d, dtype=torch.float64)
        S = C @ G if dim == 0 else G @ C.T
        energies = S.square().sum(1 - dim)
        top = energies.sort(descending=True).values[:r].sum().item()
        assert math.isclose(captured(G, state, proj), top, rel_tol=1e-6)  # the basis is rebuilt in float32
        assert state["proj_idx"].dtype == torch.int32
        assert sorted(state["proj_idx"].tolist()) == sorted(energies.topk(r).indices.tolist())


def test_dct_captures_most_of_a_smooth_gradient():
    """Gradients whose columns vary smoothly along the projected axis live in few low DCT frequencies."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 64, 40, 6
    t = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    waves = torch.stack([torch.cos(math.pi * f * t) for f in (0, 1, 2, 3)], 1)  # m x 4
    G = waves @ torch.randn(4, n, generator=g, dtype=torch.float64) + 0.01 * torch.randn(m, n, generator=g, dtype=torch.float64)
    proj, state = refresh("dct", G, r, "left")
    s = torch.linalg.svdvals(G)
    assert captured(G, state, proj) / (s[:r] ** 2).sum().item() >= 0.99


def test_random_orthonormal_basis_captures_r_over_d_on_average():
    G, _ = spectrum_matrix(40, 64, 1.0, seed=4)
    r, total = 8, G.square().sum().item()
    fractions = []
    for seed in range(200):
        proj, state = refresh("random", G.float(), r, "right", random_kind="orthonormal", proj_seed=seed)
        fractions.append(captured(G, state, proj) / total)
    assert abs(sum(fractions) / len(fractions) - r / 64) < 0.1 * r / 64
    P = proj.basis_matrices(state)["right"]
    torch.testing.assert_close(P @ P.T, torch.eye(r), rtol=0, atol=1e-5)


def test_gaussian_random_basis_has_unit_columns_in_expectation():
    proj, state = refresh("random", torch.randn(30, 2000), 50, "right")  # right: P is 50 x 2000
    P = proj.basis_matrices(state)["right"]
    norms = P.square().sum(1)
    assert abs(norms.mean().item() - 1.0) < 0.02 and (P @ P.T - torch.diag(norms)).abs().max() < 0.15


@pytest.mark.parametrize("kind", ["zero", "rank one"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.parametrize("name", ["eigh", "randomized_svd", "dct", "random"])
def test_rank_deficient_gradients_give_finite_orthonormal_bases(name, proj_type, kind):
    """A zero or rank-one gradient (rank < r + oversampling) must not produce NaN or a degenerate basis."""
    g = torch.Generator().manual_seed(0)
    G = torch.zeros(12, 7) if kind == "zero" else torch.outer(torch.randn(12, generator=g), torch.randn(7, generator=g))
    extra = {"random_kind": "orthonormal"} if name == "random" else {}
    proj, state = refresh(name, G, 4, proj_type, **extra)
    assert torch.isfinite(proj.down(G, state)).all()
    for P in proj.basis_matrices(state).values():
        Q = P if P.shape[0] > P.shape[1] else P.T
        torch.testing.assert_close(Q.T @ Q, torch.eye(4), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- DCT
@pytest.mark.parametrize("d", [1, 2, 3, 8, 67, 131])
def test_dct_matrix_is_orthonormal_and_fft_matches_it(d):
    C = dct_matrix(d, dtype=torch.float64)
    torch.testing.assert_close(C @ C.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    # the definition, entry by entry
    k, i = 1 % d, d - 1
    expected = math.sqrt(2 / d) * math.cos(math.pi * (2 * i + 1) * k / (2 * d)) if d > 1 else 1.0
    assert math.isclose(C[k, i].item(), expected, rel_tol=1e-12, abs_tol=1e-15)
    x = torch.randn(5, d, dtype=torch.float64)
    torch.testing.assert_close(dct_fft(x, dim=1), x @ C.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(dct_fft(x.T.contiguous(), dim=0), C @ x.T, rtol=0, atol=1e-12)


def test_dct_matrix_is_shared_not_per_layer():
    dct_module.clear_dct_cache()
    params, loss_fn = matrix_problem([(20, 12), (30, 12), (12, 20)], seed=0)  # right, right (n=12), left (m=12)
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": 3, "update_proj_gap": 2, "scale": 1.0,
                                 "projector": "dct", "dct_impl": "matmul"}], lr=1e-2)
    train(params, opt, 3, loss_fn)
    assert list(dct_module._CACHE) == [(12, torch.device("cpu"), torch.float32)]
    assert dct_matrix(12) is dct_module._CACHE[(12, torch.device("cpu"), torch.float32)]


def test_dct_fft_and_matmul_paths_agree():
    results = {}
    for impl in ("fft", "matmul"):
        params, loss_fn = matrix_problem([(40, 24), (24, 40)], seed=0)
        opt = gradproj.GaLoreAdamW([{"params": params, "rank": 5, "update_proj_gap": 3, "scale": 1.0,
                                     "projector": "dct", "dct_impl": impl}], lr=1e-2)
        train(params, opt, 7, loss_fn)
        results[impl] = (params, [opt.state[p]["proj_idx"] for p in params])
    for a, b in zip(results["fft"][1], results["matmul"][1]):
        assert torch.equal(a, b)
    for a, b in zip(results["fft"][0], results["matmul"][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dct_reads_R_out_of_S_at_a_refresh(monkeypatch):
    """At a refresh R comes from S, so the basis is gathered once (for the update) instead of twice."""
    calls = []
    original = DCTProjector.dense

    def counting(self, state, like):
        calls.append(1)
        return original(self, state, like)

    monkeypatch.setattr(DCTProjector, "dense", counting)
    W = torch.nn.Parameter(torch.randn(20, 12))
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 3, "update_proj_gap": 2, "scale": 1.0, "projector": "dct"}])
    G = torch.randn(20, 12)
    counts = []
    for _ in range(2):  # step 0 refreshes, step 1 does not
        W.grad = G.clone()
        calls.clear()
        opt.step()
        counts.append(len(calls))
    assert counts == [1, 2]
    proj, state = refresh("dct", G, 3)
    C = dct_matrix(12)
    torch.testing.assert_close(proj.down(G, state), G @ C[state["proj_idx"].long()].T)


# -------------------------------------------------------------------------------- state and seeds
def _projected_state_bytes(name, **group):
    W = torch.nn.Parameter(torch.randn(40, 16))  # right projection: P is r x 16
    V = torch.nn.Parameter(torch.randn(16, 40))  # left projection: P is 16 x r
    opt = gradproj.GaLoreAdamW([{"params": [W, V], "rank": 4, "update_proj_gap": 2, "scale": 1.0,
                                 "projector": name, **group}], lr=1e-2)
    for _ in range(3):
        W.grad, V.grad = torch.randn(40, 16), torch.randn(16, 40)
        opt.step()
    return opt, gradproj.optimizer_state_bytes(opt)


def test_state_bytes_dct_holds_indices_only_and_random_nothing():
    _, svd = _projected_state_bytes("svd")
    opt, dct = _projected_state_bytes("dct")
    assert svd["basis"] == 2 * 4 * 16 * 4  # two float32 bases of 4 x 16
    assert dct["basis"] == 2 * 4 * 4  # two times r int32 indices
    assert dct["total"] == svd["total"] - svd["basis"] + dct["basis"]
    for state in opt.state.values():
        assert state["proj_idx"].dtype == torch.int32 and state["proj_idx"].shape == (4,)
    opt, rnd = _projected_state_bytes("random")
    assert rnd.get("basis", 0) == 0 and rnd["total"] == svd["total"] - svd["basis"]
    for state in opt.state.values():
        tensors = {k for k, v in state.items() if torch.is_tensor(v)}
        assert tensors == {"exp_avg", "exp_avg_sq"}
        assert isinstance(state["proj_seed"], int) and isinstance(state["proj_draw"], int)


@pytest.mark.parametrize("name,group", [("randomized_svd", {}), ("random", {}),
                                        ("random", {"random_kind": "orthonormal"}),
                                        ("golore", {"golore_switch_step": 4})])
def test_seeded_bases_are_deterministic_and_leave_the_global_rng_alone(name, group):
    def trained(seed):
        params, loss_fn = matrix_problem([(30, 18), (30, 18)], seed=0)
        opt = gradproj.GaLoreAdamW([{"params": params, "rank": 4, "update_proj_gap": 3, "scale": 1.0,
                                     "projector": name, "proj_seed": seed, **group}], lr=1e-2)
        torch.manual_seed(123)
        rng = torch.get_rng_state()
        train(params, opt, 8, loss_fn)
        assert torch.equal(torch.get_rng_state(), rng)  # no draw from the global generator
        return params, opt

    a, opt_a = trained(0)
    b, _ = trained(0)
    c, _ = trained(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # two same-shaped parameters get different seeds (and so different random bases)
    seeds = [opt_a.state[p]["proj_seed"] for p in a]
    assert seeds[0] != seeds[1]


def test_random_basis_is_redrawn_at_every_refresh_and_kept_between():
    params, loss_fn = matrix_problem([(30, 18)], seed=0)
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": 4, "update_proj_gap": 3, "scale": 1.0,
                                 "projector": "random"}], lr=1e-2)
    draws = []
    for _ in range(7):
        train(params, opt, 1, loss_fn)
        draws.append(opt.state[params[0]]["proj_draw"])
    assert draws == [0, 0, 0, 3, 3, 3, 6]


# ---------------------------------------------------------------------------------------- GoLore
def test_golore_switches_from_svd_to_random_at_the_switch_step():
    params, loss_fn = matrix_problem([(30, 18)], seed=0)
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": 4, "update_proj_gap": 4, "scale": 1.0,
                                 "projector": "golore", "total_steps": 10}], lr=1e-2)  # 0.8 · 10 = step 8
    st = opt.state[params[0]]
    kinds = []
    for _ in range(10):
        train(params, opt, 1, loss_fn)
        kinds.append("random" if "proj_draw" in st else "svd")
        assert ("proj" in st) == (kinds[-1] == "svd")
    assert kinds == ["svd"] * 8 + ["random"] * 2  # steps 0..7 with SVD bases, the update at step 8 onward random
    assert st["proj_draw"] == 8


def test_golore_switch_step_not_on_the_refresh_grid():
    params, loss_fn = matrix_problem([(30, 18)], seed=0)
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": 4, "update_proj_gap": 4, "scale": 1.0,
                                 "projector": "golore", "golore_switch_step": 6}], lr=1e-2)
    train(params, opt, 9, loss_fn)
    assert opt.state[params[0]]["proj_draw"] == 8  # switched at 6, redrawn at the regular refresh 8


# ------------------------------------------------------------------------------ moment projection
def _adam_moments_after_refresh(name, proj_type, group, steps_before=3):
    """Run to just before the refresh at t = steps_before, then take that step. Returns the state and
    projector bases before / after and the gradient of the refresh step."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(14, 9, dtype=torch.float64))
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 3, "update_proj_gap": steps_before, "scale": 1.0,
                                 "projector": name, "proj_type": proj_type, "moments_on_refresh": "project",
                                 **group}], lr=1e-2, betas=(0.8, 0.9))
    for _ in range(steps_before):
        W.grad = torch.randn(14, 9, dtype=torch.float64)
        opt.step()
    st = opt.state[W]
    plan = opt.engine.plan(W, opt.param_groups[0])
    old = {k: v.clone() for k, v in plan.projector.basis_matrices(st).items()}
    M, V = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    old_idx = {k: st[k].clone() for k in ("proj_idx", "proj_idx_left", "proj_idx_right") if k in st}
    G = torch.randn(14, 9, dtype=torch.float64)
    W.grad = G.clone()
    opt.step()
    new = plan.projector.basis_matrices(st)
    return st, old, new, M, V, G, old_idx


def _down(G, bases):
    bases = {k: v.to(G.dtype) for k, v in bases.items()}
    R = G
    if "left" in bases:
        R = bases["left"].T @ R
    if "right" in bases:
        R = R @ bases["right"].T
    return R


@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
@pytest.mark.parametrize("name", ["svd", "random"])
def test_project_rule_against_a_hand_computation(name, proj_type):
    st, old, new, M, V, G, _ = _adam_moments_after_refresh(name, proj_type, {})
    old, new = ({k: v.double() for k, v in b.items()} for b in (old, new))  # random bases are drawn in float32
    b1, b2 = 0.8, 0.9
    # first moment: lift to the full space with the old basis, project with the new one
    if proj_type == "left":
        Pn, Po = new["left"], old["left"]
        M_proj = Pn.T @ (Po @ M)
        T = Pn.T @ Po
        V_proj = torch.stack([sum(T[i, j] ** 2 * V[j] for j in range(3)) for i in range(3)])
    elif proj_type == "right":
        Pn, Po = new["right"], old["right"]
        M_proj = (M @ Po) @ Pn.T
        T = Pn @ Po.T
        V_proj = torch.stack([sum(T[i, j] ** 2 * V[:, j] for j in range(3)) for i in range(3)], dim=1)
    else:
        M_proj = new["left"].T @ (old["left"] @ M @ old["right"]) @ new["right"].T
        Tl, Tr = new["left"].T @ old["left"], new["right"] @ old["right"].T
        V_proj = torch.zeros(3, 3, dtype=V.dtype)
        for i in range(3):
            for k in range(3):
                V_proj[i, k] = sum(Tl[i, j] ** 2 * Tr[k, l] ** 2 * V[j, l] for j in range(3) for l in range(3))
    assert not torch.allclose(new[next(iter(new))], old[next(iter(old))])  # the basis did change
    R = _down(G, new)
    # float64 parameters: an SVD basis is float64 and so is the change of basis; a random basis is drawn in
    # float32, and its change of basis is computed in float32
    tol = dict(rtol=1e-9, atol=1e-12) if name == "svd" else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(st["exp_avg"], b1 * M_proj + (1 - b1) * R, **tol)
    torch.testing.assert_close(st["exp_avg_sq"], b2 * V_proj + (1 - b2) * R * R, **tol)
    assert "inner_start" not in st  # the moments carry on: bias correction keeps counting


@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
def test_project_rule_for_dct_moves_shared_indices_and_zeroes_new_ones(proj_type):
    st, old, new, M, V, G, old_idx = _adam_moments_after_refresh("dct", proj_type, {})
    b1, b2 = 0.8, 0.9

    def remap(X, sides):
        out = torch.zeros_like(X)
        rows = sides.get("left") or (None, None)
        cols = sides.get("right") or (None, None)
        for i in range(X.shape[0]):
            for k in range(X.shape[1]):
                src = [i, k]
                if rows[0] is not None:
                    hits = (rows[0] == rows[1][i]).nonzero()
                    if len(hits) == 0:
                        continue
                    src[0] = hits.item()
                if cols[0] is not None:
                    hits = (cols[0] == cols[1][k]).nonzero()
                    if len(hits) == 0:
                        continue
                    src[1] = hits.item()
                out[i, k] = X[src[0], src[1]]
        return out

    if proj_type == "full":
        sides = {"left": (old_idx["proj_idx_left"], st["proj_idx_left"]),
                 "right": (old_idx["proj_idx_right"], st["proj_idx_right"])}
    else:
        sides = {proj_type: (old_idx["proj_idx"], st["proj_idx"])}
    assert not torch.equal(remap(M, sides), M)  # the index sets moved: 'project' differs from 'keep' here
    exact = {"left": lambda i: dct_matrix(14, dtype=torch.float64)[i.long()].T,
             "right": lambda i: dct_matrix(9, dtype=torch.float64)[i.long()]}
    R = _down(G, {side: exact[side](idx[1]) for side, idx in sides.items()})
    torch.testing.assert_close(st["exp_avg"], b1 * remap(M, sides) + (1 - b1) * R, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(st["exp_avg_sq"], b2 * remap(V, sides) + (1 - b2) * R * R, rtol=1e-9, atol=1e-12)


def test_project_rule_with_an_unchanged_basis_equals_keep():
    """Refreshing on the same gradient direction gives the same SVD basis: 'project' then changes nothing."""
    torch.manual_seed(0)
    G = torch.randn(12, 8, dtype=torch.float64)
    out = {}
    for rule in ("keep", "project"):
        W = torch.nn.Parameter(torch.zeros(12, 8, dtype=torch.float64))
        opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 3, "update_proj_gap": 2, "scale": 1.0,
                                     "moments_on_refresh": rule}], lr=1e-2)
        for k in range(5):
            W.grad = G * (1 + 0.1 * k)
            opt.step()
        out[rule] = W.detach().clone()
    # the SVD runs in float32, so T = P_newᵀ P_old is the identity to float32 accuracy
    torch.testing.assert_close(out["keep"], out["project"], rtol=0, atol=1e-6)


def test_project_rule_keeps_fp32_state_dtype_for_bf16_weights():
    W = torch.nn.Parameter(torch.randn(16, 10).bfloat16())
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 3, "update_proj_gap": 2, "scale": 1.0, "projector": "dct",
                                 "moments_on_refresh": "project"}], lr=1e-2, state_dtype=torch.float32)
    for _ in range(5):
        W.grad = torch.randn(16, 10).bfloat16()
        opt.step()
    assert opt.state[W]["exp_avg"].dtype == torch.float32 and opt.state[W]["exp_avg_sq"].min() >= 0


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "options,message",
    [
        ({"projector": "randomized_svd", "rsvd_oversample": -1}, "rsvd_oversample = -1"),
        ({"projector": "randomized_svd", "rsvd_power_iters": 1.5}, "rsvd_power_iters = 1.5"),
        ({"projector": "randomized_svd", "proj_seed": "a"}, "proj_seed = 'a'"),
        ({"projector": "random", "random_kind": "haar"}, "random_kind = 'haar'"),
        ({"projector": "dct", "dct_norm": "l3"}, "dct_norm = 'l3'"),
        ({"projector": "dct", "dct_impl": "cuda"}, "dct_impl = 'cuda'"),
        ({"projector": "golore"}, "needs the switch point"),
        ({"projector": "golore", "total_steps": 100, "golore_before": "qr"}, "golore_before = 'qr'"),
        ({"projector": "golore", "total_steps": 100, "golore_switch_fraction": 1.5}, "golore_switch_fraction = 1.5"),
        ({"moments_on_refresh": "rotate"}, "moments_on_refresh = 'rotate'"),
    ],
)
def test_bad_basis_options_raise_clear_errors(options, message):
    W = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=message) as info:
        gradproj.GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": 10, "scale": 1.0, **options}])
    assert "param group 0" in str(info.value)


def test_project_rule_rejected_for_an_inner_rule_that_cannot_project():
    from gradproj.inner import Adam

    class OpaqueAdam(Adam):
        name = "opaque"
        state_transforms = None

    class Opaque(gradproj.GaLoreAdamW):
        inner_rule = OpaqueAdam

    W = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="moments_on_refresh='project' is not available"):
        Opaque([{"params": [W], "rank": 2, "update_proj_gap": 10, "scale": 1.0, "moments_on_refresh": "project"}])


def test_basis_options_are_accepted_as_optimizer_defaults():
    W = torch.nn.Parameter(torch.randn(20, 12))
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 3, "update_proj_gap": 2, "scale": 1.0}], lr=1e-2,
                               projector="randomized_svd", rsvd_power_iters=2, rsvd_oversample=4)
    W.grad = torch.randn(20, 12)
    opt.step()
    assert opt.param_groups[0]["rsvd_power_iters"] == 2 and "proj_seed" in opt.state[W]


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_dct_and_randomized_svd_on_cuda():
    G = torch.randn(256, 640, device="cuda")
    C = dct_matrix(256, "cuda", torch.float32)
    torch.testing.assert_close(dct_fft(G, dim=0), C @ G, rtol=1e-4, atol=1e-4)
    for cls in (RandomizedSVDProjector, RandomProjector, EighProjector):
        a, b = {}, {}
        p = cls((256, 640), 16, "std", {"update_proj_gap": 1})
        p.refresh(G, a, 0)
        p.refresh(G, b, 0)
        for k, v in a.items():
            assert torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k]
        R = p.down(G, a)
        assert R.device.type == "cuda" and R.shape == (16, 640)
