"""``gradproj train --project-backward`` and ``gradproj memory --project-backward``.

The runs train the tiny LLaMA in float64 with the ``svd_fp64`` projector (as tests/test_train_distributed.py
does, whose tolerances and their derivation apply here unchanged): projected backward computes R = PᵀG as
(dY P)ᵀ X, the same products in another order, so in float64 its trajectory equals normal mode's up to
rounding of the order of 1e-15, plus the rare one-ulp differences of the float32 casts inside transformers'
LLaMA, which that module's WEIGHT_RTOL bounds. A step taken from a wrong R (another basis, a missing
back-projection, R summed over the ranks instead of averaged) moves the weights by 1e-3 or more.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from distributed_utils import run_distributed
from gradproj.optimizers.projected_backward import PROXY
from gradproj.train import loop
from gradproj.train.cli import main
from gradproj.train.loop import TIMING_KEYS, TrainConfig
from gradproj.train.models import build_model
from test_cli_checks import no_work  # noqa: F401  # the fixture: reading data or building the model fails
from test_train_distributed import ARGS, LOSS_TOL, _assert_weights_close, _body, _final_weights
from test_train_distributed import float64_training  # noqa: F401  # the autouse fixture: train in float64

PB = [*ARGS, "--project-backward"]  # 5 steps, --update-proj-gap 3: bases computed at step 1, refreshed at 4
REFRESH_STEPS = {1, 4}


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _recording(build, steps: list):
    """``build_optimizer`` that records, before every optimizer step, for each block ``nn.Linear``: whether its
    weight holds a gradient, and the shape of its proxy's gradient (None: no proxy, or no gradient on it)."""

    def recording(model, *args, **kwargs):
        optimizer = build(model, *args, **kwargs)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}

        def before_step(opt, a, k):
            row = {}
            for name, m in linears.items():
                proxy = getattr(m, PROXY, None)
                row[name] = (m.weight.grad is not None, None if proxy is None or proxy.grad is None
                             else tuple(proxy.grad.shape))
            steps.append(row)

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    return recording


@pytest.fixture
def seen(monkeypatch):
    steps: list = []
    monkeypatch.setattr(loop, "build_optimizer", _recording(loop.build_optimizer, steps))
    return steps


def _check_steps(steps, first_step=1):
    """Refresh steps: every block weight has its full gradient and no R; the others: an R whose short side is
    the rank (8), and no full gradient."""
    assert steps
    for step, row in enumerate(steps, start=first_step):
        assert row and all(len(v) == 2 for v in row.values())
        for name, (full, r_shape) in row.items():
            if step in REFRESH_STEPS:
                assert full and r_shape is None, (step, name, full, r_shape)
            else:
                assert not full and r_shape is not None, (step, name, full, r_shape)
                assert min(r_shape) == 8, (step, name, r_shape)


@pytest.fixture(scope="module")
def single(tmp_path_factory, float64_training):
    """One process, --batch 4, 5 steps with --project-backward (and the steps it saw), and the same run
    without the flag."""
    out = str(tmp_path_factory.mktemp("pb") / "run")
    normal = str(tmp_path_factory.mktemp("normal") / "run")
    steps: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "build_optimizer", _recording(loop.build_optimizer, steps))
        assert main(["train", *PB, "--batch", "4", "--out", out]) == 0
    assert main(["train", *ARGS, "--batch", "4", "--out", normal]) == 0
    return out, normal, steps


def test_the_flag_trains_from_r_and_is_saved(single):
    out, normal, steps = single
    _check_steps(steps)  # the proxies carried R at steps 2, 3, 5; full gradients at 1 and 4
    assert len(steps) == 5
    config = TrainConfig.from_dict(json.loads(open(os.path.join(out, "config.json")).read()))
    assert config.optimizer.project_backward is True
    losses = [r["loss"] for r in _metrics(out)]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)

    final = _final_weights(out)
    assert not any(k.endswith(PROXY) for k in final)  # the proxies are not part of the checkpoint
    start = build_model(config.model, config.vocab_size, config.seq_len, seed=config.seed, dtype=torch.float64)
    start_sd = start.state_dict()
    projected = [k for k in final if ".layers." in k and k.endswith("proj.weight")]
    assert len(projected) == 7 * len(start.model.layers)
    # every projected matrix moved, and by as much as a step of lr 1e-2 x scale 0.25 leaves (not by rounding)
    assert all(float((final[k] - start_sd[k]).abs().max()) > 1e-4 for k in projected)
    # the same trajectory as without the flag, up to rounding (module docstring)
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor([r["loss"] for r in _metrics(normal)]), **LOSS_TOL
    )
    _assert_weights_close(final, _final_weights(normal))


def test_resume_keeps_the_flag_and_continues_exactly(single, seen, tmp_path):
    out, _, _ = single
    split = str(tmp_path / "split")
    assert main(["train", *PB, "--batch", "4", "--out", split, "--stop-at", "3"]) == 0
    assert main(["train", "--resume", split, "--quiet", "--threads", "1"]) == 0
    _check_steps(seen[:3])
    _check_steps(seen[3:], first_step=4)  # the resumed invocation switched projected backward on again
    assert _without_timing(_metrics(split)) == _without_timing(_metrics(out))
    a, b = _final_weights(split), _final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_match_one(single, tmp_path, accum):
    """DDP reduces the proxies (R) and, at refresh steps, the handle averages the full gradients; with
    --grad-accum 2 the micro-batches before the last are not reduced (no_sync) and R accumulates locally."""
    if accum == 1:
        ref_out = single[0]
    else:
        ref_out = str(tmp_path / "one")
        assert main(["train", *PB, "--batch", "4", "--grad-accum", "2", "--out", ref_out]) == 0
    out = str(tmp_path / "ddp")
    run_distributed(_body, [["train", *PB, "--batch", "2", "--grad-accum", str(accum), "--out", out]],
                    torchrun_env=True)
    ref = _metrics(ref_out)
    got = _metrics(out)
    assert len(got) == 5
    torch.testing.assert_close(torch.tensor([r["loss"] for r in got]), torch.tensor([r["loss"] for r in ref]),
                               **LOSS_TOL)
    _assert_weights_close(_final_weights(out), _final_weights(ref_out))
    assert json.loads(open(os.path.join(out, "config.json")).read())["optimizer"]["project_backward"] is True


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--optimizer", "fira_adamw"], "residual='fira'"),
        (["--optimizer", "frugal_adamw"], "residual='frugal'"),
        (["--optimizer", "apollo_adamw"], "residual='apollo'"),
        (["--optimizer", "adamw"], "adamw projects nothing"),
        (["--layerwise"], "--layerwise"),
        (["--group-option", "compile=True"], "compile=True"),
        (["--fsdp"], "--fsdp"),
    ],
)
def test_incompatible_settings_are_refused_before_any_work(tmp_path, no_work, capsys, flags, names):  # noqa: F811
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", *PB, "--batch", "2", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--project-backward" in err and names in err, err
    assert not out.exists()


def test_compare_takes_it_as_a_spec_option_and_checks_it_first(tmp_path, no_work, capsys):  # noqa: F811
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--optimizers", "galore_adamw:project_backward=true", "fira_adamw:project_backward=true",
              "--model", "tiny", "--steps", "2", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "fira_adamw:project_backward=true" in err and "residual='fira'" in err, err
    assert not out.exists()


def test_memory_flag_is_the_estimators_option(capsys):
    from gradproj.memory_estimate import estimate_memory

    argv = ["memory", "--model", "llama_60m", "--optimizer", "galore_adamw", "--rank", "128", "--json"]
    assert main([*argv, "--project-backward"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = estimate_memory("llama_60m", "galore_adamw", 128, project_backward=True, dtype="bfloat16").as_dict()
    assert {k: v for k, v in got.items() if k != "per_device"} == json.loads(json.dumps(want))
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["gradients"] > got["gradients"]  # R instead of G


@pytest.mark.parametrize(
    "flags, names",
    [(["--optimizer", "fira_adamw"], "residual rule"), (["--layerwise"], "--layerwise"), (["--optimizer", "adamw"],
                                                                                           "projects nothing")],
)
def test_memory_flag_refuses_what_the_estimator_refuses(capsys, flags, names):
    with pytest.raises(SystemExit) as exc:
        main(["memory", "--optimizer", "galore_adamw", "--project-backward", *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--project-backward" in err and names in err, err
