"""Generic optimizer behaviour, run over every optimizer in the table (tests/optim_table.py)."""

import io
import math

import pytest
import torch

import gradproj
from optim_table import OPTIMIZERS, ids
from problems import TinyNet, tiny_batch, tiny_loss, train


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=ids())
def test_trains_a_small_model_down(spec):
    model = TinyNet()
    opt = spec.make(model, lr=2e-2)
    losses = train(model, opt, 60)
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=ids())
def test_none_grads_are_skipped(spec):
    model = TinyNet()
    opt = spec.make(model)
    model.fc2.weight.requires_grad_(False)  # no grad this step
    frozen = model.fc2.weight.detach().clone()
    train(model, opt, 2)
    assert torch.equal(model.fc2.weight, frozen)
    assert len(opt.state[model.fc2.weight]) == 0


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=ids())
def test_closure_returns_loss_and_steps(spec):
    model = TinyNet()
    opt = spec.make(model)
    batch = tiny_batch(0)

    def closure():
        opt.zero_grad()
        loss = tiny_loss(model, batch)
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(10):
        last = opt.step(closure)
    assert isinstance(first, torch.Tensor) and last < first


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=ids())
def test_add_param_group_trains_new_params(spec):
    model = TinyNet()
    opt = spec.make(model)
    extra = torch.nn.Linear(16, 16)
    opt.add_param_group({"params": [extra.weight], "rank": 2, "update_proj_gap": 2, "scale": 1.0, "projector": "svd"})
    before = extra.weight.detach().clone()
    extra.weight.grad = torch.randn(16, 16)
    opt.step()
    assert not torch.equal(extra.weight, before)
    assert opt.state[extra.weight]["proj"].shape == (2, 16)  # square: right projection, basis r x n


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=ids())
def test_lr_scheduler_drives_every_group(spec):
    model = TinyNet()
    opt = spec.make(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 3 else 0.0)
    train(model, opt, 3, scheduler=sched)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    frozen = snapshot(model)
    train(model, opt, 3, seed=10, scheduler=sched)
    decay = [g["weight_decay"] for g in opt.param_groups]
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items()), decay


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=ids())
def test_save_weights_only_load_resume_is_bit_identical(spec, dtype):
    """Train 7 steps (crossing refreshes at 0, 3, 6), checkpoint, continue 5 more; a fresh optimizer loaded from
    the checkpoint (torch.load(weights_only=True)) reproduces the same weights bit for bit."""
    model = TinyNet().to(dtype)
    opt = spec.make(model)
    train(model, opt, 7)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 5, seed=100)
    expected = snapshot(model)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = TinyNet().to(dtype)
    model2.load_state_dict(ckpt["model"])
    opt2 = spec.make(model2)
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, 5, seed=100)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=ids())
def test_state_keeps_its_dtype_through_load(spec):
    """fp32 state for bf16 weights stays fp32 after load_state_dict (torch.optim would cast it to bf16)."""
    model = TinyNet().to(torch.bfloat16)
    opt = spec.make(model, state_dtype=torch.float32)
    train(model, opt, 2)
    sd = opt.state_dict()
    opt2 = spec.make(model, state_dtype=torch.float32)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        for key, value in opt2.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == opt.state[p][key].dtype, (key, value.dtype)
    moments = [v for k, v in opt2.state[model.fc1.weight].items() if k.startswith("exp_avg")]
    assert moments and all(v.dtype == torch.float32 for v in moments)


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=ids())
def test_state_holds_only_tensors_and_scalars(spec):
    model = TinyNet()
    opt = spec.make(model)
    train(model, opt, 4)
    for state in opt.state.values():
        for key, value in state.items():
            assert isinstance(value, (torch.Tensor, int, float, bool)), (key, type(value))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=ids())
def test_bad_group_options_raise_and_change_nothing(spec):
    model = TinyNet()
    opt = spec.make(model)
    train(model, opt, 2)
    weights, state = snapshot(model), {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                                       for p, s in opt.state.items()}
    projected = opt.param_groups[-1]
    for key, bad, message in [
        ("rank", 0, "rank = 0 must be a positive integer"),
        ("proj_type", "diagonal", "proj_type = 'diagonal'"),
        ("projector", "qr", "unknown projector 'qr'"),
        ("update_proj_gap", -1, "update_proj_gap = -1"),
    ]:
        good = projected[key]
        projected[key] = bad
        tiny_loss(model, tiny_batch(5)).backward()
        with pytest.raises(ValueError, match=message):
            opt.step()
        projected[key] = good
        opt.zero_grad()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    for p, s in opt.state.items():
        for k, v in s.items():
            assert (torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k]), k


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=ids())
def test_sparse_gradient_raises_before_any_update(spec):
    model = TinyNet()
    opt = spec.make(model)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt.add_param_group({"params": emb.parameters()})
    tiny_loss(model, tiny_batch(0)).backward()
    emb(torch.tensor([1, 2])).sum().backward()
    weights = snapshot(model)
    with pytest.raises(ValueError, match="sparse gradient"):
        opt.step()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=ids())
def test_zero_grad_and_repeated_steps_without_grads(spec):
    model = TinyNet()
    opt = spec.make(model)
    train(model, opt, 1)
    opt.zero_grad(set_to_none=True)
    before = snapshot(model)
    opt.step()  # no grads at all: nothing moves
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(math.isfinite(p.float().sum().item()) for p in model.parameters())
