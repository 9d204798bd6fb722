"""Per-layer stepping (layerwise=True): equality with normal mode, freed gradients, accumulation, clipping, resume."""

import gc
import io
import math
import warnings

import pytest
import torch

import gradproj
from optim_table import OPTIMIZERS, ids
from problems import TinyNet, clone_params, matrix_problem, tiny_batch, tiny_loss, train
from reference_algorithms import ReferenceGaLore


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=ids())
def test_matches_normal_mode_bit_for_bit(spec):
    """accumulation_steps=1: the same _update on the same gradient, so the same bits, scheduler included."""
    models, opts = [TinyNet(), TinyNet()], []
    for model, layerwise in zip(models, (False, True)):
        opt = spec.make(model, layerwise=layerwise)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        train(model, opt, 7, scheduler=sched)  # refreshes at t = 0, 3, 6
        opts.append(opt)
    assert_same_weights(*models)
    normal, layerwise = opts
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        for key, value in normal.state[p].items():
            other = layerwise.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


def live_grad_log(model):
    """Hooks registered after the optimizer's run after them: record which parameters still hold a gradient."""
    log = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(
            lambda _: log.append({n for n, q in model.named_parameters() if q.grad is not None})
        )
    return log


def test_every_gradient_is_freed_during_backward():
    model = TinyNet()
    opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5), lr=1e-2,
                               layerwise=True)
    log = live_grad_log(model)
    before = snapshot(model)
    tiny_loss(model, tiny_batch(0)).backward()
    assert len(log) == len(list(model.parameters()))
    assert all(not alive for alive in log), log  # at every hook, no full gradient coexists with another
    assert all(p.grad is None for p in model.parameters())
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) == len(before)  # every parameter was stepped during backward, before opt.step()
    opt.step()
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())


def test_accumulation_frees_projected_gradients_and_keeps_the_rest_in_grad():
    model = TinyNet()
    groups = gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5)
    opt = gradproj.GaLoreAdamW(groups, lr=1e-2, layerwise=True, accumulation_steps=3)
    log = live_grad_log(model)
    projected = {"fc1.weight", "fc2.weight"}
    for i in range(3):
        before = snapshot(model)
        tiny_loss(model, tiny_batch(i)).backward()
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        alive = {n for n, p in model.named_parameters() if p.grad is not None}
        if i < 2:
            assert not changed  # nothing is updated before the k-th micro-batch
            assert alive == {n for n, _ in model.named_parameters()} - projected  # unprojected: accumulate in grad
        else:
            assert changed == {n for n, _ in model.named_parameters()} and not alive
    assert not any(projected & alive for alive in log)  # a projected matrix's full gradient never outlives its hook
    mid = gradproj.optimizer_state_bytes(opt)
    opt.step()
    assert all(opt.state[p]["step"] == 1 and "accum" not in opt.state[p] for p in model.parameters())
    # mid-window, the buffers are the only extra state: fp32 R of fc1 (40 x 4) and fc2 (4 x 40)
    tiny_loss(model, tiny_batch(9)).backward()
    assert gradproj.optimizer_state_bytes(opt)["accumulation"] == (40 * 4 + 4 * 40) * 4
    assert mid["accumulation"] == 0


def galore_accumulation_reference(params, loss_fns, windows, micro, lr, rank, gap, scale, clip=None):
    """GaLore-AdamW whose gradient per step is the sum over micro-batches of the projections P^T G_i, with
    the basis refreshed from the window's first micro-batch gradient (docs/algorithms.md, GaLore, plus the layerwise
    rule), optionally clipped to norm ``clip``: written out from the formulas."""
    ref = ReferenceGaLore(params, lr=lr, rank=rank, gap=gap, alpha=scale)
    b1, b2, eps = ref.b1, ref.b2, ref.eps
    for w in range(windows):
        grads = []
        for i in range(micro):
            for p in params:
                p.grad = None
            loss_fns[(w * micro + i) % len(loss_fns)](params).backward()
            grads.append([p.grad.clone() for p in params])
        with torch.no_grad():
            for j, (W, st) in enumerate(zip(params, ref.state)):
                side = ref.side(W)
                if st["t"] % gap == 0:
                    st["P"] = ref.basis(grads[0][j], side)
                R = sum(ref.project(g[j], st["P"], side) for g in grads)
                if clip is not None:
                    R = R * min(1.0, clip / (R.norm().item() + 1e-6))
                st.setdefault("m", torch.zeros_like(R))
                st.setdefault("v", torch.zeros_like(R))
                st["m"] = b1 * st["m"] + (1 - b1) * R
                st["v"] = b2 * st["v"] + (1 - b2) * R * R
                st["t"] += 1
                t = st["t"]
                step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                W -= step_size * scale * ref.back(st["m"] / (st["v"].sqrt() + eps), st["P"], side)


@pytest.mark.parametrize("clip", [None, 0.05], ids=["noclip", "clip"])
def test_accumulation_matches_the_projected_sum_reference(clip):
    shapes = [(24, 10), (10, 24), (16, 16)]
    params, _ = matrix_problem(shapes, seed=1, dtype=torch.float64)
    loss_fns = [matrix_problem(shapes, seed=s, dtype=torch.float64)[1] for s in (11, 12, 13)]
    ref_params = clone_params(params)
    # the reference: exact SVD, every matrix refreshed at t % T == 0
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": 3, "update_proj_gap": 3, "scale": 0.5}], lr=2e-2,
                               layerwise=True, accumulation_steps=3, max_grad_norm=clip, projector="svd",
                               refresh_stagger=False)
    train(params, opt, 7, lambda ps, i: loss_fns[i % 3](ps), micro=3)  # refreshes at windows 0, 3, 6
    galore_accumulation_reference(ref_params, loss_fns, 7, 3, lr=2e-2, rank=3, gap=3, scale=0.5, clip=clip)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cls", [gradproj.FiraAdamW, gradproj.GaLoreAdamW], ids=["fira", "galore_unprojected"])
def test_full_gradient_accumulation_equals_normal_mode_accumulation(cls):
    """Parameters whose step needs the full gradient (Fira's residual; unprojected tensors) accumulate in p.grad
    and step exactly as normal mode with the same micro-batches."""
    models = [TinyNet(), TinyNet()]
    for model, layerwise in zip(models, (False, True)):
        if cls is gradproj.FiraAdamW:
            groups = gradproj.param_groups(model, rank=4, update_proj_gap=2, scale=0.5)
        else:
            groups = model.parameters()
        opt = cls(groups, lr=1e-2, layerwise=layerwise, accumulation_steps=2 if layerwise else 1)
        train(model, opt, 5, micro=2)
    assert_same_weights(*models)


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("cls,kwargs", [(gradproj.GaLoreAdamW, {}), (gradproj.GaLoreAdamW8bit, {"min_8bit_size": 100})],
                         ids=["galore", "galore8bit"])
def test_resume_in_layerwise_mode_is_bit_identical(cls, kwargs, accumulation):
    def make(model):
        groups = gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5)
        return cls(groups, lr=1e-2, layerwise=True, accumulation_steps=accumulation, **kwargs)

    model = TinyNet()
    opt = make(model)
    train(model, opt, 4, micro=accumulation)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 4, seed=50, micro=accumulation)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = TinyNet()
    model2.load_state_dict(ckpt["model"])
    opt2 = make(model2)
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, 4, seed=50, micro=accumulation)
    assert_same_weights(model, model2)


def test_normal_checkpoint_resumes_in_layerwise_mode():
    def make(model, layerwise):
        return gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5), lr=1e-2,
                                    layerwise=layerwise)

    model = TinyNet()
    opt = make(model, False)
    train(model, opt, 4)
    sd = opt.state_dict()
    model2 = TinyNet()
    model2.load_state_dict(model.state_dict())
    opt2 = make(model2, True)
    opt2.load_state_dict(sd)
    train(model, opt, 4, seed=30)
    train(model2, opt2, 4, seed=30)
    assert_same_weights(model, model2)


def test_max_grad_norm_is_per_parameter_clipping_in_both_modes():
    """Normal mode with max_grad_norm == clip_grad_norm_ on each parameter alone, then an unclipped step;
    layerwise mode with max_grad_norm == normal mode with it."""
    models = [TinyNet(), TinyNet(), TinyNet()]
    make = lambda m, **kw: gradproj.GaLoreAdamW(  # noqa: E731
        gradproj.param_groups(m, rank=4, update_proj_gap=3, scale=0.5), lr=1e-2, **kw)
    ref, normal, layerwise = make(models[0]), make(models[1], max_grad_norm=0.1), make(
        models[2], max_grad_norm=0.1, layerwise=True)
    norms = []
    for s in range(5):
        for model, opt in zip(models, (ref, normal, layerwise)):
            tiny_loss(model, tiny_batch(s)).backward()
            if opt is ref:
                norms += [torch.nn.utils.clip_grad_norm_([p], 0.1).item() for p in model.parameters()]
            opt.step()
            opt.zero_grad()
    assert max(norms) > 0.1  # the clip bites
    assert_same_weights(models[0], models[1])
    assert_same_weights(models[1], models[2])


def test_more_backward_passes_than_accumulation_steps_raise():
    model = TinyNet()
    opt = gradproj.GaLoreAdamW(model.parameters(), lr=1e-2, layerwise=True, accumulation_steps=2)
    tiny_loss(model, tiny_batch(0)).backward()
    tiny_loss(model, tiny_batch(1)).backward()
    with pytest.raises(RuntimeError, match="more than accumulation_steps=2 backward passes"):
        tiny_loss(model, tiny_batch(2)).backward()
    opt.zero_grad()  # the error ended the window (whose parameters were stepped by the second pass): go on
    train(model, opt, 2, micro=2)
    assert all(opt.state[p]["step"] == 3 for p in model.parameters())


# ------------------------------------------------------------------------------------ errors end the window
def make_galore(model, accumulation=1, **kwargs):
    groups = gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5, trainable_only=False)
    return gradproj.GaLoreAdamW(groups, lr=1e-2, layerwise=True, accumulation_steps=accumulation, **kwargs)


def state_copy(opt, model):
    return {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            for n, p in model.named_parameters() if opt.state.get(p)}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key, value in a[name].items():
            other = b[name][key]
            same = torch.is_tensor(other) and value.dtype == other.dtype and torch.equal(value, other)
            assert same if torch.is_tensor(value) else value == other, (name, key)


def assert_trains_like_a_fresh_optimizer(model, opt, accumulation, **kwargs):
    """zero_grad(), then windows of good batches: the same bits as a new model and optimizer loaded with the
    weights and optimizer state that the error left (an optimizer that never saw the bad batch)."""
    twin = TinyNet()
    twin.load_state_dict(model.state_dict())
    twin_opt = make_galore(twin, accumulation, **kwargs)
    twin_opt.load_state_dict(opt.state_dict())
    opt.zero_grad()
    for m, o in ((model, opt), (twin, twin_opt)):
        train(m, o, 4, seed=200, micro=accumulation)  # windows t, ..., t + 3: a refresh among them
    assert_same_weights(model, twin)
    assert_same_state(state_copy(opt, model), state_copy(twin_opt, twin))


def changed(model, weights):
    return {n for n, v in model.state_dict().items() if not torch.equal(v, weights[n])}


def assert_untouched_unless_stepped(model, opt, weights, state):
    """Parameters whose weights did not move have every state tensor as before; the others took one step."""
    stepped = changed(model, weights)
    after = state_copy(opt, model)
    for name in weights:
        if name in stepped:
            assert after[name]["step"] == state.get(name, {}).get("step", 0) + 1, name
        else:
            assert_same_state({name: after.get(name, {})}, {name: state.get(name, {})})
    return stepped


@pytest.mark.parametrize("accumulation,micro", [(1, 1), (2, 2), (2, 1)], ids=["k1", "k2", "k2_short_window"])
def test_step_raising_at_a_first_refresh_ends_the_window(accumulation, micro):
    """fc1 trains for the first time on a NaN gradient, so no basis can be computed and step() raises (the
    documented error). Afterwards zero_grad() and new windows work and train bit for bit as a fresh optimizer
    given the same weights and state; whatever was not stepped during backward is as it was before."""
    model = TinyNet()
    model.fc1.requires_grad_(False)  # fc1 gets its first gradient (and first refresh) in the bad window
    opt = make_galore(model, accumulation)
    train(model, opt, 3, micro=accumulation)  # next window: step 3, a refresh for every projected matrix
    model.fc1.requires_grad_(True)
    weights, state = snapshot(model), state_copy(opt, model)
    for i in range(micro):
        (tiny_loss(model, tiny_batch(100 + i)) + model.fc1.weight.sum() * math.nan).backward()
    with pytest.raises(ValueError, match="NaN/Inf at its first basis refresh"):
        opt.step()
    stepped = assert_untouched_unless_stepped(model, opt, weights, state)
    if micro == accumulation:  # every window but fc1.weight's was complete: stepped during backward
        assert stepped == set(weights) - {"fc1.weight"}
    else:  # a short window: nothing was stepped, the refreshes at its start were undone
        assert not stepped
        assert_same_state(state_copy(opt, model), state)
    assert model.fc1.weight not in opt.state and model.fc1.weight.grad.isnan().all()  # kept, as normal mode keeps it
    assert_trains_like_a_fresh_optimizer(model, opt, accumulation)


@pytest.mark.parametrize("accumulation,where", [(1, "prepare"), (1, "step_param"), (3, "prepare")],
                         ids=["k1_checks", "k1_update", "k3_mid_window"])
def test_a_hook_raising_during_backward_ends_the_window(monkeypatch, accumulation, where):
    """An error inside fc1's hook (a RuntimeError, as out of memory would be; in its checks or at the start of its
    update) makes backward() raise. Parameters not stepped keep their weights and every state tensor bit for
    bit, including a basis refreshed at the window's first micro-batch, and fc1 keeps its gradient; zero_grad()
    and new windows train as a fresh optimizer with that state."""
    model = TinyNet()
    opt = make_galore(model, accumulation, moments_on_refresh="project")
    train(model, opt, 3, micro=accumulation)  # next window: step 3, a refresh that also maps the moments
    weights, state = snapshot(model), state_copy(opt, model)
    real, armed = getattr(opt.engine, where), []

    def failing(*args):
        p = args[2] if where == "prepare" else args[0]
        if armed and p is model.fc1.weight:
            raise RuntimeError("simulated failure")
        return real(*args)

    monkeypatch.setattr(opt.engine, where, failing)
    if accumulation > 1:
        tiny_loss(model, tiny_batch(100)).backward()  # the window's first micro-batch: refreshes, accumulates
    armed.append(True)
    with pytest.raises(RuntimeError, match="simulated failure"):
        tiny_loss(model, tiny_batch(101)).backward()
    monkeypatch.undo()
    stepped = assert_untouched_unless_stepped(model, opt, weights, state)
    assert "fc1.weight" not in stepped and "emb.weight" not in stepped  # the embedding's hook comes after fc1's
    if accumulation == 1:
        assert {"head.weight", "fc2.weight"} <= stepped  # their hooks ran first: stepped during backward
    else:
        assert not stepped  # mid-window: no update yet; the refreshes and buffers of the window are undone
    assert model.fc1.weight.grad is not None  # the gradient whose hook raised stays
    assert_trains_like_a_fresh_optimizer(model, opt, accumulation, moments_on_refresh="project")


def test_step_raising_after_the_hooks_stepped_ends_the_window():
    """A group option broken between backward and step() (the hooks had validated the groups): step() raises,
    and once fixed, the next backward steps every parameter again instead of refusing a second update."""
    model = TinyNet()
    opt = make_galore(model)
    train(model, opt, 2)
    tiny_loss(model, tiny_batch(9)).backward()  # every parameter stepped during backward
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    opt.param_groups[0]["lr"] = 1e-2
    assert_trains_like_a_fresh_optimizer(model, opt, 1)
    assert all(opt.state[p]["step"] == 7 for p in model.parameters())


def test_step_closes_a_short_window_from_what_was_accumulated():
    """step() after fewer than k micro-batches applies the partial sum (the same as a window of that size)."""
    shapes = [(24, 10), (10, 24)]
    params, _ = matrix_problem(shapes, seed=1, dtype=torch.float64)
    loss_fns = [matrix_problem(shapes, seed=s, dtype=torch.float64)[1] for s in (11, 12)]
    ref_params = clone_params(params)
    # the reference: exact SVD, every matrix refreshed at t % T == 0
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": 3, "update_proj_gap": 5, "scale": 0.5}], lr=2e-2,
                               layerwise=True, accumulation_steps=3, projector="svd", refresh_stagger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(params, opt, 3, lambda ps, i: loss_fns[i % 2](ps), micro=2)
    text = [str(w.message) for w in caught]
    assert sum("closed an accumulation window after 2 of accumulation_steps=3" in t for t in text) == 1  # once
    galore_accumulation_reference(ref_params, loss_fns, 3, 2, lr=2e-2, rank=3, gap=5, scale=0.5)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_gradients_without_a_hook_are_stepped_by_step():
    """A gradient set by hand (no backward, so no hook ran) is stepped by opt.step() exactly as in normal mode."""
    Ws = [torch.nn.Parameter(torch.randn(12, 8, generator=torch.Generator().manual_seed(0))) for _ in range(2)]
    opts = [gradproj.GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": 2, "scale": 1.0}], lr=1e-2,
                                 layerwise=lw) for W, lw in zip(Ws, (False, True))]
    for s in range(3):
        g = torch.randn(12, 8, generator=torch.Generator().manual_seed(s + 1))
        for W, opt in zip(Ws, opts):
            W.grad = g.clone()
            opt.step()
    assert torch.equal(Ws[0], Ws[1]) and Ws[1].grad is None


def test_parameters_frozen_at_construction_are_stepped_during_backward_once_unfrozen():
    models = [TinyNet(), TinyNet()]
    opts = []
    for model, layerwise in zip(models, (False, True)):
        model.fc1.requires_grad_(False)
        opts.append(gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5,
                                                               trainable_only=False), lr=1e-2, layerwise=layerwise))
    for s in range(5):
        if s == 2:
            for model in models:
                model.fc1.requires_grad_(True)
        for model, opt in zip(models, opts):
            tiny_loss(model, tiny_batch(s)).backward()
            if opt is opts[1]:  # every gradient, fc1's included once it trains, was consumed during backward
                assert all(p.grad is None for p in model.parameters())
            opt.step()
            opt.zero_grad()
        assert opts[1].state[models[1].fc1.weight].get("step", 0) == max(0, s - 1)
    assert_same_weights(*models)
    with torch.inference_mode():  # a tensor that can never train needs no hook, and is no reason to refuse
        frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    gradproj.GaLoreAdamW([frozen], layerwise=True)


def test_bad_group_in_layerwise_mode_raises_at_step_and_changes_nothing():
    models = [TinyNet(), TinyNet()]
    opts = [gradproj.GaLoreAdamW(gradproj.param_groups(m, rank=4, update_proj_gap=3, scale=0.5), lr=1e-2,
                                 layerwise=lw) for m, lw in zip(models, (False, True))]
    train(models[1], opts[1], 2)
    train(models[0], opts[0], 2)
    before = snapshot(models[1])
    opts[1].param_groups[-1]["rank"] = 0
    tiny_loss(models[1], tiny_batch(7)).backward()  # the hooks stand aside: gradients stay in p.grad
    assert all(p.grad is not None for p in models[1].parameters())
    with pytest.raises(ValueError, match="rank = 0 must be a positive integer"):
        opts[1].step()
    assert all(torch.equal(v, before[k]) for k, v in models[1].state_dict().items())
    opts[1].param_groups[-1]["rank"] = 4
    opts[1].step()  # fixed: the kept gradients are stepped as normal mode steps them
    train(models[0], opts[0], 1, seed=7)
    assert_same_weights(*models)


def test_closure_and_option_errors():
    model = TinyNet()
    opt = gradproj.GaLoreAdamW(model.parameters(), lr=1e-2, layerwise=True)
    batch = tiny_batch(0)

    def closure():
        opt.zero_grad()
        loss = tiny_loss(model, batch)
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(5):
        last = opt.step(closure)
    assert last < first
    for kwargs, err, message in [
        ({"layerwise": True, "accumulation_steps": 0}, ValueError, "accumulation_steps = 0"),
        ({"accumulation_steps": 2}, ValueError, "applies to layerwise=True"),
        ({"layerwise": "yes"}, TypeError, "layerwise = 'yes'"),
        ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm = -1.0"),
    ]:
        with pytest.raises(err, match=message):
            gradproj.GaLoreAdamW(TinyNet().parameters(), **kwargs)


def test_hooks_go_away_with_the_optimizer():
    model = TinyNet()
    opt = gradproj.GaLoreAdamW(model.parameters(), lr=1e-2, layerwise=True)
    del opt
    gc.collect()
    before = snapshot(model)
    tiny_loss(model, tiny_batch(0)).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.gpu
def test_cuda_layerwise_matches_normal_mode():
    """On CUDA the hooks run on autograd's device thread; the updates are still those of normal mode."""
    models = [TinyNet().cuda(), TinyNet().cuda()]
    for model, layerwise in zip(models, (False, True)):
        opt = gradproj.GaLoreAdamW8bit(gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5), lr=1e-2,
                                       min_8bit_size=100, layerwise=layerwise)
        train(model, opt, 5, lambda m, i: tiny_loss(m, tuple(t.cuda() for t in tiny_batch(i))))
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_is_refused_with_the_fix(unscale_first):
    """torch's GradScaler reaches step() (not its "No inf checks were recorded"), which names the fix; the scaler's
    marks are removed, so the same optimizer steps normally without it."""
    model = TinyNet()
    opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4, update_proj_gap=2), lr=1e-3, layerwise=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(tiny_loss(model, tiny_batch(0))).backward()
    if unscale_first:  # the documented place to clip
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"GradScaler.*bf16=True.*layerwise=False"):
        scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_grad_scaler_still_unscales_in_normal_mode():
    """Only layerwise optimizers take the scaler's step themselves: in normal mode it unscales as usual, so the
    step equals the unscaled one (a power-of-two scale is exact in floating point)."""
    model, ref = TinyNet(), TinyNet()
    opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4, update_proj_gap=2), lr=1e-3)
    ref_opt = gradproj.GaLoreAdamW(gradproj.param_groups(ref, rank=4, update_proj_gap=2), lr=1e-3)
    assert not hasattr(opt, "_step_supports_amp_scaling")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i in range(3):
        opt.zero_grad()
        scaler.scale(tiny_loss(model, tiny_batch(i))).backward()
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        tiny_loss(ref, tiny_batch(i)).backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
