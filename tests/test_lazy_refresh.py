"""refresh="lazy": Q-GaLore's layer-wise lazy refresh schedule (gradproj/projectors/lazy.py).

Parity with the reference projector of q-galore-torch 1.0 on recorded gradient sequences (the refresh steps,
the stored gaps and the similarity queue), bit-exact resume across a gap doubling, options refused before
anything changes, the checkpoint check, layerwise / foreach equality with the per-parameter step (with and
without refresh_stagger; the staggered schedule itself is checked in tests/test_stagger.py).
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch
from torch import nn

import gradproj
from gradproj.projectors import SVDProjector
from gradproj.projectors.lazy import COUNT_KEY, GAP_KEY, QUEUE_KEY
from problems import TinyNet, matrix_problem, tiny_batch, tiny_loss, train


def reference_projector_class():
    """q-galore-torch 1.0's ``GaLoreProjector``, loaded from its module file (the package's ``__init__`` imports
    bitsandbytes and its 8-bit optimizer, which the projector does not need)."""
    spec = importlib.util.find_spec("q_galore_torch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("q-galore-torch is not installed (pip install q-galore-torch==1.0, part of the dev extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / "q_galore_projector.py"
    module_spec = importlib.util.spec_from_file_location("q_galore_projector_reference", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.GaLoreProjector


# ------------------------------------------------------------------------------------ gradient sequences
def recorded_gradients(shape, steps, seed=0):
    """The gradients of one weight along a training run (plain AdamW on a nonlinear least-squares problem
    with a decaying spectrum): slowly drifting, as a layer's gradients are."""
    (W,), loss_fn = matrix_problem([shape], seed=seed)
    opt = torch.optim.AdamW([W], lr=3e-2)
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn([W]).backward()
        grads.append(W.grad.detach().clone())
        opt.step()
    return grads


def regime_gradients(shape, steps, seed=0):
    """Phases of unrelated gradients (similarity near 0) and of a stable rank-2 gradient plus noise (near 1)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    stable = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) * torch.tensor([[1.0]])
    grads = []
    for t in range(steps):
        noise = torch.randn(m, n, generator=g)
        grads.append(noise if (t // 40) % 2 == 0 else stable + 0.05 * noise)
    return grads


def run_reference(cls, grads, gap, **lazy):
    proj = cls(4, update_proj_gap=gap, proj_type="std", **lazy)
    refreshes, gaps, queues = [], [], []
    for t, G in enumerate(grads):
        before = proj.svd_count
        proj.project(G, t)
        if proj.svd_count != before:
            refreshes.append(t)
        gaps.append(proj.update_proj_gap)
        queues.append(list(proj.queue))
    return refreshes, gaps, queues


def run_gradproj(grads, gap, monkeypatch, projector="svd", **options):
    p = nn.Parameter(torch.zeros(grads[0].shape))
    group = {"params": [p], "rank": 4, "update_proj_gap": gap, "scale": 0.25, "refresh": "lazy", **options}
    # q-galore-torch refreshes at t % gap == 0 (no stagger); exact SVD unless a test names another basis
    opt = gradproj.GaLoreAdamW([group], lr=1e-3, projector=projector, refresh_stagger=False)
    refreshes, gaps, queues = [], [], []
    seen: list[int] = []
    cls = type(opt.engine.plan(p, opt.param_groups[0]).projector)
    original = cls.compute_basis

    def recording(self, G, state, step):
        seen.append(step)
        return original(self, G, state, step)

    monkeypatch.setattr(cls, "compute_basis", recording)
    for G in grads:
        p.grad = G.clone()
        opt.step()
        state = opt.state[p]
        gaps.append(state.get(GAP_KEY))
        queues.append(state[QUEUE_KEY][: state[COUNT_KEY]].tolist() if QUEUE_KEY in state else None)
    refreshes = sorted(set(seen))
    monkeypatch.undo()
    return refreshes, gaps, queues


LAZY_SETTINGS = [
    ({}, {}),  # the paper's: queue 5, threshold 0.4, gamma 2
    (
        {"queue_size": 3, "cos_threshold": 0.9, "gamma_proj": 1.5},
        {"lazy_queue_size": 3, "lazy_cos_threshold": 0.9, "lazy_gap_factor": 1.5},
    ),
]


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)], ids=["right", "left"])
@pytest.mark.parametrize("sequence", [recorded_gradients, regime_gradients], ids=["recorded", "regimes"])
@pytest.mark.parametrize("settings", LAZY_SETTINGS, ids=["paper", "q3-t0.9-g1.5"])
def test_schedule_matches_q_galore(shape, sequence, settings, monkeypatch):
    """The same gradients into q-galore-torch's projector and into GaLoreAdamW(refresh='lazy'): the same refresh
    steps, the same gap after every step, the same queue of similarities (exactly: the same SVD and cosine)."""
    cls = reference_projector_class()
    ref_kwargs, ours = settings
    grads = sequence(shape, 160)
    ref = run_reference(cls, grads, 2, **ref_kwargs)
    got = run_gradproj(grads, 2, monkeypatch, **ours)
    assert got[0] == ref[0], "refresh steps differ"
    assert got[1] == ref[1], "gaps differ"
    assert got[2] == ref[2], "similarity queues differ"
    assert ref[1][-1] > 2 or sequence is regime_gradients  # the schedule did change where gradients drift slowly
    if sequence is regime_gradients:
        assert max(ref[1]) > 2 and len(ref[0]) > 10  # both regimes were exercised


def test_fixed_is_the_default_and_unchanged(monkeypatch):
    grads = regime_gradients((24, 16), 60)
    p = nn.Parameter(torch.zeros(24, 16))
    opt = gradproj.GaLoreAdamW([{"params": [p], "rank": 4, "update_proj_gap": 2, "scale": 0.25}], lr=1e-3)
    assert opt.param_groups[0]["refresh"] == "fixed"
    for G in grads:
        p.grad = G.clone()
        opt.step()
    assert not any(k.startswith("lazy") for k in opt.state[p])


@pytest.mark.parametrize("projector", ["eigh", "randomized_svd", "golore"])
def test_every_svd_family_basis_grows_its_gap(projector, monkeypatch):
    extra = {"golore_switch_step": 100} if projector == "golore" else {}
    grads = regime_gradients((24, 16), 160)[40:]  # stable, noise, stable
    refreshes, gaps, _ = run_gradproj(grads, 2, monkeypatch, projector=projector, **extra)
    assert max(g for g in gaps if g is not None) >= 8
    assert refreshes[:3] == [0, 2, 4]
    if projector == "golore":  # the random phase refreshes every update_proj_gap steps, with no lazy state
        assert all(t in refreshes for t in range(100, 120, 2))


def test_golore_switch_drops_the_lazy_state():
    p = nn.Parameter(torch.zeros(24, 16))
    group = {"params": [p], "rank": 4, "update_proj_gap": 2, "scale": 0.25, "refresh": "lazy"}
    opt = gradproj.GaLoreAdamW([group], lr=1e-3, projector="golore", golore_switch_step=20)
    for t, G in enumerate(regime_gradients((24, 16), 30)):
        p.grad = G.clone()
        opt.step()
        assert (GAP_KEY in opt.state[p]) == (t < 20)


# ----------------------------------------------------------------------------------------- resume
def lazy_model_opt(**options):
    model = TinyNet()
    opt = gradproj.GaLoreAdamW(
        gradproj.param_groups(model, rank=4, update_proj_gap=2, scale=0.25),
        lr=3e-3,
        refresh="lazy",
        lazy_queue_size=2,
        **options,
    )
    return model, opt



def gaps(opt):
    return [opt.state[p].get(GAP_KEY) for g in opt.param_groups for p in g["params"] if GAP_KEY in opt.state[p]]


@pytest.mark.parametrize("stagger", [False, True], ids=["aligned", "staggered"])
def test_resume_is_bit_exact_across_a_gap_doubling(stagger):
    model, opt = lazy_model_opt(refresh_stagger=stagger)
    train(model, opt, 9)
    at_save = gaps(opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 30, seed=9)
    assert gaps(opt) != at_save and max(gaps(opt)) > max(at_save), "no gap grew after the checkpoint"

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2 = lazy_model_opt(refresh_stagger=stagger)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, 30, seed=9)
    for (k, v), w in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, w), k
    for p, q in zip(model.parameters(), model2.parameters()):
        a, b = opt.state[p], opt2.state[q]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def test_checkpoint_with_a_bad_lazy_state_is_refused_before_loading():
    model, opt = lazy_model_opt()
    train(model, opt, 5)
    sd = opt.state_dict()
    entry = next(s for s in sd["state"].values() if QUEUE_KEY in s)
    entry[QUEUE_KEY] = torch.zeros(7)
    model2, opt2 = lazy_model_opt()
    before = opt2.state_dict()
    with pytest.raises(ValueError, match=QUEUE_KEY):
        opt2.load_state_dict(sd)
    assert opt2.state_dict()["state"] == before["state"]

    entry[QUEUE_KEY] = torch.zeros(2)
    entry[GAP_KEY] = 2.0  # a float where an int belongs
    with pytest.raises(ValueError, match=GAP_KEY):
        opt2.load_state_dict(sd)

    fixed = gradproj.GaLoreAdamW(gradproj.param_groups(TinyNet(), rank=4, update_proj_gap=2, scale=0.25), lr=3e-3)
    sd = opt.state_dict()
    sd["param_groups"] = fixed.state_dict()["param_groups"]
    with pytest.raises(ValueError, match="lazy"):  # lazy state in a group whose refresh is fixed
        fixed.load_state_dict(sd)


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "options, match",
    [
        ({"refresh": "sometimes"}, "refresh"),
        ({"refresh": "lazy", "lazy_queue_size": 0}, "lazy_queue_size"),
        ({"refresh": "lazy", "lazy_queue_size": 2.5}, "lazy_queue_size"),
        ({"refresh": "lazy", "lazy_cos_threshold": 1.5}, "lazy_cos_threshold"),
        ({"refresh": "lazy", "lazy_cos_threshold": float("nan")}, "lazy_cos_threshold"),
        ({"refresh": "lazy", "lazy_gap_factor": 0.5}, "lazy_gap_factor"),
        ({"refresh": "lazy", "projector": "dct"}, "refresh"),
        ({"refresh": "lazy", "projector": "random"}, "refresh"),
    ],
)
def test_bad_options_raise_before_any_change(options, match):
    with pytest.raises(ValueError, match=match):
        gradproj.GaLoreAdamW(gradproj.param_groups(TinyNet(), rank=4, update_proj_gap=2, scale=0.25), **options)

    model, opt = lazy_model_opt()
    train(model, opt, 5)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}
    next(g for g in opt.param_groups if g.get("rank")).update(options)
    tiny_loss(model, tiny_batch(5)).backward()
    with pytest.raises(ValueError, match=match):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for p, s in opt.state.items():
        for k, v in s.items():
            old = state[id(p)][k]
            assert torch.equal(v, old) if torch.is_tensor(v) else v == old, k


# ------------------------------------------------------------------------------------ other step modes
@pytest.mark.parametrize("stagger", [False, True], ids=["aligned", "staggered"])
def test_layerwise_matches_normal_mode_bit_for_bit(stagger):
    models, opts = [], []
    for layerwise in (False, True):
        model, opt = lazy_model_opt(layerwise=layerwise, refresh_stagger=stagger)
        train(model, opt, 25)
        models.append(model)
        opts.append(opt)
    assert max(gaps(opts[0])) > 2
    for (k, v), w in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(v, w), k
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        a, b = opts[0].state[p], opts[1].state[q]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def test_layerwise_accumulation_uses_the_matrix_gap():
    model, opt = lazy_model_opt(layerwise=True, accumulation_steps=2)
    for s in range(25):
        for i in range(2):
            tiny_loss(model, tiny_batch(2 * s + i)).backward()
        opt.step()
        opt.zero_grad()
    assert max(gaps(opt)) > 2


@pytest.mark.parametrize("stagger", [False, True], ids=["aligned", "staggered"])
def test_foreach_step_uses_the_matrix_gap(stagger):
    """The batched step skips a matrix exactly at its own refresh steps: same bits as the per-parameter path."""
    models, opts = [], []
    for foreach in (False, True):
        model, opt = lazy_model_opt(foreach=foreach, refresh_stagger=stagger)
        train(model, opt, 25)
        models.append(model)
        opts.append(opt)
    assert max(gaps(opts[0])) > 2
    for (k, v), w in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6)
    assert gaps(opts[0]) == gaps(opts[1])


def test_svd_projector_declares_the_lazy_state():
    group = {"refresh": "lazy", "lazy_queue_size": 3}
    layout = SVDProjector((8, 4), 2, "std", {**SVDProjector.defaults, **group}).state_layout()
    assert layout[QUEUE_KEY].shape == (3,) and {COUNT_KEY, GAP_KEY} <= layout.keys()
    assert QUEUE_KEY not in SVDProjector((8, 4), 2, "std", dict(SVDProjector.defaults)).state_layout()


def _fsdp_refusal_body(rank, world):
    from torch.distributed.fsdp import fully_shard

    model = TinyNet()
    fully_shard(model)
    before = model.fc2.weight.full_tensor()
    opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4, update_proj_gap=2, scale=0.25), refresh="lazy")
    tiny_loss(model, tiny_batch(0)).backward()
    with pytest.raises(ValueError, match="refresh='lazy' is not available for sharded"):
        opt.step()
    assert torch.equal(model.fc2.weight.full_tensor(), before)  # nothing was updated


def test_fsdp_parameters_refuse_lazy_refresh():
    """Each rank would judge only its rows of a left basis, and ranks' gaps would drift apart: refused."""
    pytest.importorskip("torch.distributed.fsdp")
    from distributed_utils import run_distributed

    run_distributed(_fsdp_refusal_body)
