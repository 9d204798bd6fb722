"""INT8 / INT4 storage of dense bases (group option ``basis_bits``, gradproj/projectors/quantized.py)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import gradproj
from gradproj import kernels
from gradproj.memory_estimate import estimate_memory, parameter_state
from gradproj.models import LlamaShape
from gradproj.projectors import get_projector
from gradproj.projectors import quantized as Q
from gradproj.state_layout import layout_bytes

QUANTIZABLE = ("svd", "eigh", "randomized_svd", "golore")


# ------------------------------------------------------------------------------ quantize / dequantize
def _group_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per entry of x (flattened), the absmax of its group of 256."""
    flat = x.reshape(-1).float()
    groups = math.ceil(flat.numel() / Q.GROUP_SIZE)
    padded = torch.nn.functional.pad(flat, (0, groups * Q.GROUP_SIZE - flat.numel())).view(groups, -1)
    return padded.abs().amax(1).repeat_interleave(Q.GROUP_SIZE)[: flat.numel()]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(8, 64), (37, 53), (1, 5), (3, 256), (300, 7)])
def test_round_trip_error_within_the_derived_bound(bits, shape):
    """|x − x̂| <= absmax(group) / (2^(b-1) − 1) / 2 for every entry; each group's absmax is exact."""
    g = torch.Generator().manual_seed(sum(shape) + bits)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])  # groups of very different scales
    codes, scales = Q.quantize(x, bits)
    assert codes.dtype == Q.codes_dtype(bits) and scales.dtype == torch.float32
    assert codes.shape == (Q.n_codes(x.numel(), bits),) and scales.shape == (Q.n_groups(x.numel()),)
    y = Q.dequantize(codes, scales, shape)
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (x - y).abs().reshape(-1)
    bound = _group_absmax(x) / (2 ** (bits - 1) - 1) / 2
    assert bool((err <= bound * (1 + 1e-6) + 1e-30).all()), float((err / bound).max())
    if x.numel() >= 256:
        assert (err / bound).max() > 0.5  # the bound is reached, not loose
    flat = x.reshape(-1)
    for start in range(0, flat.numel(), Q.GROUP_SIZE):  # the entry of largest magnitude is exact
        i = start + int(flat[start : start + Q.GROUP_SIZE].abs().argmax())
        assert abs(float(y.reshape(-1)[i]) - float(flat[i])) <= 1e-6 * abs(float(flat[i]))


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_are_what_the_docstring_says(bits):
    x = torch.tensor([0.0, 1.0, -1.0, 0.5, -0.5, 0.25, 0.0])
    codes, scales = Q.quantize(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert torch.equal(scales, torch.tensor([1.0 / qmax]))
    q = torch.round(x / scales)  # x / (1 / qmax) in float32 (0.5 / (1/7) rounds to 3, not 4)
    assert q.abs().max() == qmax
    if bits == 8:
        assert torch.equal(codes, q.to(torch.int8))
    else:  # two per byte: entry 2i low nibble, 2i+1 high nibble, stored as q + 8; the pad nibble is code 0
        nib = torch.cat([q + 8, torch.tensor([8.0])]).to(torch.uint8)
        assert torch.equal(codes, nib[0::2] | (nib[1::2] << 4))
    # an all-zero group: scale 0, codes 0, exact zeros back
    codes, scales = Q.quantize(torch.zeros(300), bits)
    assert torch.equal(scales, torch.zeros(2)) and torch.equal(Q.dequantize(codes, scales, (300,)), torch.zeros(300))


# ------------------------------------------------------------------------------------- optimizers
def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 40)).to(dtype)


def _opt(model, bits, projector="svd", proj_type="std", cls=gradproj.GaLoreAdamW, **options):
    extra = {"golore_switch_step": 100} if projector == "golore" else {}
    groups = gradproj.param_groups(model, rank=8, update_proj_gap=3, proj_type=proj_type, projector=projector,
                                   basis_bits=bits, **extra)
    return cls(groups, lr=1e-2, **options)


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 64, generator=g).to(next(model.parameters()).dtype)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _pg(opt):
    """The projected param group."""
    return next(g for g in opt.param_groups if g.get("rank") is not None)


def _projected_states(opt):
    return [opt.state[p] for p in _pg(opt)["params"] if p in opt.state]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("projector", QUANTIZABLE)
@pytest.mark.parametrize("bits", [8, 4])
def test_state_holds_codes_and_scales_and_gemms_use_the_dequantized_basis(bits, projector, proj_type):
    model = _model()
    opt = _opt(model, bits, projector, proj_type)
    _train(model, opt, 4)
    for p, state in zip(_pg(opt)["params"], _projected_states(opt)):
        assert not {"proj", "proj_left", "proj_right"} & set(state)
        keys = ["proj_left", "proj_right"] if proj_type == "full" else ["proj"]
        for key in keys:
            assert state[key + "_codes"].dtype == Q.codes_dtype(bits)
            assert state[key + "_scales"].dtype == torch.float32
        m, n = p.shape
        proj = get_projector(projector)((m, n), 8, proj_type, _pg(opt))
        dense = {k: Q.dequantize(state[k + "_codes"], state[k + "_scales"], proj.dense_shape(k)) for k in keys}
        G = torch.randn(m, n)
        if proj_type == "full":
            expected = dense["proj_left"].t() @ G @ dense["proj_right"].t()
        else:
            expected = G @ dense["proj"].t() if proj.side == "right" else dense["proj"].t() @ G
        torch.testing.assert_close(proj.down(G, state), expected, rtol=1e-5, atol=1e-6)
        X = proj.down(G, state)
        W = torch.zeros(m, n)
        proj.add_up_(W, X, state, alpha=1.0)
        torch.testing.assert_close(W, proj.up(X, state), rtol=1e-5, atol=1e-6)
        # the dequantized basis is close to orthonormal: the INT4 error is a few % per entry at most
        for P in proj.basis_matrices(state).values():
            PtP = P.t() @ P if P.shape[0] > P.shape[1] else P @ P.t()
            assert (PtP - torch.eye(8)).abs().max() < (0.02 if bits == 8 else 0.35)


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_parameters(bits):
    model = _model(torch.bfloat16)
    opt = _opt(model, bits)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 4)
    assert all(p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all()) for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert _projected_states(opt)[0]["proj_scales"].dtype == torch.float32


# ----------------------------------------------------------------------------------------- bytes
def _dense_numel(p, rank=8, proj_type="std"):
    m, n = p.shape
    return (m + n) * rank if proj_type == "full" else rank * (n if m >= n else m)


@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.parametrize("bits", [8, 4])
def test_state_bytes_are_the_analytic_count_and_about_a_quarter_or_an_eighth_of_fp32(bits, proj_type):
    model = _model()
    opt = _opt(model, bits, proj_type=proj_type)
    _train(model, opt, 1)
    measured = gradproj.optimizer_state_bytes(opt)

    def expected(numel):
        return Q.n_codes(numel, bits) + 4 * Q.n_groups(numel)

    params = _pg(opt)["params"]
    if proj_type == "full":
        want = sum(expected(p.shape[0] * 8) + expected(8 * p.shape[1]) for p in params)
    else:
        want = sum(expected(_dense_numel(p)) for p in params)
    assert measured["basis"] == want
    dense_fp32 = 4 * sum(_dense_numel(p, proj_type=proj_type) for p in params)
    # per entry: 1 + 4/256 bytes (INT8) or 1/2 + 4/256 (INT4), against 4 for float32
    ratio = (1 + 4 / 256) / 4 if bits == 8 else (0.5 + 4 / 256) / 4
    assert measured["basis"] / dense_fp32 == pytest.approx(ratio, rel=0.02)
    assert ratio == pytest.approx(1 / 4 if bits == 8 else 1 / 8, rel=0.04)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.parametrize("projector", QUANTIZABLE)
@pytest.mark.parametrize("bits", [8, 4])
def test_estimator_counts_what_the_optimizer_holds(bits, projector, proj_type, dtype):
    """The estimator derives the bytes from the layouts; they equal optimizer_state_bytes on a real model."""
    pytest.importorskip("transformers")
    from gradproj.train.models import build_model
    from gradproj.train.optimizers import OptimizerChoice, build_optimizer

    shape = LlamaShape(hidden=64, intermediate=160, heads=4, layers=2, vocab=96)
    group = {"basis_bits": bits, **({"golore_switch_step": 100} if projector == "golore" else {})}
    model = build_model(shape, shape.vocab, 16, dtype=getattr(torch, dtype))
    choice = OptimizerChoice(name="galore_adamw", rank=8, update_proj_gap=5, projector=projector,
                             proj_type=proj_type, group_options=group)
    opt = build_optimizer(model, choice, shape.hidden)
    x = torch.randint(0, shape.vocab, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    measured = gradproj.optimizer_state_bytes(opt)
    est = estimate_memory(shape, "galore_adamw", rank=8, dtype=dtype, projector=projector, proj_type=proj_type,
                          options={"basis_bits": bits})
    assert est.optimizer_states_detail["basis"] == measured["basis"]
    assert est.optimizer_states == measured["total"]
    dense = estimate_memory(shape, "galore_adamw", rank=8, dtype=dtype, projector=projector, proj_type=proj_type)
    assert est.optimizer_states_detail["basis"] < dense.optimizer_states_detail["basis"]


def test_layout_bytes_of_a_quantized_basis():
    ps = parameter_state("galore_adamw", (4096, 11008), rank=1024, dtype="bfloat16", options={"basis_bits": 4})
    numel = 1024 * 4096  # left projection of a down_proj-like matrix: P is 4096 x 1024
    assert layout_bytes(ps.basis, "bfloat16") == numel // 2 + 4 * (numel // 256)
    ps8 = parameter_state("galore_adamw", (4096, 11008), rank=1024, dtype="bfloat16", options={"basis_bits": 8})
    assert layout_bytes(ps8.basis, "float32") == numel + 4 * (numel // 256)


# ---------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("moments", ["keep", "project"])
@pytest.mark.parametrize("projector", ["svd", "randomized_svd"])
@pytest.mark.parametrize("bits", [8, 4])
def test_checkpoint_resume_is_bit_exact_with_weights_only(bits, projector, moments):
    model = _model()
    opt = _opt(model, bits, projector, moments_on_refresh=moments)
    _train(model, opt, 4, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    twin_model = copy.deepcopy(model)
    ck = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    twin_model.load_state_dict(ck["model"])
    twin = _opt(twin_model, bits, projector, moments_on_refresh=moments)
    twin.load_state_dict(ck["opt"])
    for a, b in zip(_projected_states(opt), _projected_states(twin)):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    _train(model, opt, 5, seed=2)  # crosses refreshes at steps 6 and 9
    _train(twin_model, twin, 5, seed=2)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def _checkpoint(bits=4):
    model = _model()
    opt = _opt(model, bits)
    _train(model, opt, 2)
    return model, opt, opt.state_dict()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda st: st.__setitem__("proj_codes", st["proj_codes"][:-1]), "'proj_codes' has shape"),
        (lambda st: st.__setitem__("proj_codes", st["proj_codes"].to(torch.int8)), "expected uint8"),
        (lambda st: st.__setitem__("proj_scales", st["proj_scales"].double()), "expected float32"),
        (lambda st: st.__setitem__("proj_scales", st["proj_scales"][:1]), "'proj_scales' has shape"),
        (lambda st: st.pop("proj_scales"), "without 'proj_scales'"),
        (lambda st: st.__setitem__("proj", torch.zeros(8, 64)), "'proj'"),
    ],
)
def test_load_state_dict_refuses_codes_that_do_not_fit(corrupt, message):
    model, opt, sd = _checkpoint()
    bad = copy.deepcopy(sd)
    corrupt(bad["state"][2])  # the first projected weight (after the biases)
    twin_model = _model(seed=1)
    twin = _opt(twin_model, 4)
    _train(twin_model, twin, 1)
    before = copy.deepcopy(twin.state_dict()["state"])
    with pytest.raises(ValueError, match=message):
        twin.load_state_dict(bad)
    after = twin.state_dict()["state"]
    assert after.keys() == before.keys()
    for i in before:
        for k, v in before[i].items():
            assert torch.equal(after[i][k], v) if isinstance(v, torch.Tensor) else after[i][k] == v


def test_a_checkpoint_of_another_width_brings_its_groups_and_codes_that_contradict_them_are_refused():
    _, _, sd = _checkpoint(bits=8)
    model = _model()
    opt = _opt(model, 4)
    opt.load_state_dict(sd)  # torch.optim semantics: the checkpoint's groups (basis_bits=8) come with its state
    assert _pg(opt)["basis_bits"] == 8
    _train(model, opt, 2)
    assert _projected_states(opt)[0]["proj_codes"].dtype == torch.int8
    bad = copy.deepcopy(sd)
    next(g for g in bad["param_groups"] if g.get("rank"))["basis_bits"] = 4  # int8 codes under a 4-bit group
    with pytest.raises(ValueError, match="'proj_codes' has shape"):
        _opt(_model(), 4).load_state_dict(bad)


def test_changing_basis_bits_mid_run_restarts_the_basis():
    model = _model()
    opt = _opt(model, None)
    _train(model, opt, 2)
    _pg(opt)["basis_bits"] = 4
    with pytest.warns(UserWarning, match="no longer fits"):
        _train(model, opt, 1)
    assert "proj_codes" in _projected_states(opt)[0] and "proj" not in _projected_states(opt)[0]


# --------------------------------------------------------------------------------------- refresh
@pytest.mark.parametrize("bits", [8, 4])
def test_moments_on_refresh_project_maps_with_the_dequantized_bases(bits):
    model = _model()
    opt = _opt(model, bits, moments_on_refresh="project")
    _train(model, opt, 3)  # the refresh at step 3 is next
    p = _pg(opt)["params"][0]
    state = opt.state[p]
    old = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    _train(model, opt, 1)
    proj = get_projector("svd")(tuple(p.shape), 8, "std", _pg(opt))
    P_old = proj.basis_matrices(old)[proj.side]
    P_new = proj.basis_matrices(state)[proj.side]
    assert not torch.equal(P_old, P_new)
    T = P_new @ P_old.t() if proj.side == "right" else P_new.t() @ P_old
    assert T.shape == (8, 8) and bool(torch.isfinite(state["exp_avg"]).all())
    assert bool((state["exp_avg_sq"] >= 0).all())


def test_golore_quantizes_its_dense_phase_and_drops_it_at_the_switch():
    model = _model()
    groups = gradproj.param_groups(model, rank=8, update_proj_gap=3, projector="golore", basis_bits=4,
                                   golore_switch_step=4)
    opt = gradproj.GaLoreAdamW(groups, lr=1e-2)
    _train(model, opt, 2)
    assert "proj_codes" in _projected_states(opt)[0]
    _train(model, opt, 3)
    state = _projected_states(opt)[0]
    assert not any(k.startswith("proj_codes") or k.startswith("proj_scales") for k in state)
    assert "proj_draw" in state


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("value", [3, 16, "4", 4.0, True, 0])
def test_bad_basis_bits_raise_at_construction(value):
    with pytest.raises(ValueError, match="basis_bits"):
        _opt(_model(), value)


@pytest.mark.parametrize("projector", ["dct", "random", "identity"])
def test_basis_bits_with_a_projector_that_stores_no_dense_basis_is_refused(projector):
    with pytest.raises(ValueError, match="basis_bits = 4 quantizes a dense basis"):
        _opt(_model(), 4, projector)
    _opt(_model(), None, projector)  # the default is fine everywhere


def test_a_bad_value_set_between_steps_raises_before_anything_changes():
    model = _model()
    opt = _opt(model, 4)
    _train(model, opt, 2)
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    _pg(opt)["basis_bits"] = 2
    model(torch.randn(8, 64)).square().mean().backward()
    with pytest.raises(ValueError, match="basis_bits = 2"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[i][k], v) if isinstance(v, torch.Tensor) else after[i][k] == v
               for i in state for k, v in state[i].items())


# ------------------------------------------------------------------------------ foreach, kernels
def test_a_quantized_basis_does_not_claim_the_batched_foreach_step():
    assert get_projector("svd").stores_dense({"basis_bits": None})
    assert not get_projector("svd").stores_dense({"basis_bits": 4})
    runs = []
    for foreach in (False, True):
        model = _model()
        opt = _opt(model, 4, foreach=foreach)
        _train(model, opt, 5)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.skipif(
    not (kernels.triton_import_error() is None and kernels.interpreter_requested()),
    reason="needs triton and TRITON_INTERPRET=1 (tests/conftest.py sets it) to run the kernels on the CPU",
)
@pytest.mark.parametrize("cls", [gradproj.GaLoreAdamW, gradproj.FiraAdamW])
def test_triton_paths_read_the_dequantized_basis(cls):
    runs = []
    for impl in ("torch", "triton"):
        model = _model()
        opt = _opt(model, 4, cls=cls, impl=impl)
        _train(model, opt, 4)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_spec_dtype_pins_the_dtype_and_the_bytes():
    from gradproj.state_layout import Spec, value_problem

    codes, scales = Spec((10,), "codes", requires=("s",), dtype="uint8"), Spec((2,), requires=("c",), dtype="float32")
    layout = {"c": codes, "s": scales}
    # counted at their own dtype whatever the float dtype and the 8-bit-moments flag say
    for float_dtype, quantized in (("bfloat16", False), ("float32", True)):
        assert layout_bytes(layout, float_dtype, quantized=quantized) == 10 + 2 * 4
    assert value_problem("c", torch.zeros(10, dtype=torch.uint8), codes, deep=True) is None
    assert "expected uint8" in value_problem("c", torch.zeros(10, dtype=torch.int8), codes, deep=True)
    assert "expected float32" in value_problem("s", torch.zeros(2, dtype=torch.bfloat16), scales, deep=True)
