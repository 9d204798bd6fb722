"""Group option ``proj_dtype``: the projection GEMMs down (R = PᵀG, G Pᵀ) and up (P X, X P) in bfloat16 / float16,
and ``"auto"`` (the default), which decides per matrix by timing both paths (the decision logic is tested with a
scripted timer, so the tests do not depend on the CPU; the real timer only where the policy's 0.1 ms floor
fixes the outcome, on matrices timed in microseconds, or where either outcome is accepted).

Error bound (elementwise, for one GEMM C = A B with inner dimension k, A and B float32, C rounded back):
each operand is rounded to the low dtype with relative error at most u (u = 2^-8 for bfloat16's 8-bit
significand, 2^-11 for float16), so each product âᵢ b̂ᵢ = aᵢbᵢ(1+δ), |δ| ≤ 2u + u²; torch accumulates the k
products in float32 in any order (relative growth at most γ_k ≈ k·2^-24 of Σ|âᵢ||b̂ᵢ| ≤ (1+u)² Σ|aᵢ||bᵢ|); the
sum is rounded once more to the low dtype (u·|C| ≤ u·Σ|aᵢ||bᵢ| up to the terms above). Hence

    |Ĉ − C| ≤ (3u + 3u² + u³ + 1.01·k·2^-24·(1+u)³) · (|A| |B|)          (all products exact in float64)

which holds for any blocking / summation order, on any CPU (AMX, AVX-512, AVX2), since only the operand
roundings, a float32 accumulation and one final rounding are assumed. The result goes back to float32
exactly (bf16/fp16 → fp32 is exact). ``add_up_`` then adds α·Ĉ into W in float32: one more rounding of
W + α·Ĉ, at most 2^-24·|W + α·C| + its effect on Ĉ's error, which the bound below adds.
"""

import contextlib
import copy
import io
import warnings

import pytest
import torch

import gradproj
from gradproj.optimizers import multi_tensor
from gradproj.projectors import base
from gradproj.projectors.base import AUTO_KEY, AUTO_MIN_SECONDS, AUTO_RUNS, dense_down

U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
U32 = 2.0**-24


def gemm_bound(A: torch.Tensor, B: torch.Tensor, u: float) -> torch.Tensor:
    """The elementwise bound of the module docstring for A @ B (float64)."""
    k = A.shape[1]
    c = 3 * u + 3 * u**2 + u**3 + 1.01 * k * U32 * (1 + u) ** 3
    return c * (A.double().abs() @ B.double().abs())


def setup(shape, proj_type, proj_dtype, seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
    W.grad = torch.randn(shape, generator=g)
    group = {"params": [W], "rank": 8, "update_proj_gap": 2, "scale": 0.25, "proj_type": proj_type, **options}
    if proj_dtype is not ...:
        group["proj_dtype"] = proj_dtype
    opt = gradproj.GaLoreAdamW([group], lr=1e-2)
    return W, opt


@pytest.mark.parametrize("dtype_name, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
@pytest.mark.parametrize("shape, proj_type", [((48, 80), "left"), ((80, 48), "right"), ((64, 64), "left")])
def test_down_up_and_add_up_within_the_derived_bound(shape, proj_type, dtype_name, dtype):
    W, opt = setup(shape, proj_type, dtype_name)
    opt.step()  # the basis
    state, group = opt.state[W], opt.param_groups[0]
    proj = opt.engine.plan(W, group).projector
    P = state["proj"]
    assert P.dtype == torch.float32  # the stored basis stays in the parameter's dtype
    u = U[dtype]
    G = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    R = proj.down(G, state)
    assert R.dtype == torch.float32 and R.is_contiguous()
    A, B = (P.t(), G) if proj.side == "left" else (G, P.t())
    exact = A.double() @ B.double()
    err = (R.double() - exact).abs()
    assert (err <= gemm_bound(A, B, u)).all()
    # the low-precision path ran: float32's own bound (u = 2^-24 terms only) is exceeded somewhere
    assert (err > gemm_bound(A, B, U32)).any()

    X = torch.randn(R.shape, generator=torch.Generator().manual_seed(6))
    BX = proj.up(X, state)
    A, B = (P, X) if proj.side == "left" else (X, P)
    exact = A.double() @ B.double()
    bound = gemm_bound(A, B, u)
    assert BX.dtype == torch.float32 and ((BX.double() - exact).abs() <= bound).all()

    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    W1, alpha = W0.clone(), -0.3
    proj.add_up_(W1, X, state, alpha)
    ref = W0.double() + alpha * exact
    # |α|·(Ĉ's bound) + the float32 roundings of α·Ĉ and of the sum (each ≤ 2^-24 of its magnitude)
    slack = 1.01 * U32 * (abs(alpha) * (A.double().abs() @ B.double().abs()) * (1 + bound.max()) + ref.abs())
    assert ((W1.double() - ref).abs() <= abs(alpha) * bound + slack).all()


def bf16_inputs_bound(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The module docstring's bound for a float32 GEMM in oneDNN's bfloat16 math mode: the operands rounded to
    bfloat16 (u = 2^-8 each) and a float32 accumulation, with no final rounding to bfloat16 (the result is
    float32): (2u + u² + 1.01·k·2^-24·(1+u)²)·(|A||B|), plus 2^-24·|C| for the float32 result."""
    k, u = A.shape[1], U[torch.bfloat16]
    c = 2 * u + u**2 + 1.01 * k * U32 * (1 + u) ** 2 + U32 * (1 + u) ** 2
    return c * (A.double().abs() @ B.double().abs())


@pytest.mark.parametrize("shape, proj_type", [((48, 80), "left"), ((80, 48), "right")])
def test_bfloat16_inputs_are_within_their_bound_and_tighter_than_bfloat16(monkeypatch, bf16_inputs, shape, proj_type):
    """A matrix whose stored decision is bfloat16 inputs: down, up and add_up_ within the bound above on any CPU
    (where the mode is not in effect the GEMMs are float32, inside it too); wherever the probe finds the mode in
    effect, the products are those of the bfloat16-rounded operands, unrounded: closer to them than the
    bfloat16 path's rounded product can be in general (checked: R differs from the rounded product)."""
    monkeypatch.setattr(
        base, "measure_seconds", FakeTimer({"float32": 2e-3, "bfloat16": 1e-3, "bfloat16 inputs": 0.5e-3})
    )
    W, opt = setup(shape, proj_type, "auto", projector="svd")
    opt.step()
    state = opt.state[W]
    assert state[AUTO_KEY] == base.AUTO_BF16_INPUTS
    proj = opt.engine.plan(W, opt.param_groups[0]).projector
    P = state["proj"]
    G = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    R = proj.down(G, state)
    A, B = (P.t(), G) if proj.side == "left" else (G, P.t())
    assert R.dtype == torch.float32 and R.is_contiguous()
    assert ((R.double() - A.double() @ B.double()).abs() <= bf16_inputs_bound(A, B)).all()
    monkeypatch.setattr(base, "_BF16_INPUTS", {})  # the real probe: is the mode in effect on this CPU?
    if base.bf16_inputs_available(torch.device("cpu")):
        lowered = A.bfloat16().double() @ B.bfloat16().double()
        k = A.shape[1]
        accumulation = 1.01 * (k + 1) * U32 * (A.bfloat16().double().abs() @ B.bfloat16().double().abs())
        assert ((R.double() - lowered).abs() <= accumulation).all()
        assert not torch.equal(R, lowered.float().bfloat16().float())
    X = torch.randn(R.shape, generator=torch.Generator().manual_seed(6))
    A, B = (P, X) if proj.side == "left" else (X, P)
    exact = A.double() @ B.double()
    assert ((proj.up(X, state).double() - exact).abs() <= bf16_inputs_bound(A, B)).all()
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    W1, alpha = W0.clone(), -0.3
    proj.add_up_(W1, X, state, alpha)
    ref = W0.double() + alpha * exact
    slack = 1.01 * U32 * ref.abs()  # the float32 rounding of the sum
    assert ((W1.double() - ref).abs() <= abs(alpha) * bf16_inputs_bound(A, B) + slack).all()


def test_the_optimizer_step_runs_both_gemms_in_bfloat16():
    """One step from a stored basis, against the same step written out with explicit bfloat16 GEMMs."""
    W, opt = setup((80, 48), "right", "bfloat16")
    opt.step()
    P = opt.state[W]["proj"].clone()
    m, v = opt.state[W]["exp_avg"].clone(), opt.state[W]["exp_avg_sq"].clone()
    W0, G = W.detach().clone(), W.grad.clone()
    opt.step()  # t = 1: no refresh (update_proj_gap = 2)
    assert torch.equal(opt.state[W]["proj"], P)
    b1, b2, eps, lr, scale, t = 0.9, 0.999, 1e-6, 1e-2, 0.25, 2
    R = (G.bfloat16() @ P.t().bfloat16()).float()
    m = b1 * m + (1 - b1) * R
    v = b2 * v + (1 - b2) * R * R
    step = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
    Uu = m / (v.sqrt() + eps)
    ref = W0 - step * scale * (Uu.bfloat16() @ P.bfloat16()).float()
    # R here and in the optimizer: the same bf16 operands, each GEMM within u + γ_k of their exact product, so
    # they differ by at most twice that; through Adam's m/√v (both first order in R), the update moves by the
    # same relative amount; the bf16 rounding of U before up adds u · |U||P| on each side. Then float32 adds.
    k = P.shape[1]
    rel = 2 * (2.0**-8 + 1.01 * k * U32)
    bound = step * scale * (4 * rel + 2 * 2.0**-8) * (Uu.abs() @ P.abs()) + 4 * U32 * W0.abs()
    assert ((W.detach() - ref).abs() <= bound).all()


def test_none_is_the_plain_float32_path():
    """proj_dtype=None runs the float32 GEMMs bit for bit as the plain products."""
    W, opt = setup((48, 80), "left", None)
    for _ in range(3):
        opt.step()
    state, proj = opt.state[W], opt.engine.plan(W, opt.param_groups[0]).projector
    assert AUTO_KEY not in state  # None decides nothing
    G, P = W.grad, state["proj"]
    assert torch.equal(proj.down(G, state), dense_down(G, P, "left"))
    X = torch.randn(8, 80)
    assert torch.equal(proj.up(X, state), P @ X)
    W1, W3 = W.detach().clone(), W.detach().clone()
    proj.add_up_(W1, X, state, 0.5)
    W3.addmm_(P, X, alpha=0.5)
    assert torch.equal(W1, W3)


@pytest.mark.parametrize("value", ["bf16", "float32", torch.bfloat16, 16, True])
def test_bad_values_are_refused_naming_the_option(value):
    with pytest.raises(ValueError, match="proj_dtype"):
        setup((48, 80), "left", value)
    W, opt = setup((48, 80), "left", None)
    opt.step()
    before, state = W.detach().clone(), copy.deepcopy(opt.state[W])
    opt.param_groups[0]["proj_dtype"] = value
    with pytest.raises(ValueError, match="proj_dtype"):
        opt.step()
    assert torch.equal(W, before)
    assert all(torch.equal(state[k], v) if torch.is_tensor(v) else state[k] == v for k, v in opt.state[W].items())


def test_refused_for_bases_without_a_stored_dense_matrix():
    W = torch.nn.Parameter(torch.randn(48, 80))
    group = {"params": [W], "rank": 8, "update_proj_gap": 2, "scale": 0.25, "projector": "random"}
    with pytest.raises(ValueError, match=r"proj_dtype.*projector='random'"):
        gradproj.GaLoreAdamW([{**group, "proj_dtype": "bfloat16"}])


def test_the_batched_step_leaves_a_proj_dtype_group_to_the_per_matrix_path():
    """The batched foreach step runs its own float32 GEMMs: it takes only groups whose projector stores_dense()
    (None and "auto"; of an "auto" group, only the matrices whose decision is the parameter's dtype)."""
    W, opt = setup((48, 80), "left", "bfloat16")
    group = opt.param_groups[0]
    proj_cls = type(opt.engine.plan(W, group).projector)
    assert not proj_cls.stores_dense(group)
    assert proj_cls.stores_dense({**group, "proj_dtype": None})
    assert proj_cls.stores_dense({**group, "proj_dtype": "auto"})


def test_resume_is_exact_and_the_checkpoint_holds_no_low_precision_copy():
    """Refreshes every 2 steps: the cached bf16 basis must follow each refresh; a resumed optimizer (no cache)
    must continue bit for bit."""
    W, opt = setup((48, 80), "left", "bfloat16")
    for _ in range(3):
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert all(t.dtype == torch.float32 for s in saved["state"].values() for t in s.values() if torch.is_tensor(t))
    W2 = torch.nn.Parameter(W.detach().clone())
    W2.grad = W.grad.clone()
    opt2 = gradproj.GaLoreAdamW([{"params": [W2], "rank": 8, "update_proj_gap": 2, "scale": 0.25}], lr=1e-2)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["proj_dtype"] == "bfloat16"
    for i in range(4):
        g = torch.randn(W.shape, generator=torch.Generator().manual_seed(100 + i))
        W.grad, W2.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
        assert torch.equal(W, W2)


def test_a_refresh_replaces_the_cached_low_precision_basis():
    W, opt = setup((48, 80), "left", "bfloat16")
    opt.step()
    state, proj = opt.state[W], opt.engine.plan(W, opt.param_groups[0]).projector
    first = proj.gemm_basis(state, "proj", torch.bfloat16)
    assert proj.gemm_basis(state, "proj", torch.bfloat16) is first  # cast once per refresh
    W.grad = torch.randn(W.shape, generator=torch.Generator().manual_seed(9))
    opt.step()  # t = 1
    opt.step()  # t = 2: refresh from the new gradient
    again = proj.gemm_basis(state, "proj", torch.bfloat16)
    assert torch.equal(again, state["proj"].bfloat16()) and not torch.equal(again, first)


def test_project_backward_refuses_proj_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 16))
    opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4), proj_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"proj_dtype='bfloat16'.*proj_dtype=None"):
        gradproj.project_backward(model, opt)
    assert opt.engine.projected_backward is None


# ------------------------------------------------------------------------------------------ proj_dtype="auto"
@pytest.fixture(autouse=True)
def fresh_auto_decisions(monkeypatch):
    """Each test starts with no per-process decision (they are cached per shape); the scripted-timer tests see
    a CPU without oneDNN's bfloat16 math mode unless they ask for it (``bf16_inputs``)."""
    monkeypatch.setattr(base, "_AUTO_DECISIONS", {})
    monkeypatch.setattr(base, "_BF16_INPUTS", {"cpu": False})


@pytest.fixture
def bf16_inputs(monkeypatch):
    """A CPU where the bfloat16 math mode is offered (timed as "bfloat16 inputs"), whatever this one does."""
    monkeypatch.setattr(base, "_BF16_INPUTS", {"cpu": True})


class FakeTimer:
    """Stands in for measure_seconds: runs the path it is given (so the timed code executes) and answers the
    scripted seconds of that path's label; records the labels."""

    def __init__(self, seconds: dict):
        self.seconds, self.calls = seconds, []

    def __call__(self, label, run, device, repeats=1):
        run()
        answer = self.seconds[label]
        if isinstance(answer, list):  # one answer per call of that label
            answer = answer[self.calls.count(label)]
        self.calls.append(label)
        return answer


def step_pair(a, b, Wa, Wb, steps, seed=100):
    for i in range(steps):
        g = torch.randn(Wa.shape, generator=torch.Generator().manual_seed(seed + i))
        Wa.grad, Wb.grad = g.clone(), g.clone()
        a.step()
        b.step()
        assert torch.equal(Wa, Wb)


def test_auto_is_the_default_and_small_matrices_keep_float32_bit_for_bit():
    """By the policy alone (real timing): a 48x80 projection takes microseconds, far below AUTO_MIN_SECONDS on
    any CPU, so "auto" decides the parameter's dtype, stores it, and runs exactly proj_dtype=None's path."""
    W, opt = setup((48, 80), "left", ...)
    assert opt.param_groups[0]["proj_dtype"] == "auto"
    W2, opt2 = setup((48, 80), "left", None)
    step_pair(opt, opt2, W, W2, 5)  # refreshes at t = 0, 2, 4
    assert opt.state[W][AUTO_KEY] == 0
    ((code, fp32, low),) = base._AUTO_DECISIONS.values()
    assert code == 0 and 0 < fp32 < AUTO_MIN_SECONDS and low is None  # bfloat16 was not even timed
    assert set(opt.state[W]) - set(opt2.state[W2]) == {AUTO_KEY}


@pytest.mark.parametrize(
    "seconds, code, equals",
    [
        ({"float32": 2e-3, "bfloat16": 1e-3}, 1, "bfloat16"),  # measurably faster: bfloat16
        ({"float32": 2e-3, "bfloat16": 1.9e-3}, 0, None),  # faster, but within the 10 % margin: float32
        ({"float32": 2e-3, "bfloat16": 3e-3}, 0, None),  # slower: float32
        ({"float32": AUTO_MIN_SECONDS / 2, "bfloat16": 1e-9}, 0, None),  # below the policy's floor: not timed
    ],
)
@pytest.mark.parametrize("shape, proj_type", [((48, 80), "left"), ((80, 48), "right"), ((48, 64), "full")])
def test_auto_decides_by_the_timings_and_then_runs_that_path(monkeypatch, seconds, code, equals, shape, proj_type):
    timer = FakeTimer(seconds)
    monkeypatch.setattr(base, "measure_seconds", timer)
    W, opt = setup(shape, proj_type, "auto")
    W2, opt2 = setup(shape, proj_type, equals)  # the explicit option the decision must equal
    step_pair(opt, opt2, W, W2, 5)
    assert opt.state[W][AUTO_KEY] == code
    below = seconds["float32"] < AUTO_MIN_SECONDS
    # once per shape and process; above the floor, in alternating blocks
    assert timer.calls == (["float32"] if below else ["float32", "bfloat16"] * 2)
    P = opt.state[W]["proj" if proj_type != "full" else "proj_left"]
    # a float32 decision keeps no bfloat16 copy of the basis from the timed runs
    assert (base._GEMM_BASES.get(P) is None) == (code == 0)
    # a second matrix of the same shape reuses the process's decision without timing again
    W3, opt3 = setup(shape, proj_type, "auto", seed=1)
    opt3.step()
    assert opt3.state[W3][AUTO_KEY] == code and len(timer.calls) == (1 if below else 4)


def test_the_best_of_both_alternating_blocks_decides(monkeypatch):
    """A first float32 block slowed by contention (2 ms, then 1 ms): bfloat16's 0.95 ms beats the first block but
    not 90 % of the best float32 run, so float32 is kept."""
    timer = FakeTimer({"float32": [2e-3, 1e-3], "bfloat16": [0.95e-3, 0.97e-3]})
    monkeypatch.setattr(base, "measure_seconds", timer)
    W, opt = setup((48, 80), "left", "auto")
    opt.step()
    assert opt.state[W][AUTO_KEY] == 0 and timer.calls == ["float32", "bfloat16"] * 2
    ((code, fp32, low),) = base._AUTO_DECISIONS.values()
    assert (code, fp32, low) == (0, 1e-3, 0.95e-3)


def test_real_timing_runs_every_path_on_a_scratch_weight(monkeypatch):
    """With the floor lowered to 0, the real timer runs every path this CPU offers (the bfloat16 math mode where
    the probe finds it active); whatever it decides, the weights follow that path bit for bit (the timed runs
    wrote only into a scratch copy)."""
    monkeypatch.setattr(base, "AUTO_MIN_SECONDS", 0.0)
    monkeypatch.setattr(base, "_BF16_INPUTS", {})  # probed for real
    W, opt = setup((80, 48), "right", "auto", projector="svd")
    opt.step()
    ((code, fp32, low),) = base._AUTO_DECISIONS.values()
    assert fp32 > 0 and low is not None and opt.state[W][AUTO_KEY] == code
    inputs = code == base.AUTO_BF16_INPUTS
    W2, opt2 = setup((80, 48), "right", None if inputs else base.AUTO_CHOICES[code] and "bfloat16", projector="svd")
    with base.bf16_input_gemms() if inputs else contextlib.nullcontext():
        opt2.step()
    assert torch.equal(W, W2)


def test_bfloat16_inputs_decided_by_the_timings_and_run_as_float32_gemms_in_the_math_mode(monkeypatch, bf16_inputs):
    """Where the bfloat16 math mode is offered it is timed as a third path, in the same alternating blocks; chosen
    (fastest, or tied with bfloat16), the matrix's GEMMs run as float32 GEMMs inside ``bf16_input_gemms``: bit
    for bit the proj_dtype=None step taken inside that block (projector="svd", whose LAPACK SVD the switch does
    not touch), and the process's switch is back as it was after every step."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    for seconds, code in (
        ({"float32": 2e-3, "bfloat16": 1e-3, "bfloat16 inputs": 0.8e-3}, 2),
        ({"float32": 2e-3, "bfloat16": 1e-3, "bfloat16 inputs": 1e-3}, 2),  # a tie: bfloat16 inputs
        ({"float32": 2e-3, "bfloat16": 1e-3, "bfloat16 inputs": 1.2e-3}, 1),
        ({"float32": 2e-3, "bfloat16": 1.9e-3, "bfloat16 inputs": 1.85e-3}, 0),  # both within the margin
    ):
        monkeypatch.setattr(base, "_AUTO_DECISIONS", {})
        timer = FakeTimer(seconds)
        monkeypatch.setattr(base, "measure_seconds", timer)
        for shape, proj_type in (((48, 80), "left"), ((80, 48), "right"), ((48, 64), "full")):
            W, opt = setup(shape, proj_type, "auto", projector="svd")
            explicit = {0: None, 1: "bfloat16", 2: None}[code]
            W2, opt2 = setup(shape, proj_type, explicit, projector="svd")
            for i in range(5):
                g = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
                W.grad, W2.grad = g.clone(), g.clone()
                opt.step()
                assert torch.backends.mkldnn.matmul.fp32_precision == before
                with base.bf16_input_gemms() if code == 2 else contextlib.nullcontext():
                    opt2.step()
                assert torch.equal(W, W2)
            assert opt.state[W][AUTO_KEY] == code
        labels = ["bfloat16", "bfloat16 inputs"]
        assert timer.calls[:6] == ["float32", *labels, "float32", *labels]
    assert base.auto_decisions()[(48, 64, 8, "full", torch.float32, torch.device("cpu"), None)] == (
        "float32",
        2e-3,
        1.85e-3,
    )


def test_the_math_mode_switch_is_restored_on_error_and_keeps_a_user_setting():
    settings = torch.backends.mkldnn.matmul
    before = settings.fp32_precision
    try:
        for user in ("none", "bf16"):
            settings.fp32_precision = user
            with pytest.raises(RuntimeError, match="inside"):
                with base.bf16_input_gemms():
                    assert settings.fp32_precision == "bf16"
                    raise RuntimeError("inside")
            assert settings.fp32_precision == user
    finally:
        settings.fp32_precision = before


def test_the_probe_tells_an_active_math_mode_from_float32(monkeypatch):
    """bf16_inputs_available() answers True only where a product under the switch equals the bfloat16-rounded
    operands' product (to float32 accumulation) and differs from the float32 one; checked here against a direct
    computation on this CPU, whichever way it answers, and never for another device."""
    monkeypatch.setattr(base, "_BF16_INPUTS", {})  # probed for real
    A = torch.rand(64, 64, generator=torch.Generator().manual_seed(5))
    with base.bf16_input_gemms():
        got = A @ A.t()
    rounded = A.bfloat16().float() @ A.bfloat16().float().t()
    active = float((got - rounded).abs().max()) < float((got - A @ A.t()).abs().max())
    assert base.bf16_inputs_available(torch.device("cpu")) is active
    assert base.bf16_inputs_available(torch.device("meta")) is False


def test_cuda_timing_synchronizes_around_each_run(monkeypatch):
    """The CUDA branch of measure_seconds (no GPU needed: the synchronize is recorded, the run is a CPU call)."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    seconds = base.measure_seconds("float32", lambda: events.append("run"), torch.device("cuda", 0))
    assert seconds >= 0
    assert events == [item for _ in range(AUTO_RUNS + 1) for item in ("run", ("sync", torch.device("cuda", 0)))]
    events.clear()
    base.measure_seconds("float32", lambda: events.append("run"), torch.device("cpu"))
    assert events == ["run"] * (AUTO_RUNS + 1)  # no synchronize on the CPU
    events.clear()
    base.measure_seconds("float32", lambda: events.append("run"), torch.device("cuda", 0), repeats=3)
    run_then_sync = ["run", ("sync", torch.device("cuda", 0))]
    assert events == run_then_sync + (["run"] * 3 + run_then_sync[1:]) * AUTO_RUNS  # one sync per timed run


def test_the_comparison_repeats_each_path_to_about_a_millisecond(monkeypatch, bf16_inputs):
    """A float32 path of 0.2 ms is timed again, with every other path, in runs of ceil(1 ms / 0.2 ms) = 5 calls;
    one of 0.01 ms (below the floor) is not compared at all."""
    for first, repeats in ((2e-4, 5), (2e-5, None)):
        monkeypatch.setattr(base, "_AUTO_DECISIONS", {})
        seen = []

        def timer(label, run, device, repeats=1):
            seen.append((label, repeats))
            return first if label == "float32" else first / 2

        monkeypatch.setattr(base, "measure_seconds", timer)
        W, opt = setup((48, 80), "left", "auto")
        opt.step()
        if repeats is None:
            assert seen == [("float32", 1)] and opt.state[W][AUTO_KEY] == 0
        else:
            labels = [("bfloat16", repeats), ("bfloat16 inputs", repeats)]
            assert seen == [("float32", 1), *labels, ("float32", repeats), *labels]
            assert opt.state[W][AUTO_KEY] == base.AUTO_BF16_INPUTS


def test_a_stored_decision_is_honoured_on_resume_bit_for_bit(monkeypatch):
    """A checkpoint keeps the decision: resumed where timing would now decide otherwise, it is not re-timed and
    the run continues bit for bit."""
    monkeypatch.setattr(base, "measure_seconds", FakeTimer({"float32": 2e-3, "bfloat16": 1e-3}))
    W, opt = setup((48, 80), "left", "auto")
    for _ in range(3):
        opt.step()
    assert opt.state[W][AUTO_KEY] == 1
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["state"][0][AUTO_KEY] == 1
    monkeypatch.setattr(base, "_AUTO_DECISIONS", {})  # a new process, where bfloat16 measures slower
    timer = FakeTimer({"float32": 2e-3, "bfloat16": 3e-3})
    monkeypatch.setattr(base, "measure_seconds", timer)
    W2 = torch.nn.Parameter(W.detach().clone())
    opt2 = gradproj.GaLoreAdamW([{"params": [W2], "rank": 8, "update_proj_gap": 2, "scale": 0.25}], lr=1e-2)
    opt2.load_state_dict(saved)
    step_pair(opt, opt2, W, W2, 4)  # refreshes at t = 4, 6 keep the stored decision
    assert timer.calls == [] and opt2.state[W2][AUTO_KEY] == 1


def test_an_explicit_proj_dtype_overrides_the_stored_decision(monkeypatch):
    """auto decided bfloat16; setting proj_dtype=None (or float16) on the group runs that path from the next
    step, without a restart; back to "auto", the stored decision is used again, not re-timed."""
    timer = FakeTimer({"float32": 2e-3, "bfloat16": 1e-3})
    monkeypatch.setattr(base, "measure_seconds", timer)
    W, opt = setup((48, 80), "left", "auto")
    opt.step()
    for explicit in (None, "float16", "auto"):
        opt.param_groups[0]["proj_dtype"] = explicit
        W2 = torch.nn.Parameter(W.detach().clone())
        group = {"params": [W2], "rank": 8, "update_proj_gap": 2, "scale": 0.25, "proj_dtype": explicit or None}
        if explicit == "auto":
            group["proj_dtype"] = "bfloat16"
        opt2 = gradproj.GaLoreAdamW([group], lr=1e-2)
        opt2.load_state_dict({**copy.deepcopy(opt.state_dict()), "param_groups": opt2.state_dict()["param_groups"]})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no restart warning: the state still fits
            step_pair(opt, opt2, W, W2, 3, seed=10 * len(timer.calls))
        assert opt.state[W][AUTO_KEY] == 1
    assert timer.calls == ["float32", "bfloat16"] * 2


@pytest.mark.parametrize("value", [3, -1, 1.0, "bfloat16", True, torch.tensor(1)])
def test_a_checkpoint_with_a_bad_decision_is_refused_before_loading(monkeypatch, value):
    monkeypatch.setattr(base, "measure_seconds", FakeTimer({"float32": 2e-3, "bfloat16": 1e-3}))
    _, opt = setup((48, 80), "left", "auto")
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0][AUTO_KEY] = value
    W2, opt2 = setup((48, 80), "left", "auto", seed=3)
    before = W2.detach().clone()
    with pytest.raises(ValueError, match=AUTO_KEY):
        opt2.load_state_dict(saved)
    assert not opt2.state and torch.equal(W2, before)


@pytest.mark.parametrize(
    "options",
    [
        {"projector": "random"},  # no stored dense basis: no error (unlike an explicit bfloat16), the parameter's
        {"projector": "dct"},
        {"projector": "golore", "golore_switch_step": 2},
        {"residual": "fira"},  # G - B(R) stays in the parameter's dtype
        {"residual": "frugal"},
        {"compile": True},  # the compiled tail runs the parameter's dtype
        {"compile": False, "proj_type": "full"},  # full: a dense basis on both sides, decided (control)
    ],
)
def test_auto_keeps_the_parameter_dtype_where_low_precision_does_not_apply(monkeypatch, options):
    timer = FakeTimer({"float32": 2e-3, "bfloat16": 1e-3})  # would choose bfloat16 wherever it is asked
    monkeypatch.setattr(base, "measure_seconds", timer)
    preset = gradproj.FiraAdamW if options.get("residual") == "fira" else gradproj.GaLoreAdamW
    W = torch.nn.Parameter(torch.randn(48, 80, generator=torch.Generator().manual_seed(0)))
    group = {"params": [W], "rank": 8, "update_proj_gap": 2, "scale": 0.25, **options}
    opt = preset([group], lr=1e-2)
    for i in range(4):
        W.grad = torch.randn(W.shape, generator=torch.Generator().manual_seed(i))
        opt.step()
    timed = options.get("proj_type") == "full"
    recorded = "projector" not in options  # a dense basis records the parameter's dtype (0) without timing
    assert opt.state[W].get(AUTO_KEY) == ({True: 1, False: 0}[timed] if recorded else None)
    assert (timer.calls != []) == timed


def test_auto_keeps_a_bfloat16_parameter_in_its_dtype(monkeypatch):
    timer = FakeTimer({"float32": 2e-3, "bfloat16": 1e-3})
    monkeypatch.setattr(base, "measure_seconds", timer)
    W = torch.nn.Parameter(torch.randn(48, 80).bfloat16())
    W.grad = torch.randn(48, 80).bfloat16()
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 8, "update_proj_gap": 2, "scale": 0.25}], lr=1e-2)
    opt.step()
    assert opt.state[W][AUTO_KEY] == 0 and timer.calls == []


def test_the_batched_step_takes_auto_matrices_that_chose_float32(monkeypatch):
    """foreach=True: an "auto" matrix decided float32 steps batched (bit for bit as proj_dtype=None batched), one
    decided bfloat16 stays on the per-matrix path."""
    for seconds, batched in (({"float32": 2e-3, "bfloat16": 3e-3}, True), ({"float32": 2e-3, "bfloat16": 1e-3}, False)):
        monkeypatch.setattr(base, "_AUTO_DECISIONS", {})
        monkeypatch.setattr(base, "measure_seconds", FakeTimer(seconds))
        W, opt = setup((48, 80), "left", "auto")
        W2, opt2 = setup((48, 80), "left", None)
        opt.param_groups[0]["foreach"] = opt2.param_groups[0]["foreach"] = True
        opt.step()
        opt2.step()
        assert (id(W) in multi_tensor.collect(opt).ids) == batched  # t = 1: a regular step
        if batched:
            step_pair(opt, opt2, W, W2, 4)


def test_project_backward_resolves_auto_to_the_parameter_dtype(monkeypatch):
    """Projected backward with the default "auto": its weights keep float32 (R is formed in it), even where
    timing would choose bfloat16; the run equals proj_dtype=None's bit for bit. Explicit bfloat16 is refused."""
    timer = FakeTimer({"float32": 2e-3, "bfloat16": 1e-3})
    monkeypatch.setattr(base, "measure_seconds", timer)

    def train(proj_dtype):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 16))
        # refresh_stagger=False: both weights refresh at t = 0, 3, 6 (the schedule asserted below)
        groups = gradproj.param_groups(model, rank=4, update_proj_gap=3, proj_dtype=proj_dtype, refresh_stagger=False)
        opt = gradproj.GaLoreAdamW(groups, lr=1e-2)
        handle = gradproj.project_backward(model, opt)
        projected = []
        for i in range(7):  # refreshes at t = 0, 3, 6
            x = torch.randn(8, 32, generator=torch.Generator().manual_seed(i))
            model(x).square().mean().backward()
            projected.append(len(handle.projected))
            opt.step()
            opt.zero_grad()
        assert projected == [0, 2, 2, 0, 2, 2, 0]  # both weights stepped from R between refreshes
        return model, opt

    model, opt = train("auto")
    ref, _ = train(None)
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    assert all(opt.state[w][AUTO_KEY] == 0 for w in weights)
    assert timer.calls == []  # nothing was timed for the weights projected backward serves
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_a_checkpoint_without_a_decision_runs_float32_until_its_next_refresh(monkeypatch):
    """A state written before the key existed (or under proj_dtype=None): "auto" runs the parameter's dtype, bit
    for bit as None, until the matrix's next refresh decides."""
    timer = FakeTimer({"float32": 2e-3, "bfloat16": 1e-3})
    monkeypatch.setattr(base, "measure_seconds", timer)
    W, opt = setup((48, 80), "left", None)
    opt.step()  # t = 0: the basis, no decision
    saved = copy.deepcopy(opt.state_dict())
    assert AUTO_KEY not in saved["state"][0]
    W2 = torch.nn.Parameter(W.detach().clone())
    opt2 = gradproj.GaLoreAdamW([{"params": [W2], "rank": 8, "update_proj_gap": 2, "scale": 0.25}], lr=1e-2)
    opt2.load_state_dict({**saved, "param_groups": opt2.state_dict()["param_groups"]})
    assert opt2.param_groups[0]["proj_dtype"] == "auto"
    step_pair(opt, opt2, W, W2, 1)  # t = 1: no refresh, float32 as None
    assert AUTO_KEY not in opt2.state[W2] and timer.calls == []
    g = torch.randn(W.shape, generator=torch.Generator().manual_seed(7))
    W2.grad = g
    opt2.step()  # t = 2: the refresh decides
    assert opt2.state[W2][AUTO_KEY] == 1 and timer.calls == ["float32", "bfloat16"] * 2
