"""``projector="sampled"``: importance-sampled singular subspaces (SARA, arXiv 2502.05790), docs/bases.md.

The rule under test: at a refresh, r of the top k singular vectors of G (k = ``sample_pool``, None: all
min(m, n)) are drawn one after another without replacement, index i with probability w_i / Σ w over the
indices not drawn yet, w_i = σ_i^``sample_power``. So the probability of the unordered set {i, j} (r = 2) is

    P({i, j}) = w_i/W · w_j/(W - w_i) + w_j/W · w_i/(W - w_j),     W = Σ_pool w.

The law test compares seeded draws with these probabilities by a chi-square statistic. Everything is seeded,
so each test is deterministic; the bound is the 1 - 1e-4 quantile of χ² with (categories - 1) degrees of
freedom (Wilson–Hilferty), i.e. a correct sampler fails it for fewer than 1 in 10⁴ seeds.
"""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

import gradproj
from gradproj.memory_estimate import estimate_memory
from gradproj.projectors import SampledProjector, get_projector
from gradproj.projectors.sampled import sample_without_replacement, selection_weights
from gradproj.train.models import LlamaShape
from problems import TinyNet, tiny_batch, tiny_loss, train


def known_svd(m, n, sigma, seed=0):
    """An m x n float32 matrix with singular values ``sigma`` and its exact (float64) singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigma)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.tensor(sigma, dtype=torch.float64)
    return ((U * s) @ V.T).float(), U, V


def chosen_indices(P, vectors):
    """The index of the reference singular vector (a column of ``vectors``) that each basis vector (a column
    of ``P``) is, up to sign; asserts that it is one, to float32 accuracy."""
    overlap = (vectors.T @ P.double()).abs()  # k x r
    best, idx = overlap.max(dim=0)
    assert torch.all(best > 1 - 1e-4), best
    return sorted(idx.tolist())


def refresh(G, rank, step, proj_type="std", state=None, **options):
    proj = SampledProjector(tuple(G.shape), rank, proj_type, {"update_proj_gap": 1, **options})
    state = {} if state is None else state
    assert proj.refresh(G, state, step)
    return proj, state


def chi2_bound(dof, z=3.7190):  # z: the standard normal's 1 - 1e-4 quantile
    """Wilson–Hilferty approximation of χ²'s quantile: dof (1 - 2/(9 dof) + z √(2/(9 dof)))³."""
    c = 2 / (9 * dof)
    return dof * (1 - c + z * math.sqrt(c)) ** 3


def chi2(counts, probs, n):
    return sum((counts.get(key, 0) - n * p) ** 2 / (n * p) for key, p in probs.items())


def pair_probabilities(w):
    W = sum(w)
    return {
        (i, j): w[i] / W * w[j] / (W - w[i]) + w[j] / W * w[i] / (W - w[j])
        for i, j in itertools.combinations(range(len(w)), 2)
    }


# ------------------------------------------------------------------------------------- the basis
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_the_basis_is_a_subset_of_the_top_k_singular_vectors(proj_type):
    sigma = [2.0**-i for i in range(12)]  # distinct, well separated: each singular vector is unique up to sign
    G, U, V = known_svd(30, 12, sigma)
    seen = set()
    for step in range(20):
        proj, state = refresh(G, 4, step, proj_type, sample_pool=6, sample_power=0.0)
        bases = proj.basis_matrices(state)
        sides = []
        if "left" in bases:
            P = bases["left"]  # m x r
            assert torch.allclose(P.T @ P, torch.eye(4), atol=1e-5)
            sides.append(chosen_indices(P, U))
        if "right" in bases:
            P = bases["right"].T  # n x r
            assert torch.allclose(P.T @ P, torch.eye(4), atol=1e-5)
            sides.append(chosen_indices(P, V))
        idx = sides[0]
        assert len(set(idx)) == 4 and max(idx) < 6  # 4 distinct vectors of the top 6
        assert all(s == idx for s in sides)  # a full projection takes the same indices on both sides
        seen.add(tuple(idx))
    assert len(seen) > 5  # the subspace changes between refreshes (uniform over C(6, 4) = 15 sets here)


def test_sample_power_zero_is_uniform_and_a_large_power_is_the_top_r():
    G, _, V = known_svd(20, 10, [10.0 - i for i in range(10)])
    for step in range(5):
        _, state = refresh(G, 3, step, sample_power=200.0)
        assert chosen_indices(state["proj"].T, V) == [0, 1, 2]  # weights (σ_i/σ_1)^200: the top 3 win
    # an all-zero gradient has no preferred direction: the basis is the SVD's first r vectors, finite
    _, state = refresh(torch.zeros(20, 10), 3, 0)
    assert torch.isfinite(state["proj"]).all()
    assert torch.allclose(state["proj"] @ state["proj"].T, torch.eye(3), atol=1e-5)


def test_selection_weights():
    S = torch.tensor([4.0, 2.0, 1.0, 0.0])
    assert torch.equal(selection_weights(S, 1.0), torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert torch.equal(selection_weights(S, 0.0), torch.ones(4, dtype=torch.float64))
    assert torch.equal(selection_weights(torch.zeros(3), 1.0), torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(selection_weights(torch.tensor([1e30, 1.0]), 50.0)).all()


# ------------------------------------------------------------------------------------------ the law
def test_selection_frequencies_follow_the_without_replacement_law():
    """4000 refreshes of the projector (one per step: the draw is seeded by the step) on a spectrum whose top
    5 values are 5, 4, 3, 2, 1; pool 5, r = 2: the 10 pairs against their exact probabilities."""
    sigma = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.125]
    G, _, V = known_svd(16, 8, sigma)
    proj = SampledProjector((16, 8), 2, "std", {"update_proj_gap": 1, "sample_pool": 5})
    n = 4000
    counts: dict[tuple[int, ...], int] = {}
    state: dict = {}
    for step in range(n):
        assert proj.refresh(G, state, step)
        key = tuple(chosen_indices(state["proj"].T, V))
        counts[key] = counts.get(key, 0) + 1
    probs = pair_probabilities(sigma[:5])
    assert set(counts) <= set(probs)  # never outside the pool
    bound = chi2_bound(len(probs) - 1)  # ≈ 34.1 for 9 degrees of freedom
    assert chi2(counts, probs, n) < bound
    # the test can tell the law from its neighbours: weights σ² (or uniform ones) are rejected
    assert chi2(counts, pair_probabilities([s**2 for s in sigma[:5]]), n) > 3 * bound
    assert chi2(counts, pair_probabilities([1.0] * 5), n) > 3 * bound


def test_sample_without_replacement_exact_set_probabilities():
    """The sampler alone, r = 3 of 5 with weights 1..5 and one zero weight (never drawn while enough positive
    weights remain): all 10 unordered sets against the exact sequential-draw probabilities."""
    w = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    weights = torch.tensor(w, dtype=torch.float64)
    n = 20000
    counts: dict[tuple[int, ...], int] = {}
    for i in range(n):
        idx = sample_without_replacement(weights, 3, torch.Generator().manual_seed(1000 + i))
        key = tuple(idx.tolist())
        assert list(key) == sorted(set(key))  # distinct, increasing
        counts[key] = counts.get(key, 0) + 1
    W = sum(w)
    probs: dict[tuple[int, ...], float] = {}
    for order in itertools.permutations(range(5), 3):
        p, left = 1.0, W
        for i in order:
            p *= w[i] / left
            left -= w[i]
        key = tuple(sorted(order))
        probs[key] = probs.get(key, 0.0) + p
    assert set(counts) <= set(probs)
    assert chi2(counts, probs, n) < chi2_bound(len(probs) - 1)
    # fewer positive weights than r: the zero-weight indices fill the rest, in index order
    idx = sample_without_replacement(torch.tensor([0.0, 1.0, 0.0, 0.0]), 3, torch.Generator().manual_seed(0))
    assert idx.tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------- seeds, ranks, resume
def make(model, **group):
    options = {"rank": 4, "update_proj_gap": 3, "scale": 1.0, "projector": "sampled", **group}
    groups = gradproj.param_groups(model, **options)
    return gradproj.GaLoreAdamW(groups, lr=1e-2)



def bases(opt):
    return [state["proj"].clone() for state in opt.state.values() if "proj" in state]


def test_same_seed_same_subspace_across_optimizer_instances():
    """Two optimizers on two copies of a model (two DDP ranks: same parameters in the same order, same
    gradients) draw bit-identical bases at every refresh, without touching the global RNG; another
    ``proj_seed`` draws other ones."""
    models = [TinyNet(), TinyNet()]
    opts = [make(models[0]), make(models[1])]
    other_model = TinyNet()
    other = make(other_model, proj_seed=1)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    for s in range(7):  # refreshes at steps 0, 3 and 6
        for model, opt in [*zip(models, opts), (other_model, other)]:
            opt.zero_grad()
            tiny_loss(model, tiny_batch(s)).backward()
            opt.step()
        a, b = bases(opts[0]), bases(opts[1])
        assert len(a) == 2 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(torch.get_rng_state(), rng)
    assert not all(torch.equal(x, y) for x, y in zip(bases(opts[0]), bases(other)))
    seeds = [s["proj_seed"] for s in opts[0].state.values() if "proj" in s]
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]  # each parameter its own seed


def test_checkpoint_resume_is_bit_exact():
    model = TinyNet()
    opt = make(model)
    train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 6, seed=4)  # refreshes at steps 6 and 9 after the checkpoint
    ck = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    model2 = TinyNet(seed=5)
    model2.load_state_dict(ck["model"])
    opt2 = make(model2)
    opt2.load_state_dict(ck["opt"])
    train(model2, opt2, 6, seed=4)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(bases(opt), bases(opt2)))


# --------------------------------------------------------------------------------------- training
@pytest.mark.parametrize(
    "opt_cls,group",
    [
        (gradproj.GaLoreAdamW, {}),
        (gradproj.GaLoreAdamW, {"proj_type": "full", "sample_pool": 8}),
        (gradproj.GaLoreAdamW, {"foreach": True}),  # the batched step of dense bases
        (gradproj.FiraAdamW, {}),  # Fira's factored residual path (an orthonormal basis)
    ],
)
def test_trains_a_small_model_down(opt_cls, group):
    model = TinyNet()
    groups = gradproj.param_groups(model, rank=4, update_proj_gap=5, scale=1.0, projector="sampled", **group)
    opt = opt_cls(groups, lr=1e-2)
    losses = train(model, opt, 40)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]
    assert gradproj.optimizer_state_bytes(opt)["basis"] > 0


# ------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    "options,error",
    [
        ({"sample_pool": 0}, "sample_pool = 0"),
        ({"sample_pool": 2.5}, "sample_pool = 2.5"),
        ({"sample_pool": "all"}, "sample_pool = 'all'"),
        ({"sample_pool": 3}, "sample_pool = 3 is smaller than rank = 4"),
        ({"sample_power": -1.0}, "sample_power = -1.0"),
        ({"sample_power": float("nan")}, "sample_power = nan"),
        ({"proj_seed": 0.5}, "proj_seed = 0.5"),
    ],
)
def test_bad_options_raise_before_anything_changes(options, error):
    with pytest.raises(ValueError, match=error):
        make(TinyNet(), **options)
    # set on a running optimizer: the next step refuses it before it touches a weight or the state
    model = TinyNet()
    opt = make(model)
    train(model, opt, 2)
    weights = [p.detach().clone() for p in model.parameters()]
    states = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in opt.state.items()}
    next(g for g in opt.param_groups if "rank" in g).update(options)
    opt.zero_grad()
    tiny_loss(model, tiny_batch(2)).backward()
    with pytest.raises(ValueError, match=error):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    for k, s in opt.state.items():
        assert s.keys() == states[k].keys()
        for n, v in s.items():
            assert torch.equal(v, states[k][n]) if torch.is_tensor(v) else v == states[k][n]


def test_registered_and_estimated_like_randomized_svd():
    """A dense basis plus the parameter's seed: the state of ``randomized_svd``, byte for byte."""
    assert get_projector("sampled") is SampledProjector
    shape = LlamaShape(hidden=16, intermediate=40, heads=2, layers=2, vocab=50)
    est = estimate_memory(shape, "galore_adamw", rank=4, projector="sampled", dtype="float32")
    ref = estimate_memory(shape, "galore_adamw", rank=4, projector="randomized_svd", dtype="float32")
    assert est.optimizer_states_detail == ref.optimizer_states_detail and est.optimizer_states_detail["basis"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampled_on_cuda():
    """The draw runs on the gradient's device from a CUDA generator: a subset of the pool, repeatable."""
    G, _, V = known_svd(64, 32, [1.0 / (i + 1) for i in range(32)])
    G = G.cuda()
    _, a = refresh(G, 4, 3, sample_pool=8)
    _, b = refresh(G, 4, 3, sample_pool=8)
    assert torch.equal(a["proj"], b["proj"])
    idx = chosen_indices(a["proj"].T.cpu(), V)
    assert len(set(idx)) == 4 and max(idx) < 8
