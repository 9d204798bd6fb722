"""GaLoreAdafactor against transformers' Adafactor (unprojected groups) and galore-torch's GaLoreAdafactor."""

import importlib.util

import pytest
import torch
from torch import nn

import gradproj
from problems import TinyNet, clone_params, matrix_problem, train

CONFIGS = {
    "defaults": dict(),  # relative_step, scale_parameter, lr=None
    "external_lr": dict(lr=3e-2, relative_step=False, scale_parameter=False),
    "beta1_clip": dict(lr=3e-2, relative_step=False, beta1=0.9, clip_threshold=0.5),
    "warmup_init": dict(warmup_init=True, decay_rate=-0.5),
}


def problem(seed, dtype=torch.float64):
    """A matrix, a 3-D tensor (factored over its last two dims) and a vector, with a shared loss."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g, dtype=dtype) * 0.3) for s in [(12, 9), (3, 5, 7), (11,)]]
    X = torch.randn(16, 9, generator=g, dtype=dtype)

    def loss_fn(ps, index=None):
        W, T, b = ps
        h = torch.tanh(X @ W.T + b.sum())
        return (h**2).mean() + (T.sin() ** 2).mean() + ((b - 1.0) ** 2).mean()

    return params, loss_fn


def step_both(opts, param_sets, loss_fn, steps):
    for _ in range(steps):
        for opt, ps in zip(opts, param_sets):
            train(ps, opt, 1, loss_fn)


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_unprojected_groups_are_transformers_adafactor(config):
    from transformers.optimization import Adafactor

    params, loss_fn = problem(0)
    ref_params = clone_params(params)
    ours = gradproj.GaLoreAdafactor(params, **CONFIGS[config])
    ref = Adafactor(ref_params, **CONFIGS[config])
    step_both([ours, ref], [params, ref_params], loss_fn, 12)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert set(ours.state[params[0]]) >= {"exp_avg_sq_row", "exp_avg_sq_col"}
    assert ours.state[params[1]]["exp_avg_sq_row"].shape == (3, 5)  # factored over the last two dims
    assert "exp_avg_sq" in ours.state[params[2]]


def test_weight_decay_differs_from_transformers_only_by_its_placement():
    """transformers decays before adding the update, gradproj after (decoupled, like GaLore's AdamW): the
    difference per step is lr_t·wd·u, second order, so trajectories agree to ~lr·wd·|u|."""
    from transformers.optimization import Adafactor

    params, loss_fn = problem(1)
    ref_params, nodecay = clone_params(params), clone_params(params)
    kw = dict(lr=1e-2, relative_step=False, weight_decay=0.1)
    opts = [gradproj.GaLoreAdafactor(params, **kw), Adafactor(ref_params, **kw),
            gradproj.GaLoreAdafactor(nodecay, **{**kw, "weight_decay": 0.0})]
    step_both(opts, [params, ref_params, nodecay], loss_fn, 10)
    for a, b, c in zip(params, ref_params, nodecay):
        decay_effect = (b - c).abs().max()
        assert (a - b).abs().max() < 1e-2 * decay_effect  # same decay, up to the second-order term
        assert decay_effect > 1e-4


@pytest.mark.skipif(importlib.util.find_spec("galore_torch") is None, reason="galore-torch not installed")
@pytest.mark.parametrize("proj_type", ["std", "left", "right"])
def test_matches_original_galore_adafactor(proj_type):
    import galore_torch

    shapes = [(30, 12), (12, 30)]
    params, loss_fn = matrix_problem(shapes, seed=3, dtype=torch.float64)
    orig_params = clone_params(params)
    group = {"rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": proj_type}
    kw = dict(lr=2e-2, relative_step=False, scale_parameter=True, beta1=0.9, weight_decay=0.0)
    # galore-torch: exact SVD, every matrix refreshed at t % T == 0
    ours = gradproj.GaLoreAdafactor([{"params": params, **group}], projector="svd", refresh_stagger=False, **kw)
    orig = galore_torch.GaLoreAdafactor([{"params": orig_params, **group}], **kw)
    step_both([ours, orig], [params, orig_params], loss_fn, 16)  # refreshes at t = 0, 5, 10, 15
    for a, b in zip(params, orig_params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # the second-moment factors are those of R: 30 x 4 for the right projection of the 30 x 12 weight, 4 x 12 left
    st = ours.state[params[0]]
    R_shape = (4, 12) if proj_type == "left" else (30, 4)
    assert (st["exp_avg_sq_row"].shape, st["exp_avg_sq_col"].shape) == ((R_shape[0],), (R_shape[1],))


def test_state_bytes_by_part():
    model = TinyNet()
    opt = gradproj.GaLoreAdafactor(gradproj.param_groups(model, rank=4), lr=1e-2, relative_step=False, beta1=0.9)
    train(model, opt, 1)
    got = gradproj.optimizer_state_bytes(opt)
    # projected fc1 (40x16: R 40x4) and fc2 (16x40: R 4x40): row + col + m; bases 4x16 and 16x4
    projected = (40 + 4 + 40 * 4) + (4 + 40 + 4 * 40)
    # unprojected: emb 23x16 and head 23x16 factored; biases 40, 16 and norm 16 + 16 unfactored (v); plus m
    full = 2 * (23 + 16 + 23 * 16) + 2 * (40 + 16 + 16 + 16)
    assert got["basis"] == 4 * (4 * 16 + 16 * 4)
    assert got["moments"] == 4 * (projected + full)
    assert got["other"] == 4 * 8  # the weight's RMS, one fp32 scalar per tensor (8 tensors)
    assert got["scales"] == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=1e-3), "cannot be combined with relative_step=True"),
        (dict(relative_step=False), "lr=None needs relative_step=True"),
        (dict(lr=1e-3, relative_step=False, warmup_init=True), "warmup_init=True requires relative_step=True"),
        (dict(eps=1e-3), "eps = 0.001 must be a pair"),
        (dict(clip_threshold=0.0), "clip_threshold = 0.0 must be > 0"),
        (dict(beta1=1.0), "beta1 = 1.0 must be in"),
        (dict(decay_rate=0.8), "decay_rate = 0.8 must be <= 0"),
    ],
)
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        gradproj.GaLoreAdafactor([nn.Parameter(torch.randn(4, 4))], **kwargs)
    assert "param group 0" in str(info.value)
