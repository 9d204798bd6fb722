"""refresh_stagger=True: each matrix of a group refreshes its basis every update_proj_gap steps at its own offset.

The schedule is checked against one written here from the definition (matrix k of the N projected matrices
of its group refreshes at t ≡ floor(k·T/N) mod T, after its first basis at its first step), in the
per-parameter, batched (foreach) and per-layer steps; a checkpoint resumes bit for bit; projected backward
follows normal mode. With refresh="lazy" each matrix keeps its phase while its own gap grows (checked
against a schedule written here from the lazy rule: refresh when (t - offset) % gap == 0), and projected
backward follows it too.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

import gradproj
from gradproj.projectors import SVDProjector
from problems import matrix_problem, train

T = 4
# distinct shapes, so a decomposition's input names its matrix; rank 3 projects every one of them
SHAPES = [(12, 8), (8, 13), (14, 9), (9, 15), (16, 10), (10, 17), (18, 11)]
FULL_RANK = (3, 20)  # rank 3 >= min(3, 20): trained unprojected, so not one of the N matrices


def record_refreshes(monkeypatch) -> dict[tuple, list[int]]:
    """Shape -> the steps at which an exact-SVD basis of that shape was computed (hooks SVDProjector)."""
    seen: dict[tuple, list[int]] = {s: [] for s in SHAPES}
    original = SVDProjector.compute_basis

    def recording(self, G, state, step):
        seen[tuple(G.shape)].append(step)
        return original(self, G, state, step)

    monkeypatch.setattr(SVDProjector, "compute_basis", recording)
    return seen


def expected_offsets(n, gap):
    return [math.floor(Fraction(k * gap, n)) for k in range(n)]


def expected_refreshes(offset, gap, steps):
    """Steps (counted before the increment) at which a matrix with ``offset`` computes a basis."""
    return [0] + [t for t in range(1, steps) if (t - offset) % gap == 0]


def recorded_run(steps, monkeypatch, stagger=True, gap=T, **options):
    """Step a group of the SHAPES matrices, a bias and a full-rank matrix with random gradients; return the
    steps at which each shape's basis was computed, and the optimizer."""
    g = torch.Generator().manual_seed(0)
    matrices = [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    bias, full = nn.Parameter(torch.zeros(5)), nn.Parameter(torch.randn(FULL_RANK, generator=g))
    params = [bias, *matrices[:3], full, *matrices[3:]]
    # the recording hooks the exact SVD's decomposition, so the basis is pinned to it
    group = {"params": params, "rank": 3, "update_proj_gap": gap, "scale": 0.25, "refresh_stagger": stagger}
    opt = gradproj.GaLoreAdamW([{**group, "projector": "svd", **options}], lr=1e-3)
    seen = record_refreshes(monkeypatch)
    for t in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        if t == 0:
            with pytest.warns(UserWarning, match="no memory can be saved"):
                opt.step()
        else:
            opt.step()
    monkeypatch.undo()
    return seen, opt, matrices


@pytest.mark.parametrize("mode", [{}, {"foreach": True}], ids=["per-parameter", "foreach"])
def test_each_matrix_refreshes_every_gap_at_its_offset(mode, monkeypatch):
    steps = 4 * T + 3
    seen, opt, matrices = recorded_run(steps, monkeypatch, **mode)
    offsets = expected_offsets(len(SHAPES), T)
    assert len(set(offsets)) == T  # 7 matrices over 4 steps: every step of the gap holds one or two
    for k, shape in enumerate(SHAPES):
        assert seen[shape] == expected_refreshes(offsets[k], T, steps), (k, shape)
        assert opt.state[matrices[k]]["refresh_offset"] == offsets[k]
    per_step = [sum(t in seen[s] for s in SHAPES) for t in range(1, steps)]
    assert max(per_step) == math.ceil(len(SHAPES) / T)


def test_without_stagger_every_matrix_refreshes_at_multiples_of_the_gap(monkeypatch):
    steps = 3 * T + 1
    seen, opt, matrices = recorded_run(steps, monkeypatch, stagger=False)
    for shape in SHAPES:
        assert seen[shape] == list(range(0, steps, T))
    assert all("refresh_offset" not in opt.state[p] for p in matrices)


def test_layerwise_follows_the_same_schedule(monkeypatch):
    """Per-layer stepping (hooks in the backward) refreshes at the same steps as the optimizer's step()."""
    (W1, W2), loss_fn = matrix_problem([(12, 8), (8, 13)])
    weights = {}
    for layerwise in (False, True):
        params = [nn.Parameter(W1.detach().clone()), nn.Parameter(W2.detach().clone())]
        group = {"params": params, "rank": 3, "update_proj_gap": T, "scale": 0.25, "refresh_stagger": True}
        opt = gradproj.GaLoreAdamW([group], lr=1e-2, layerwise=layerwise)
        train(params, opt, 3 * T, loss_fn)
        assert [opt.state[p]["refresh_offset"] for p in params] == expected_offsets(2, T)
        weights[layerwise] = [p.detach().clone() for p in params]
    for a, b in zip(weights[False], weights[True]):
        assert torch.equal(a, b)


def staggered(params):
    group = {"params": params, "rank": 3, "update_proj_gap": T, "scale": 0.25, "refresh_stagger": True}
    return gradproj.GaLoreAdamW([group], lr=1e-2)


def test_resume_is_bit_exact():
    params, loss_fn = matrix_problem(SHAPES)
    start = [p.detach().clone() for p in params]
    opt = staggered(params)
    train(params, opt, T + 2, loss_fn)  # saved between two matrices' refreshes
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    train(params, opt, 2 * T + 1, loss_fn)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = [nn.Parameter(w.clone()) for w in ckpt["params"]]
    opt2 = staggered(resumed)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, 2 * T + 1, loss_fn)
    for p, q, w0 in zip(params, resumed, start):
        assert not torch.equal(p, w0)
        assert torch.equal(p, q)
        a, b = opt.state[p], opt2.state[q]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


@pytest.mark.parametrize("foreach", [False, True])
def test_stagger_turned_on_later_takes_its_offset_at_once(monkeypatch, foreach):
    """A state written without stagger (no offset) stores its offset at its first step with stagger on and
    refreshes at its offset from the next step on, whether the regular steps run per parameter or batched."""
    params, loss_fn = matrix_problem(SHAPES[:2])
    group = {"params": params, "rank": 3, "update_proj_gap": T, "scale": 0.25, "refresh_stagger": False}
    group["foreach"] = foreach
    opt = gradproj.GaLoreAdamW([{**group, "projector": "svd"}], lr=1e-2)  # the recording hooks the exact SVD
    train(params, opt, 2, loss_fn)
    opt.param_groups[0]["refresh_stagger"] = True
    seen: dict[tuple, list[int]] = {s: [] for s in SHAPES[:2]}
    original = SVDProjector.compute_basis

    def recording(self, G, state, step):
        seen[tuple(G.shape)].append(step)
        return original(self, G, state, step)

    monkeypatch.setattr(SVDProjector, "compute_basis", recording)
    train(params, opt, 3 * T, loss_fn)
    offsets = expected_offsets(2, T)  # [0, 2]
    assert offsets[1] != 0
    for k, shape in enumerate(SHAPES[:2]):  # steps t = 2 .. 3T + 1 ran; t = 2 stored the offsets
        assert seen[shape] == [t for t in range(3, 3 * T + 2) if t % T == offsets[k]], shape


def expected_lazy_refreshes(offset, gap, factor, size, stable, steps):
    """Steps at which a matrix with ``offset`` computes a basis under refresh="lazy" with stagger, from the
    rules: first basis at step 0 (the queue stays empty); then a refresh at every t with (t - offset) % g == 0,
    g its current gap; each refresh pushes one similarity; a full queue of a ``stable`` matrix (similarity 1,
    above the threshold) sets g = int(g * factor), a changing one (similarity below it) keeps g."""
    refreshes, g, count = [0], gap, 0
    for t in range(1, steps):
        if (t - offset) % g == 0:
            refreshes.append(t)
            count = min(count + 1, size)
            if stable and count == size:
                g = int(g * factor)
    return refreshes


STABLE = {0, 2, 3, 6}  # matrices fed one fixed gradient (the same basis at every refresh: similarity 1)


@pytest.mark.parametrize("factor", [2, 1.5])
@pytest.mark.parametrize("mode", [{}, {"foreach": True}], ids=["per-parameter", "foreach"])
def test_lazy_refresh_keeps_each_matrix_phase(mode, factor, monkeypatch):
    """refresh="lazy" with stagger: stable matrices grow their gaps, changing ones keep T, and every refresh
    stays at its offset modulo the matrix's current gap."""
    steps, size = 12 * T + 1, 2
    g = torch.Generator().manual_seed(0)
    matrices = [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    fixed = {k: torch.randn(s, generator=g) for k, s in enumerate(SHAPES) if k in STABLE}
    group = {"params": matrices, "rank": 3, "update_proj_gap": T, "scale": 0.25, "refresh_stagger": True}
    # the threshold: a fixed gradient's similarity is 1 (up to rounding), unrelated random ones stay far below
    lazy = {"refresh": "lazy", "lazy_queue_size": size, "lazy_cos_threshold": 0.99, "lazy_gap_factor": factor}
    opt = gradproj.GaLoreAdamW([{**group, **lazy, **mode, "projector": "svd"}], lr=1e-3)  # recording hooks svd
    seen = record_refreshes(monkeypatch)
    for _ in range(steps):
        for k, p in enumerate(matrices):
            p.grad = fixed[k].clone() if k in STABLE else torch.randn(p.shape, generator=g)
        opt.step()
    monkeypatch.undo()
    offsets = expected_offsets(len(SHAPES), T)
    for k, shape in enumerate(SHAPES):
        want = expected_lazy_refreshes(offsets[k], T, factor, size, k in STABLE, steps)
        assert seen[shape] == want, (k, shape)
        assert opt.state[matrices[k]]["refresh_offset"] == offsets[k]
        assert (opt.state[matrices[k]]["lazy_gap"] > 4 * T) == (k in STABLE)  # the gaps did grow, or not
    if factor == 2:  # gaps T·2^j: refreshes at t ≡ offset (mod T), so the stagger bound holds
        per_step = [sum(t in seen[s] for s in SHAPES) for t in range(1, steps)]
        assert max(per_step) == math.ceil(len(SHAPES) / T)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_non_boolean_is_refused(value):
    p = nn.Parameter(torch.zeros(12, 8))
    with pytest.raises(ValueError, match="refresh_stagger"):
        gradproj.GaLoreAdamW([{"params": [p], "rank": 3, "update_proj_gap": T, "refresh_stagger": value}])


@pytest.mark.parametrize("refresh", ["fixed", "lazy"])
def test_project_backward_follows_normal_mode(refresh):
    """project_backward with stagger predicts the same refresh steps as the step: it equals normal mode with
    stagger (both float64), and at each step only the matrices whose refresh is due get a full gradient."""
    pytest.importorskip("transformers")
    from test_project_backward import F64, galore, llama, lm_loss, max_rel, weights

    runs = {}
    for projected in (False, True):
        model = llama()
        opt = galore(model, update_proj_gap=T, refresh_stagger=True, refresh=refresh)
        handle = gradproj.project_backward(model, opt) if projected else None
        full_counts, losses = [], []
        for step in range(3 * T + 1):
            opt.zero_grad()
            loss = lm_loss(model, step)
            loss.backward()
            losses.append(loss.item())
            if handle is not None:
                full_counts.append(len(handle.full_gradient_weights()))
            opt.step()
        runs[projected] = (losses, weights(model), full_counts, handle)
    ref_losses, ref, _, _ = runs[False]
    losses, got, full_counts, handle = runs[True]
    n = len(handle.proxies)  # 14 projected matrices, 4 steps per gap: 3 or 4 refresh at each step
    assert full_counts[0] == n and max(full_counts[1:]) == math.ceil(n / T) and min(full_counts[1:]) >= 1
    assert sum(full_counts[1 : T + 1]) == n  # every matrix once per gap
    # the tolerance of tests/test_project_backward.py (F64: float64 reassociation, derived there)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)) <= F64
    assert max_rel(got, ref) <= F64
