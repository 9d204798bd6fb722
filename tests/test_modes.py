"""Every optimizer of the table in every step mode it supports (tests/optim_table.py: MODES, OptSpec.modes).

The same tests run for each (row, mode): the mode (a) trains a small model down, (b) follows the per_param
mode's trajectory across basis refreshes, (c) resumes from a weights-only checkpoint bit for bit, and (d)
raises on bad input before anything changes. Each test also checks that the mode's own path ran
(the batched step, compiled graphs, the Triton kernels, the gradient hooks), so a mode that silently fell
back to the per-parameter loop fails.

The compiled and Triton modes round differently from the per_param mode (see :func:`assert_one_step_close`).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from gradproj import kernels
from gradproj.optimizers import multi_tensor
from gradproj.optimizers.compiled import CompileFallbackWarning
from gradproj.projectors import NonFiniteGradientError
from optim_table import MODES, OPTIMIZERS, mode_cases, triton_unavailable
from problems import TinyNet, batch_loss, train

LR = 5e-2  # 12 steps take every row's loss below half its start (the slowest, Adafactor: to 0.3)
U32 = 2.0**-24  # float32 unit roundoff


def case(spec, mode):
    marks = []
    if mode == "triton":
        marks.append(pytest.mark.skipif(triton_unavailable() is not None, reason=f"triton: {triton_unavailable()}"))
    if mode == "compile":
        marks.append(pytest.mark.slow)
    return pytest.param(spec, mode, id=f"{spec.id}-{mode}", marks=marks)


def compiled_parts(spec):
    """What the compiled graph of a row holds besides Adam and the weight update: its residual rule, and the
    growth limiter if it runs (gradproj/optimizers/compiled.py)."""
    return {spec.residual} | ({"norm_growth_limit"} if spec.option("norm_growth_limit") is not None else set())


def budget(pairs):
    """Every pair, except that compiling costs seconds per optimizer (a graph per layout), so the compile mode
    runs on the fewest rows whose graphs hold every residual rule and the limiter among the rows that compile
    (greedily: the row adding the most parts not yet covered, the first in the table on a tie)."""
    pairs = list(pairs)
    compiling = [spec for spec, mode in pairs if mode == "compile"]
    chosen, covered = set(), set()
    while compiling:
        best = max(compiling, key=lambda s: len(compiled_parts(s) - covered))
        if not compiled_parts(best) - covered:
            break
        chosen.add(best.id)
        covered |= compiled_parts(best)
    return [(spec, mode) for spec, mode in pairs if mode != "compile" or spec.id in chosen]


CASES = [case(spec, mode) for spec, mode in budget(mode_cases())]
OTHER_MODES = [case(spec, mode) for spec, mode in budget(mode_cases()) if mode != "per_param"]


def make(spec, mode, model, **extra):
    return spec.make(model, lr=LR, **MODES[mode].kwargs, **extra)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def state_copy(opt):
    return {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}


def assert_same(model, ref_model, opt, ref):
    """Bit for bit: every weight and every state entry."""
    for (name, v), w in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(v, w), name
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert opt.state[p].keys() == ref.state[q].keys()
        for key, value in ref.state[q].items():
            ours = opt.state[p][key]
            assert (torch.equal(ours, value) and ours.dtype == value.dtype) if torch.is_tensor(value) \
                else ours == value, key


class Probe:
    """Records that the mode's own path ran while it is entered; :meth:`check` asserts it did."""

    def __init__(self, mode, monkeypatch):
        self.mode, self.calls = mode, 0
        self._warnings = warnings.catch_warnings(record=True)
        if mode == "foreach":
            run = multi_tensor.run

            def counted_run(opt, batch):
                self.calls += len(batch.ids)
                return run(opt, batch)

            monkeypatch.setattr(multi_tensor, "run", counted_run)
        elif mode == "triton":
            ops = kernels.load_triton_ops()
            apply_update = ops.apply_update

            def counted_apply_update(*args, **kwargs):
                self.calls += 1
                return apply_update(*args, **kwargs)

            monkeypatch.setattr(ops, "apply_update", counted_apply_update)

    def __enter__(self):
        self.caught = self._warnings.__enter__()
        warnings.simplefilter("always", CompileFallbackWarning)
        counters.clear()
        return self

    def __exit__(self, *exc):
        return self._warnings.__exit__(*exc)

    def check(self, model=None):
        fallbacks = [str(w.message) for w in self.caught if issubclass(w.category, CompileFallbackWarning)]
        assert not fallbacks, fallbacks
        if self.mode == "foreach":
            assert self.calls > 0, "no parameter took the batched step"
        elif self.mode == "triton":
            assert self.calls > 0, "the Triton operations did not serve the weight updates"
        elif self.mode == "compile":
            assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
        elif self.mode == "layerwise" and model is not None:  # train() leaves the last backward's gradients
            assert all(p.grad is None for p in model.parameters()), "the hooks did not consume the gradients"


# ------------------------------------------------------------------------------------------- (a), (c)
@pytest.mark.parametrize("spec,mode", CASES)
def test_trains_down_and_resumes_bit_for_bit(spec, mode, monkeypatch):
    """(a) 12 steps take the loss below half its start; (c) a checkpoint of that run after 7 steps (refreshes at
    0, 3, 6), loaded (torch.load(weights_only=True)) into a fresh optimizer in the same mode, continues with the
    same bits. One run serves both: the slow modes pay for each optimizer they build (graphs, kernels)."""
    model = TinyNet()
    with Probe(mode, monkeypatch) as probe:
        opt = make(spec, mode, model)
        losses = train(model, opt, 7)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        losses += train(model, opt, 5, seed=7)
        assert losses[-1] < 0.5 * losses[0], losses[::3]
        probe.check(model)

        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        model2 = TinyNet(seed=1)
        model2.load_state_dict(ckpt["model"])
        opt2 = make(spec, mode, model2)
        opt2.load_state_dict(ckpt["opt"])
        train(model2, opt2, 5, seed=7)
    probe.check(model2)
    assert_same(model2, model, opt2, opt)


# ---------------------------------------------------------------------------------------------- (b)
def assert_one_step_close(model, ref_model, before, opt, ref, state_before):
    """One step of a mode that rounds differently, from the same weights, state and gradient as the
    per_param step, is within float32 rounding of it.

    Bound, with u = 2⁻²⁴ and N = the parameter's number of elements (the longest sum any entry of the step
    depends on: Fira's and the limiter's whole-matrix norms; the GEMMs sum over the rank r < N):

    * weights: |W − W_ref| ≤ 4u·(|W₀| + |W_ref|) + 4(N + 8)u·‖W_ref − W₀‖_F elementwise (W₀: before the step).
      The first term is the rounding of W itself (the reference rounds the update, the residual and the decay
      into W separately, the kernel or graph once: at most a few roundings of |W|). The second bounds what
      the update terms contribute: a sum of k terms is within k·u of the sum of their magnitudes (Higham's
      γ_k), an element of B(U) = U·P (P with orthonormal rows, or columns for a left basis) has
      Σ_k |U_ik||P_kj| ≤ ‖U_i‖ = ‖B(U)_i‖, and Fira's S rescaled by norms of N squares is within N·u
      relative; each of those magnitudes is at most the update's norm ‖W_ref − W₀‖_F (the residual is
      orthogonal to the subspace, the decay is in the first term), and the + 8 covers the elementwise
      roundings of Adam's ψ = m / (√v + eps).
    * state: |X − X_ref| ≤ 4(N + 8)u·(|X_ref| + 2|X₀|) elementwise for a float tensor (X₀ its value before
      the step, 0 if new): a moment m = β₁m₀ + (1 − β₁)r may cancel, but (1 − β₁)|r| ≤ |m| + β₁|m₀|; the
      norms kept by Fira's and the growth limiter are sums of N squares. uint8 codes (8-bit moments) may
      differ by one: an ulp of the float32 moment can cross the boundary between two codes. Integers, the
      step and the bases (computed by the same eager refresh from the same gradient) are exact.

    A per-step comparison from the same start is what can be bounded: a free run compounds these
    differences through Adam's division by small √v and through the SVD at a refresh, whose singular
    vectors move by a perturbation over the gap of the singular values (unbounded as the gap closes).
    """
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        w0, n = before[name], p.numel()
        bound = 4 * U32 * (w0.abs() + q.abs()) + 4 * (n + 8) * U32 * (q - w0).norm()
        err = (p - q).abs()
        assert (err <= bound).all(), f"{name}: error {err.max():.3g}, {(err / bound).max():.3g} x the bound"
        ours, theirs, prev = opt.state[p], ref.state[q], state_before.get(q, {})
        assert ours.keys() == theirs.keys(), name
        for key, value in theirs.items():
            mine = ours[key]
            if not torch.is_tensor(value):
                assert mine == value, (name, key)
                continue
            assert mine.dtype == value.dtype and mine.shape == value.shape, (name, key)
            if value.dtype == torch.uint8:
                assert (mine.int() - value.int()).abs().max() <= 1, (name, key)
            elif not value.is_floating_point():
                assert torch.equal(mine, value), (name, key)
            else:
                old = prev.get(key)
                old = old.abs() if torch.is_tensor(old) and old.shape == value.shape else 0.0
                bound = 4 * (n + 8) * U32 * (value.abs() + 2 * old)
                assert ((mine - value).abs() <= bound).all(), (name, key)


def load_into(model, opt, mode, ref_model, ref):
    """Give ``model`` / ``opt`` the reference's weights and optimizer state, keeping ``opt``'s mode (a loaded
    checkpoint's groups replace the optimizer's, and the mode's options are group keys)."""
    model.load_state_dict(ref_model.state_dict())
    sd = copy.deepcopy(ref.state_dict())
    for group in sd["param_groups"]:
        group.update(MODES[mode].group_options())
    opt.load_state_dict(sd)


@pytest.mark.parametrize("spec,mode", OTHER_MODES)
def test_trajectory_equals_the_per_param_mode(spec, mode, monkeypatch):
    """7 steps, crossing the refreshes at t = 3 and 6, with a new lr every step. A bit-identical mode runs
    free and matches every bit of weights and state; the others are compared step by step."""
    ref_model, model = TinyNet(), TinyNet()
    ref = make(spec, "per_param", ref_model)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1.0 / (1 + s))
    with Probe(mode, monkeypatch) as probe:
        opt = make(spec, mode, model)
        if MODES[mode].exact:
            train(ref_model, ref, 7, scheduler=sched)
            train(model, opt, 7, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)))
            assert_same(model, ref_model, opt, ref)
        else:
            for s in range(7):
                load_into(model, opt, mode, ref_model, ref)
                before, state_before = snapshot(ref_model), state_copy(ref)
                train(ref_model, ref, 1, seed=s, scheduler=sched)
                train(model, opt, 1, seed=s)
                assert_one_step_close(model, ref_model, before, opt, ref, state_before)
    probe.check(model)


# ---------------------------------------------------------------------------------------------- (d)
@pytest.mark.parametrize("spec,mode", CASES)
def test_bad_input_raises_before_anything_changes(spec, mode):
    """Bad group options, and a NaN gradient on a matrix that has no basis yet (the optimizer's last
    parameter, so every other parameter was already checked, and in the batched mode collected)."""
    model = TinyNet()
    opt = make(spec, mode, model)
    train(model, opt, 1)  # the steps below would be regular ones (batched in the foreach mode, compiled ...)
    extra = nn.Parameter(torch.randn(12, 8))
    opt.add_param_group({"params": [extra], "rank": 2, "update_proj_gap": 2, "scale": 1.0})
    weights, state = snapshot(model), state_copy(opt)
    projected = opt.param_groups[1]
    assert "rank" in projected
    for key, bad, message in [
        ("rank", 0, "rank = 0 must be a positive integer"),
        ("proj_type", "diagonal", "proj_type = 'diagonal'"),
        ("projector", "qr", "unknown projector 'qr'"),
        ("update_proj_gap", -1, "update_proj_gap = -1"),
    ]:
        good = projected[key]
        projected[key] = bad
        batch_loss(model, 5).backward()  # per-layer mode: the hooks find the bad option and stand aside
        with pytest.raises(ValueError, match=message):
            opt.step()
        projected[key] = good
        opt.zero_grad()
    # gradients set by hand (no backward, so no hook runs in per-layer mode): step() checks them all first
    params = [p for p in model.parameters() if p.requires_grad]
    for p, g in zip(params, torch.autograd.grad(batch_loss(model, 6), params)):
        p.grad = g
    extra.grad = torch.full_like(extra, float("nan"))
    with pytest.raises(NonFiniteGradientError, match="NaN/Inf at its first basis refresh"):
        opt.step()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert opt.state.keys() == state.keys() and not opt.state.get(extra)
    for p, s in opt.state.items():
        assert s.keys() == state[p].keys()
        for k, v in s.items():
            assert (torch.equal(v, state[p][k]) if torch.is_tensor(v) else v == state[p][k]), k


# ------------------------------------------------------------------------------------ the table itself
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=[s.id for s in OPTIMIZERS])
def test_the_derived_modes_are_what_the_optimizer_does(spec):
    """The table's foreach support (derived from the axes' declarations) is what multi_tensor.collect batches,
    and its compile support is what the optimizer accepts."""
    model = TinyNet()
    opt = make(spec, "foreach", model)
    train(model, opt, 2)  # the second step is a regular one (refreshes at 0, 3, ...)
    batch_loss(model, 2).backward()
    assert bool(multi_tensor.collect(opt).ids) == ("foreach" in spec.modes)
    if "compile" in spec.modes:
        make(spec, "compile", TinyNet())
    else:
        with pytest.raises(ValueError, match="compile"):
            make(spec, "compile", TinyNet())
