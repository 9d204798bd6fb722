"""The GEMM forms the CPU step chooses by timing travel with the optimizer's checkpoint, so a resumed run keeps
them (gradproj/optimizers/timed_choices.py)."""

import io

import pytest
import torch
from problems import matrix_problem, train

import gradproj
from gradproj.kernels import reference
from gradproj.optimizers import timed_choices
from gradproj.projectors import base as proj_base

SHAPES = [(64, 40), (48, 36)]  # m >= n: left projections (the timed layout), with weight decay (the timed fold)
RANK = 6
KEYS = [(m, n, RANK, torch.float32) for m, n in SHAPES]


def optimizer(params):
    groups = [{"params": params, "rank": RANK, "update_proj_gap": 50, "scale": 0.5}]
    return gradproj.GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1)


def choose(monkeypatch, form: bool) -> None:
    """This process's timed choices for the test's shapes, as if it had timed them so (restored after the test)."""
    for key in KEYS:
        monkeypatch.setitem(proj_base._LEFT_LAYOUT, key, form)
        monkeypatch.setitem(reference._DECAY_IN_GEMM, key, form)


def through_bytes(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_a_resumed_run_keeps_the_forms_it_was_written_with(monkeypatch):
    params, loss_fn = matrix_problem(SHAPES, seed=4)
    start = [p.detach().clone() for p in params]

    def fresh():
        return [torch.nn.Parameter(x.clone()) for x in start]

    choose(monkeypatch, False)  # the transposed left layout, the decay as a separate pass
    straight = fresh()
    train(straight, optimizer(straight), 6, loss_fn)

    first = fresh()
    opt = optimizer(first)
    train(first, opt, 3, loss_fn)
    sd = through_bytes(opt.state_dict())
    saved = sd["gradproj"][timed_choices.KEY]
    assert sorted(saved["left_layout"]) == sorted([m, n, RANK, "float32", False] for m, n in SHAPES)
    assert sorted(saved["decay_in_gemm"]) == sorted([m, n, RANK, "float32", False] for m, n in SHAPES)

    def resume(checkpoint):
        choose(monkeypatch, True)  # a new process that timed the other forms
        ps = [torch.nn.Parameter(p.detach().clone()) for p in first]
        o = optimizer(ps)
        o.load_state_dict(checkpoint)
        train(ps, o, 3, loss_fn)
        return ps

    resumed = resume(sd)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))
    # without the choices the other forms run, and they round differently here: the check above can fail
    other = resume({k: v for k, v in sd.items() if k != "gradproj"})
    assert any(not torch.equal(a, b) for a, b in zip(other, straight))


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"unknown": []},
        {"left_layout": [[64, 40, 6, "float32"]]},
        {"left_layout": [[64, 40, 6, "float99", True]]},
        {"left_layout": [[64, 0, 6, "float32", True]]},
        {"decay_in_gemm": [[64, 40, 6, "float32", 1]]},
    ],
)
def test_a_malformed_entry_is_refused_before_anything_loads(monkeypatch, bad):
    params, loss_fn = matrix_problem(SHAPES, seed=4)
    opt = optimizer(params)
    train(params, opt, 2, loss_fn)
    sd = opt.state_dict()
    sd["gradproj"] = {timed_choices.KEY: bad}
    before = {k: dict(v) for k, v in timed_choices.caches().items()}
    target = optimizer([torch.nn.Parameter(p.detach().clone()) for p in params])
    with pytest.raises(ValueError, match="timed_choices"):
        target.load_state_dict(sd)
    assert not target.state
    assert {k: dict(v) for k, v in timed_choices.caches().items()} == before


def test_only_the_optimizers_own_shapes_are_written(monkeypatch):
    choose(monkeypatch, True)
    monkeypatch.setitem(proj_base._LEFT_LAYOUT, (7, 5, 2, torch.float32), True)  # another optimizer's shapes
    monkeypatch.setitem(proj_base._LEFT_LAYOUT, (64, 40, 6, torch.bfloat16), True)
    params, loss_fn = matrix_problem(SHAPES, seed=4)
    opt = optimizer(params)
    train(params, opt, 2, loss_fn)
    rows = opt.state_dict()["gradproj"][timed_choices.KEY]["left_layout"]
    assert sorted(rows) == sorted([m, n, RANK, "float32", True] for m, n in SHAPES)
