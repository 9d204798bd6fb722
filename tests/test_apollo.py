"""APOLLO and APOLLO-Mini (arXiv 2412.05270): parity with apollo-torch 1.0.3, checkpoints, options, memory.

Parity, in float64, step for step across basis refreshes:

* ``proj="svd"``: nothing random; both compute the basis by a float32 SVD of the same gradient, so the runs
  are compared as they are (same eps).
* ``proj="random"``: the reference's ``stable_randn`` is replaced by gradproj's own draw for that parameter
  and refresh (the basis gradproj regenerates from its ``proj_seed`` / ``proj_draw``, times √d: the reference
  divides its matrix by √r, gradproj's has entries of variance 1/d), so both project with the same matrix
  up to the factor κ = √(d/r) that gradproj's rule corrects ‖R‖ by. Adam's eps then acts on a κ times
  smaller R in gradproj, which is the reference with eps·κ: the reference gets eps·κ (all matrices here
  share d, so κ is one number).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import gradproj
from gradproj import registry
from gradproj.memory_estimate import estimate_memory
from gradproj.models import get_shape
from gradproj.projectors import random_basis as rb
from gradproj.projectors import seeding
from problems import TinyNet, tiny_batch, tiny_loss, train

apollo_torch = pytest.importorskip("apollo_torch")
from apollo_torch import random_projector as ref_random  # noqa: E402

D, RANK, GAP = 16, 4, 3
#: every matrix projects a side of length D (right: n = D; left: m = D), so κ = √(D / RANK) for all
SHAPES = [(24, D), (D, 40), (D, D)]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [nn.Parameter(torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)) for m, n in SHAPES]
    bias = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64) * 0.1)
    return ws, bias


def grads(step, params):
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for p in params:
        base = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if p.dim() == 2:  # a decaying spectrum, so the SVD basis is well defined
            base = base * torch.logspace(0, -1.5, p.shape[1], dtype=torch.float64)
        out.append(base * (1.0 + 0.3 * math.sin(step)))
    return out


def patch_reference_draws(monkeypatch, ref_params, gp_opt, gp_params):
    """The reference's ``stable_randn(shape, seed)`` returns gradproj's basis for the parameter whose seed
    chain (params_idx, next_seed(·), ...) holds ``seed``, at that refresh, times √d."""
    chains = {}
    for i, (p_ref, p_gp) in enumerate(zip(ref_params, gp_params)):
        seed = i + 1  # apollo-torch seeds parameter i (counted from 1) with i
        for draw in range(50):
            chains[seed] = (p_gp, draw * GAP)
            seed = ref_random.next_seed(seed)

    def fake(shape, seed, device=None, dtype=torch.float32):
        p_gp, step = chains[seed]
        st = gp_opt.state[p_gp]
        m, n = p_gp.shape
        kind = gp_opt.param_groups[0]["random_kind"]
        if m < n:  # a left projection (both packages: right when m >= n)
            assert tuple(shape) == (m, RANK)
            A = rb.random_basis(m, RANK, kind, st[seeding.SEED_KEY], 2 * step, torch.device("cpu"), torch.float32)
            return A.to(dtype) * math.sqrt(m)
        assert tuple(shape) == (RANK, n)
        A = rb.random_basis(n, RANK, kind, st[seeding.SEED_KEY], 2 * step + 1, torch.device("cpu"), torch.float32)
        return A.t().to(dtype) * math.sqrt(n)

    monkeypatch.setattr(ref_random, "stable_randn", fake)


def both(proj, scale_type, scale, scale_front=False, disable_nl=False, eps=1e-6, wd=0.0, correct_bias=True):
    ws, bias = make_params()
    kappa = math.sqrt(D / RANK) if proj == "random" else 1.0
    group = {"rank": RANK, "update_proj_gap": GAP, "scale": scale, "proj_type": "std", "scale_type": scale_type}
    ref_ws = [nn.Parameter(w.detach().clone()) for w in ws]
    ref_bias = nn.Parameter(bias.detach().clone())
    ref = apollo_torch.APOLLOAdamW(
        [{"params": ref_ws, **group, "proj": proj, "eps": eps * kappa}, {"params": [ref_bias]}],
        lr=1e-2,
        eps=eps,
        weight_decay=wd,
        scale_front=scale_front,
        disable_nl=disable_nl,
        correct_bias=correct_bias,
    )
    gp = gradproj.ApolloAdamW(
        [{"params": ws, **group, "proj": proj}, {"params": [bias]}],
        lr=1e-2,
        eps=eps,
        weight_decay=wd,
        scale_front=scale_front,
        disable_nl=disable_nl,
        correct_bias=correct_bias,
    )
    return (ref, [*ref_ws, ref_bias]), (gp, [*ws, bias])


def step_both(ref, gp, step, monkeypatch=None):
    (ref_opt, ref_ps), (gp_opt, gp_ps) = ref, gp
    for p, g in zip(gp_ps, grads(step, gp_ps)):
        p.grad = g.clone()
    gp_opt.step()  # first: the patched reference draw reads gradproj's state of this refresh
    for p, g in zip(ref_ps, grads(step, ref_ps)):
        p.grad = g.clone()
    ref_opt.step()


@pytest.mark.parametrize("proj", ["svd", "random"])
@pytest.mark.parametrize(
    "scale_type, scale, scale_front", [("channel", 1.0, False), ("tensor", 128.0, True), ("channel", 4.0, True)]
)
def test_parity_with_apollo_torch(monkeypatch, proj, scale_type, scale, scale_front):
    ref, gp = both(proj, scale_type, scale, scale_front=scale_front, wd=0.01)
    if proj == "random":
        patch_reference_draws(monkeypatch, ref[1][:3], gp[0], gp[1][:3])
    worst = 0.0
    for step in range(3 * GAP + 2):  # four bases
        step_both(ref, gp, step)
        for a, b in zip(ref[1], gp[1]):
            worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
    assert worst < 1e-11, worst
    # the limiter's state is the reference's
    for p_ref, p_gp in zip(ref[1][:3], gp[1][:3]):
        assert torch.allclose(gp[0].state[p_gp]["residual_norm"], ref[0].state[p_ref]["scaled_grad"], rtol=1e-11)


@pytest.mark.parametrize("proj", ["svd", "random"])
def test_parity_without_limiter_or_bias_correction(monkeypatch, proj):
    ref, gp = both(proj, "channel", 2.0, disable_nl=True, correct_bias=False)
    # correct_bias=False is APOLLO's rule for the projected matrices; unprojected ones keep Adam's correction
    ref[0].param_groups[1]["correct_bias"] = True
    if proj == "random":
        patch_reference_draws(monkeypatch, ref[1][:3], gp[0], gp[1][:3])
    for step in range(2 * GAP + 1):
        step_both(ref, gp, step)
    for a, b in zip(ref[1], gp[1]):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-13)


def test_random_basis_statistics_match_the_reference_rule():
    """Unpatched, gradproj's draws differ from the reference's; the scaling factors agree in distribution:
    over 200 seeds the per-channel factor of the first step has the same mean (to 4 standard errors, one being
    about 3% of it) and the same spread (to 30%). κ's correction is what makes them agree: without it
    gradproj's factor would be √(d/r) ≈ 5.7 times the reference's."""
    torch.manual_seed(0)
    G = torch.randn(64, 256, dtype=torch.float64) * torch.logspace(0, -1, 256, dtype=torch.float64)
    ours, theirs = [], []
    for seed in range(200):
        W = nn.Parameter(torch.zeros(64, 256, dtype=torch.float64))
        opt = gradproj.ApolloAdamW(
            [{"params": [W], "rank": 8, "update_proj_gap": 10, "scale": 1.0, "proj_seed": seed}],
            lr=1.0,
            disable_nl=True,
        )
        W.grad = G.clone()
        opt.step()
        ours.append((-W / G)[:, 0].mean().item())  # φ · lr·√(1-β2)/(1-β1) per row
        W2 = nn.Parameter(torch.zeros(64, 256, dtype=torch.float64))
        ref = apollo_torch.APOLLOAdamW(
            [{"params": [W2], "rank": 8, "update_proj_gap": 10, "scale": 1.0, "proj": "random", "proj_type": "std"}],
            lr=1.0,
            disable_nl=True,
            scale_front=False,
        )
        ref.param_groups[0]["scale_type"] = "channel"
        ref.state[W2]["seed"] = 1 + seed
        W2.grad = G.clone()
        ref.step()
        theirs.append((-W2 / G)[:, 0].mean().item())
    a, b = torch.tensor(ours), torch.tensor(theirs)
    stderr = math.sqrt((a.var() + b.var()).item() / len(a))
    assert stderr < 0.05 * b.mean()  # the sample pins the mean down
    assert abs(a.mean() - b.mean()) < 4 * stderr  # the means agree to their sampling error
    assert abs(a.std() - b.std()) < 0.3 * b.std()


# ------------------------------------------------------------------------------------------- the optimizer
def make_tiny(mini=False, **kw):
    model = TinyNet()
    if mini:
        return model, gradproj.ApolloMini(gradproj.param_groups(model, rank=1, update_proj_gap=3, scale=128), **kw)
    return model, gradproj.ApolloAdamW(gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=1.0), lr=1e-2, **kw)



@pytest.mark.parametrize("mini", [False, True])
def test_trains_and_resumes_bit_exactly_from_a_weights_only_checkpoint(mini):
    model, opt = make_tiny(mini=mini)
    losses = train(model, opt, 20)
    assert losses[-1] < 0.8 * losses[0]
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 5, seed=20)
    ck = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    model2, opt2 = make_tiny(mini=mini)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    train(model2, opt2, 5, seed=20)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_mini_is_the_documented_configuration():
    _, opt = make_tiny(mini=True)
    g = opt.param_groups[-1]
    assert (g["scale_type"], g["scale_front"], g["projector"], g["residual"], g["lr"]) == (
        "tensor",
        True,
        "random",
        "apollo",
        1e-2,
    )
    entry = registry.get_optimizer("apollo_mini")
    assert (entry.rank, entry.scale, entry.lr, entry.resolve()) == (1, 128.0, 1e-2, gradproj.ApolloMini)
    assert registry.get_optimizer("apollo_adamw").resolve() is gradproj.ApolloAdamW


def test_layerwise_matches_the_regular_step():
    model, opt = make_tiny()
    model2 = TinyNet()
    opt2 = gradproj.ApolloAdamW(
        gradproj.param_groups(model2, rank=4, update_proj_gap=3, scale=1.0), lr=1e-2, layerwise=True
    )
    for s in range(7):
        opt.zero_grad()
        tiny_loss(model, tiny_batch(s)).backward()
        opt.step()
        tiny_loss(model2, tiny_batch(s)).backward()
        opt2.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_layerwise_accumulation_matches_accumulated_gradients():
    """accumulation_steps=2: APOLLO needs the full gradient, so the window sums it in p.grad; bit for bit."""
    model, opt = make_tiny()
    model2 = TinyNet()
    opt2 = gradproj.ApolloAdamW(
        gradproj.param_groups(model2, rank=4, update_proj_gap=3, scale=1.0), lr=1e-2, layerwise=True,
        accumulation_steps=2,
    )
    for s in range(4):
        opt.zero_grad()
        for k in range(2):
            (tiny_loss(model, tiny_batch(2 * s + k)) / 2).backward()
            (tiny_loss(model2, tiny_batch(2 * s + k)) / 2).backward()
        opt.step()
        opt2.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"scale_type": "row"}, "scale_type"),
        ({"proj": "nope"}, "unknown projector"),
        ({"proj_type": "full"}, "one-sided"),
        ({"disable_nl": 1}, "disable_nl"),
        ({"proj": "svd", "projector": "random"}, "same key"),
    ],
)
def test_bad_options_raise_before_anything_changes(bad, match):
    model, opt = make_tiny()
    train(model, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: dict(v) for k, v in opt.state.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        opt.add_param_group(
            {"params": [nn.Parameter(torch.zeros(8, 8))], "rank": 2, "update_proj_gap": 2, "scale": 1.0, **bad}
        )
    with pytest.raises((ValueError, TypeError), match=match):
        gradproj.ApolloAdamW(gradproj.param_groups(TinyNet(), rank=4, update_proj_gap=3, scale=1.0, **bad))
    if "projector" in bad:  # a conflict of two spellings exists only where groups are added
        return
    opt.param_groups[-1].update({("projector" if k == "proj" else k): v for k, v in bad.items()})
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert {k: dict(v) for k, v in opt.state.items()}.keys() == state.keys()


def test_mini_state_is_a_seed_and_the_limiter_scalar():
    """Per projected matrix: Adam's moments of the rank-1 R, one fp32 norm, two ints; no basis."""
    model, opt = make_tiny(mini=True)
    train(model, opt, 2)
    sizes = gradproj.optimizer_state_bytes(opt)
    W = model.fc1.weight  # 40 x 16: projected (right, R is 40 x 1)
    st = opt.state[W]
    assert set(st) == {"step", "proj_seed", "proj_draw", "exp_avg", "exp_avg_sq", "residual_norm"}
    assert st["exp_avg"].shape == (40, 1) and st["residual_norm"].dim() == 0
    assert sizes["basis"] == 0  # a seed and a step, no float basis


def test_memory_of_mini_on_llama_7b():
    """The paper's LLaMA-7B table (the project page's: optimizer memory APOLLO 1.6G at rank 256, APOLLO-Mini
    0.0G) counts the state of the projected matrices. The estimator agrees: 1.62 GB and 6.3 MB for the 224
    matrices; the rest is AdamW's state of the embedding and the output head, unprojected as in the paper."""
    mini = estimate_memory("llama_7b", "apollo_mini")
    shape = get_shape("llama_7b")
    embed_and_head = 2 * shape.vocab * shape.hidden  # 2 x 131M parameters
    unprojected_norms = (2 * shape.layers + 1) * shape.hidden  # RMSNorm weights
    adamw_unprojected = 2 * 2 * (embed_and_head + unprojected_norms)  # m and v in bf16
    projected = mini.optimizer_states - adamw_unprojected
    assert mini.optimizer_states_detail["basis"] == 0
    assert 0 < projected < 8e6  # < 8 MB for 224 matrices; the moments of R plus one fp32 norm each
    assert mini.optimizer_states_detail["other"] == 4 * 7 * shape.layers  # the limiter's norm
    apollo = estimate_memory("llama_7b", "apollo_adamw", rank=256)
    assert apollo.optimizer_states - adamw_unprojected == pytest.approx(1.6e9, rel=0.05)
    full = estimate_memory("llama_7b", "adamw")
    assert full.optimizer_states > 25 * mini.optimizer_states


@pytest.mark.parametrize("name", ["apollo_adamw", "apollo_mini"])
def test_the_command_knows_apollo(tmp_path, capsys, name):
    from gradproj.train.cli import main

    assert main(["list"]) == 0
    assert name in capsys.readouterr().out
    assert main(["memory", "--model", "llama_60m", "--optimizer", name]) == 0
    out = capsys.readouterr().out
    assert f"{name}, rank {1 if name == 'apollo_mini' else 128}" in out


# ------------------------------------------------------------------------------------------------ FSDP2
def _fsdp_body(rank, world):
    from test_fsdp import assert_float64_close, fsdp_model
    from distributed_utils import rank_share
    from problems import tiny_loss, train

    for group in (
        {"proj": "svd", "sharded_refresh": "gather"},
        {"proj": "svd", "sharded_refresh": "gather", "scale_type": "tensor", "disable_nl": True},
        # a sharded left projection needs a dense basis (svd-family); random bases are sharded on the right
        {"proj": "random", "proj_type": "right"},
        {"proj": "random", "proj_type": "right", "scale_type": "tensor"},
    ):
        model, ref = fsdp_model(torch.float64), TinyNet().double()
        opt, ref_opt = (
            gradproj.ApolloAdamW(gradproj.param_groups(m, rank=4, update_proj_gap=3, scale=2.0, **group), lr=1e-2)
            for m in (model, ref)
        )
        train(model, opt, 7, rank_share(tiny_loss))
        train(ref, ref_opt, 7)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert_float64_close(p.full_tensor(), q, f"{group} {name}")
        for p, q in zip(model.parameters(), ref.parameters()):
            if "residual_norm" in ref_opt.state[q]:
                assert_float64_close(opt.state[p]["residual_norm"].full_tensor(), ref_opt.state[q]["residual_norm"],
                                     f"{group} limiter")


def test_fsdp_matches_one_process():
    """Sharded over 2 ranks (fc1: right projection, per-row factors; fc2 with the SVD basis: left projection,
    per-column factors combined over the ranks' rows), in float64: weights and the limiter's norm equal one
    process's to 1e-10 of each tensor's largest entry (test_fsdp.EXACT)."""
    pytest.importorskip("torch.distributed.fsdp")
    from distributed_utils import run_distributed

    run_distributed(_fsdp_body)


def test_compiled_step_matches_the_eager_rule():
    """compile=True runs the same rule (Adam, the apollo residual, the update) as one graph: float32, to rounding."""
    model, opt = make_tiny(compile=True)
    model2, opt2 = make_tiny()
    for s in range(6):
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            tiny_loss(m, tiny_batch(s)).backward()
            o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compare_runs_apollo_next_to_galore(tmp_path, capsys):
    import csv

    from gradproj.train.cli import main
    from test_cli import TINY

    out = tmp_path / "cmp"
    specs = ["galore_adamw", "apollo_adamw", "apollo_mini", "apollo_adamw:projector=svd"]
    args = [a for i, a in enumerate(TINY) if "--rank" not in TINY[max(i - 1, 0) : i + 1]]  # the recipes' ranks
    assert main(["compare", "--optimizers", *specs, *args, "--lr-grid", "1", "--seeds", "0", "--steps", "3",
                 "--out", str(out)]) == 0
    with open(out / "results.csv") as fh:
        state = {r["optimizer"]: int(r["optimizer_state_bytes"]) for r in csv.DictReader(fh)}
    # APOLLO: GaLore's moments and no float basis, plus one fp32 norm per matrix; Mini: rank-1 moments
    assert state["apollo_adamw"] < state["galore_adamw"]
    assert state["apollo_mini"] < state["apollo_adamw"] < state["apollo_adamw:projector=svd"]
