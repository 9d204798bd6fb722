"""GaLoreAdamW8bit's compiled CPU update (gradproj/inner/adam8bit_fused.py) against bitsandbytes' quantizer and the
eager update it replaces."""

import logging
import math

import pytest
import torch
from problems import matrix_problem, train

import gradproj
from gradproj.inner import adam8bit, adam8bit_fused
from gradproj.kernels import reference

bnb = pytest.importorskip("bitsandbytes")
F = adam8bit.bnb_functional()
CPU = torch.device("cpu")
U = 2.0**-24  # float32 unit roundoff
_BUILT: list = []


def built():
    """The kernel, built once for this test process (the first build costs a few seconds)."""
    if not _BUILT:
        saved = dict(adam8bit_fused._state)
        adam8bit_fused._state.update(kernel=None, tried=False)
        _BUILT.append(adam8bit_fused.build())
        adam8bit_fused._state.update(saved)
    assert _BUILT[0] is not None, "the compiled update must build here (gcc and torch's inductor are present)"
    return _BUILT[0]


@pytest.fixture
def compiled(monkeypatch):
    """The optimizer steps through the compiled update for the duration of a test."""
    kernel = built()
    monkeypatch.setitem(adam8bit_fused._state, "kernel", kernel)
    monkeypatch.setitem(adam8bit_fused._state, "tried", True)
    return kernel


@pytest.fixture
def eager(monkeypatch):
    """... and through the eager update."""
    monkeypatch.setitem(adam8bit_fused._state, "kernel", None)
    monkeypatch.setitem(adam8bit_fused._state, "tried", True)


def bnb_quantize(x, signed):
    codes, state = F.quantize_blockwise(x, code=adam8bit.dynamic_map(signed, x.device), blocksize=256)
    return codes, state.absmax


def assert_kernel_quantizes_as_bnb(m, v):
    got = built().quantize(m, v)
    assert got is not None
    for k, x in enumerate((m, v)):
        codes, absmax = bnb_quantize(x, signed=k == 0)
        assert torch.equal(got[1][k], absmax)
        assert torch.equal(got[0][k], codes), f"{(got[0][k] != codes).sum()} codes differ"


@pytest.mark.parametrize("scale", [1.0, 0.7, 13.0, 1e-20, 3e30])
def test_codes_equal_bitsandbytes_at_every_bin_edge(scale):
    """Every bin edge where a map's code changes (±64 float steps, the halfway points and their neighbours),
    ±1 with their neighbours, at block maxima where 1/absmax rounds: the bin arithmetic rounds as bitsandbytes'
    (a multiply-add contracted into an fma would move values across edges)."""
    q = adam8bit.lut_quantizer(CPU)
    x = [adam8bit._blocks_with_max(adam8bit.boundary_values(q.tables[k], k == 0), scale) for k in (0, 1)]
    n = max(t.numel() for t in x)
    assert n > 200 * 64
    # the shorter one is padded with all-zero blocks (code 0, scale 0 for both quantizers)
    m, v = (torch.cat([t, torch.zeros(n - t.numel())]) for t in x)
    assert_kernel_quantizes_as_bnb(m, v)


def test_codes_equal_bitsandbytes_on_random_moments():
    """Many magnitudes within blocks, zeros, all-zero blocks, whole and partial last blocks."""
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 3.7e-3, 2.5e-9, 6.1e4):
        for n in (256 * 40, 256 * 40 - 77, 100):
            m = torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g)) * scale
            v = (torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g)) * scale) ** 2
            m[::7] = 0.0
            v[::5] = 0.0
            m[256:512] = 0.0
            v[-200:] = 0.0
            assert_kernel_quantizes_as_bnb(m, v)


def random_state(n, seed):
    """Codes and scales of moments that are Adam-like (v of many magnitudes), and a gradient."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, generator=g) * 1e-2
    v = (torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g)) * 1e-3) ** 2
    m[:256] = 0.0  # an all-zero block of m (its scale is 0)
    q = adam8bit.lut_quantizer(CPU)
    (mc, ma), (vc, va) = adam8bit.quantize_lut(q, m, True), adam8bit.quantize_lut(q, v, False)
    r = torch.randn(n, generator=g) * 1e-2
    r[300:400] = 0.0
    return r, [mc, vc], [ma, va]


@pytest.mark.parametrize("n, beta1", [(256 * 64, 0.9), (256 * 64 - 77, 0.9), (3000, 0.3)])
def test_update_matches_the_eager_update_and_quantizes_its_own_moments_as_bitsandbytes(n, beta1):
    """The moments and ψ against the eager update (LutQuantizer's dequantization, torch's fused Adam), within
    the roundings the two may place differently; the codes are bitsandbytes' of the kernel's own moments.
    β1 = 0.3 takes the other form of torch's lerp (weight 1−β1 ≥ 0.5)."""
    beta2, eps = 0.999, 1e-6
    r, codes, scales = random_state(n, seed=n)
    # the eager update
    q = adam8bit.lut_quantizer(CPU)
    ws = adam8bit.Workspace(n, CPU)
    q.dequantize(ws, codes, scales)
    m0 = ws.w[0].clone()
    m_e, v_e = ws.w[0].clone(), ws.w[1].clone()
    (psi_e,) = reference.adam_update_fused([r], [m_e], [v_e], beta1, beta2, eps)
    # the kernel
    kernel = built()
    codes_k, scales_k = [c.clone() for c in codes], [s.clone() for s in scales]
    psi_k, moments = torch.empty(n), torch.empty(2 * n)
    assert kernel.update(r, psi_k, codes_k, scales_k, beta1, beta2, eps, moments=moments) == []
    m_k, v_k = moments[:n], moments[n:]
    # m = lerp(m, R, 1−β1) = w·d + base with d = R − m: fused into one rounding by torch's kernel and by this one
    # where the ISA has an fma, two roundings where it does not. Both are within u·|exact| of w·d + base, the
    # unfused one u·|w·d| more: |Δ| ≤ u·(|m_e| + |m_k|) + u·|w·d| (+ u² terms) ≤ 2^-23·(|m_e| + |w·d|).
    w = torch.tensor(1.0 - beta1, dtype=torch.float32)
    small = bool(w.abs() < 0.5)
    wd = (w if small else w - 1) * (r - m0)
    assert (m_k - m_e).abs().le(2.0**-23 * (m_e.abs() + wd.abs())).all()
    # v = β2·v + (1−β2)·R·R: the product p = fl((1−β2)·R)·R rounded or not before the sum: likewise
    p = torch.tensor(1.0 - beta2, dtype=torch.float32) * r * r
    assert (v_k - v_e).abs().le(2.0**-23 * (v_e.abs() + p.abs())).all()
    # ψ is fl(m / fl(fl(√v) + eps)) of the kernel's own moments, each operation correctly rounded: exactly that,
    # computed here in float64 and rounded to float32 once per operation (a correctly rounded float64 √, + or /
    # rounded again to float32 is the correctly rounded float32 result: 53 ≥ 2·24 + 2 bits). (torch.sqrt on the
    # CPU is not correctly rounded everywhere, so it is no reference.)
    den = (v_k.double().sqrt().float().double() + torch.tensor(eps, dtype=torch.float32).double()).float()
    assert torch.equal(psi_k, (m_k.double() / den.double()).float() + 0.0)
    # ... hence near the eager ψ: |Δψ| ≤ (|Δm| + |ψ|·|Δ√v|) / den + the two sides' roundings of √, + and /
    # (3u each, relative), with |Δ√v| ≤ √|Δv|
    dm = 2.0**-23 * (m_e.abs() + wd.abs())
    dsqrt = (2.0**-23 * (v_e.abs() + p.abs())).sqrt()
    assert (psi_k - psi_e).abs().le((dm + psi_e.abs() * dsqrt) / den + 6 * U * psi_e.abs()).all()
    # the stored codes and scales are bitsandbytes' quantization of the kernel's own fp32 moments
    for k, x in enumerate((m_k, v_k)):
        ref_codes, ref_absmax = bnb_quantize(x.clone(), signed=k == 0)
        assert torch.equal(scales_k[k], ref_absmax)
        assert torch.equal(codes_k[k], ref_codes)


def test_the_update_stops_at_a_block_whose_maximum_is_not_finite_normal():
    """Blocks before the first bad one are committed (as the kernel commits them alone), that block and the ones
    after it are left as they were (codes, scales, and the weight in the weight-step mode)."""
    n = 1024
    for bad, where in ((float("inf"), 700), (float("nan"), 5), (3e38, 900)):  # 3e38: v = R² overflows
        first = where // 256 * 256
        for weight_step in (None, (-1e-2, -1e-3)):
            r, codes, scales = random_state(n, seed=1)
            r[where] = bad
            out = torch.randn(n)
            before = [c.clone() for c in codes], [s.clone() for s in scales], out.clone()
            assert built().update(r, out, codes, scales, 0.9, 0.999, 1e-6, weight_step) == [(first, n)]
            blocks = first // 256
            assert all(torch.equal(a[first:], b[first:]) for a, b in zip(codes, before[0]))
            assert all(torch.equal(a[blocks:], b[blocks:]) for a, b in zip(scales, before[1]))
            if weight_step is not None:
                assert torch.equal(out[first:], before[2][first:])
            # the committed prefix: what the kernel gives for those blocks alone
            pc, ps, po = (
                [c[:first].clone() for c in before[0]],
                [s[:blocks].clone() for s in before[1]],
                before[2][:first].clone(),
            )
            assert built().update(r[:first], po, pc, ps, 0.9, 0.999, 1e-6, weight_step) == []
            assert all(torch.equal(a[:first], b) for a, b in zip(codes, pc))
            assert all(torch.equal(a[:blocks], b) for a, b in zip(scales, ps))
            assert torch.equal(out[:first], po)
    # subnormal block maxima of the moments themselves, in the quantizer
    m = torch.ones(768)
    m[256:512] = 1e-39
    m[512:] = 0.0  # beside an all-zero block
    assert built().quantize(m, torch.ones(768)) is None
    assert built().quantize(torch.ones(768), m) is None


@pytest.mark.parametrize("weight_step", [None, (-1e-2, -1e-3)])
def test_threads_update_ranges_of_blocks_and_stop_each_at_its_first_bad_block(weight_step):
    """On two threads the blocks are split into two ranges (2^15 values or more each; the split is the same
    whether OpenMP runs them in parallel or not): every committed block is what one thread gives (the blocks are
    independent), and each range stops at its own first bad block."""
    n = 3 * adam8bit_fused.MIN_BLOCKS_PER_THREAD * 256 + 100  # 3 ranges' worth and a partial block: 2 threads
    r, codes, scales = random_state(n, seed=5)
    out = torch.randn(n)

    def run(x, threads):
        c, sc, o = [t.clone() for t in codes], [t.clone() for t in scales], out.clone()
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            left = built().update(x, o, c, sc, 0.9, 0.999, 1e-6, weight_step)
        finally:
            torch.set_num_threads(saved)
        return left, c, sc, o

    left1, *one = run(r, 1)
    left2, *two = run(r, 2)
    assert left1 == left2 == []
    assert all(torch.equal(a, b) for a, b in zip(one[0] + one[1] + [one[2]], two[0] + two[1] + [two[2]]))
    bad = r.clone()
    half = adam8bit.num_blocks(n) // 2  # the second range starts here
    bad[10 * 256 + 3] = float("nan")
    bad[(half + 7) * 256] = float("inf")
    left, c, sc, o = run(bad, 2)
    assert left == [(10 * 256, half * 256), ((half + 7) * 256, n)]
    committed = [(0, 10 * 256), (half * 256, (half + 7) * 256)]
    for lo, hi in committed:
        assert all(torch.equal(a[lo:hi], b[lo:hi]) for a, b in zip(c, one[0]))
        assert all(torch.equal(a[lo // 256 : hi // 256], b[lo // 256 : hi // 256]) for a, b in zip(sc, one[1]))
        if weight_step is not None:
            assert torch.equal(o[lo:hi], one[2][lo:hi])
    for lo, hi in left:
        assert all(torch.equal(a[lo:hi], b[lo:hi]) for a, b in zip(c, codes))
        assert all(torch.equal(a[lo // 256 : -(-hi // 256)], b[lo // 256 : -(-hi // 256)]) for a, b in zip(sc, scales))
        if weight_step is not None:
            assert torch.equal(o[lo:hi], out[lo:hi])


def test_a_chunk_with_a_non_finite_block_steps_as_the_eager_code(monkeypatch, compiled):
    """Two optimizers in the same state (unprojected 8-bit tensors of two chunks, CHUNK_SIZE patched to 512)
    take a step whose gradient is inf in the second chunk of one tensor, one through the kernel (its weight step),
    one through the eager update: that chunk's codes, scales and weights are bit for bit the eager code's
    (bitsandbytes' quantizer decides them, from the state the kernel left untouched)."""
    monkeypatch.setattr(adam8bit, "CHUNK_SIZE", 512)
    g = torch.Generator().manual_seed(7)
    shapes = [(40, 30), (33, 31)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    grads[2][0][20, 3] = float("inf")  # value 603: the second chunk of the first tensor

    def run(last_step_compiled):
        monkeypatch.setitem(adam8bit_fused._state, "kernel", compiled)
        ps = [torch.nn.Parameter(x.clone()) for x in start]
        opt = gradproj.GaLoreAdamW8bit([{"params": ps}], lr=1e-2, min_8bit_size=256)
        for i, gs in enumerate(grads):
            if i == 2 and not last_step_compiled:
                monkeypatch.setitem(adam8bit_fused._state, "kernel", None)
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        return opt.state[ps[0]], ps[0].detach()

    calls = []
    real = adam8bit.quantize_
    monkeypatch.setattr(adam8bit, "quantize_", lambda *a, **k: (calls.append(1), real(*a, **k)))
    st_c, w_c = run(True)
    assert len(calls) == 2  # m and v of the one chunk, through bitsandbytes
    st_e, w_e = run(False)
    # the weight there too: the chunk's weight step is the engine's (torch's add_, same elementwise ops)
    assert torch.equal(w_c.view(-1)[512:1024].view(torch.int32), w_e.view(-1)[512:1024].view(torch.int32))  # bits: NaN
    assert st_c["exp_avg"].dtype == torch.uint8 and st_c["exp_avg"].numel() == 1200
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(st_c[k].view(-1)[512:1024], st_e[k].view(-1)[512:1024])
    for k in (adam8bit.EXP_AVG_ABSMAX, adam8bit.EXP_AVG_SQ_ABSMAX):
        assert torch.equal(st_c[k][2:4], st_e[k][2:4])
    assert not torch.isfinite(st_c[adam8bit.EXP_AVG_SQ_ABSMAX][2:4]).all()  # the inf is stored


def test_steps_use_the_kernel_only_where_it_applies(monkeypatch, compiled):
    """The CPU default runs the kernel; adam_kernel="reference", bfloat16 R, a bitsandbytes the vectorized
    quantizer does not reproduce and a step traced by torch.compile run the existing paths."""
    calls = []
    real = adam8bit_fused.FusedUpdate.update
    monkeypatch.setattr(adam8bit_fused.FusedUpdate, "update", lambda *a, **k: (calls.append(1), real(*a, **k))[1])

    def steps(dtype=torch.float32, **group):
        params, loss_fn = matrix_problem([(64, 300), (200, 40)], seed=3, dtype=dtype)
        groups = [{"params": params, "rank": 16, "update_proj_gap": 200, "scale": 0.25, **group}]
        opt = gradproj.GaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=256)
        train(params, opt, 2, loss_fn)
        return len(calls)

    assert steps() == 2 * 2  # two tensors, two steps
    calls.clear()
    assert steps(adam_kernel="reference") == 0
    assert steps(dtype=torch.bfloat16) == 0
    monkeypatch.setitem(adam8bit._LUT, str(CPU), None)
    assert steps() == 0
    monkeypatch.undo()
    monkeypatch.setitem(adam8bit_fused._state, "kernel", compiled)
    monkeypatch.setitem(adam8bit_fused._state, "tried", True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert adam8bit_fused.for_update(10**9) is None


def test_built_once_after_enough_eager_values_and_never_retried(monkeypatch, caplog):
    """The eager path runs until BUILD_AFTER_VALUES values were updated; a failed build is logged (not warned)
    and not tried again."""
    monkeypatch.setattr(adam8bit_fused, "BUILD_AFTER_VALUES", 10_000)
    monkeypatch.setitem(adam8bit_fused._state, "kernel", None)
    monkeypatch.setitem(adam8bit_fused._state, "tried", False)
    monkeypatch.setitem(adam8bit_fused._state, "eager_values", 0)
    builds = []

    def failing():
        builds.append(1)
        raise RuntimeError("no C++ compiler")

    from torch._inductor import codecache

    monkeypatch.setattr(codecache.CppPythonBindingsCodeCache, "load_pybinding", lambda *a, **k: failing())
    assert adam8bit_fused.for_update(4096) is None
    assert adam8bit_fused.for_update(4096) is None
    assert not builds
    with caplog.at_level(logging.INFO, logger="gradproj"):
        assert adam8bit_fused.for_update(4096) is None  # 12288 values: the build is tried, and fails
    assert builds == [1]
    assert "could not be built (RuntimeError: no C++ compiler); the eager one runs" in caplog.text
    for _ in range(3):
        assert adam8bit_fused.for_update(10**6) is None
    assert builds == [1]
    # a successful build is kept
    monkeypatch.setitem(adam8bit_fused._state, "kernel", built())
    assert adam8bit_fused.for_update(1) is built()


def test_checkpoint_layout_and_resume(monkeypatch, compiled):
    """The compiled update stores the same tensors (uint8 codes shaped like R, fp32 scales per 256 values): a
    checkpoint resumes under either path, and under the kernel exactly as an uninterrupted run."""

    def make(params):
        groups = [{"params": params, "rank": 8, "update_proj_gap": 4, "scale": 0.25}]
        return gradproj.GaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=256)

    params, loss_fn = matrix_problem([(96, 300), (200, 40)], seed=3)
    straight = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = make(params)
    train(params, opt, 3, loss_fn)
    sd = opt.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make(resumed)
    opt2.load_state_dict(sd)
    train(resumed, opt2, 3, loss_fn)
    train(straight, make(straight), 6, loss_fn)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))
    # the same layout as the eager update's
    monkeypatch.setitem(adam8bit_fused._state, "kernel", None)
    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_e = make(eager_params)
    train(eager_params, opt_e, 1, loss_fn)
    for p, q in zip(resumed, eager_params):
        sc, se = opt2.state[p], opt_e.state[q]
        assert set(sc) == set(se)
        for k in adam8bit.Adam8bit.state_keys:
            assert sc[k].shape == se[k].shape and sc[k].dtype == se[k].dtype


def test_a_build_that_contracts_the_bin_arithmetic_is_not_used(monkeypatch, caplog):
    """Built with -ffp-contract=fast, fl(fl(t + 1)·32767.5) + 0.5 becomes one fma, which moves values at bin
    edges into the neighbouring bin: the check against the vectorized quantizer at build rejects that kernel.
    (Built for AVX2, which has the fma to contract into, whatever ATEN_CPU_CAPABILITY says.)"""
    monkeypatch.setitem(adam8bit_fused._state, "kernel", None)
    monkeypatch.setitem(adam8bit_fused._state, "tried", False)
    contracting = {"cpp.enable_floating_point_contract_flag": "fast", "cpp.simdlen": 256}
    monkeypatch.setattr(adam8bit_fused, "BUILD_CONFIG", contracting)
    with caplog.at_level(logging.INFO, logger="gradproj"):
        assert adam8bit_fused.build() is None
    assert "quantizes differently from bitsandbytes; the eager one runs" in caplog.text


def weight_step_tolerance(w_ref, a_psi, decay):
    """|Δ| between two evaluations of w1 = w + a·ψ, w2 = w1 + d·w1 that each may or may not fuse a multiply-add
    into one rounding (torch's add_ fuses it in its vector loops; its scalar tail is left to the compiler). The
    inputs of each rounding then differ by at most u·|product| plus the difference carried in, and two roundings
    of inputs that close differ by at most that plus one ulp (≤ 2u·|result|): |Δw1| ≤ u·|aψ| + 2u·|w1|, and
    |Δw2| ≤ (1 + |d|)·|Δw1| + u·|d·w1| + 2u·|w2|, with |w1| ≤ |w2| / (1 − |d|) ≤ 2·|w2| for |d| ≤ 1/2."""
    assert abs(decay) <= 0.5
    w1 = 2 * w_ref.abs()
    return (1 + abs(decay)) * (U * a_psi.abs() + 2 * U * w1) + U * abs(decay) * w1 + 2 * U * w_ref.abs()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_weight_step_of_unprojected_tensors_is_the_engine_update(monkeypatch, compiled, weight_decay):
    """Unprojected 8-bit tensors (an embedding-like matrix, a long 1-D tensor with a partial last block) step
    their weight inside the kernel: the moments' codes and scales are bit for bit those of the ψ path, and the
    weight is the engine's update W ← W − step·ψ, W ← W − lr·wd·W computed with torch's ops from the kernel's ψ,
    within the roundings a fused multiply-add may place differently (weight_step_tolerance)."""
    g = torch.Generator().manual_seed(11)
    shapes = [(70, 90), (5000,)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * 1e-2 for s in shapes] for _ in range(3)]
    lr, beta1, beta2, eps = 3e-2, 0.9, 0.999, 1e-8

    def optimizer(ps):
        return gradproj.GaLoreAdamW8bit(
            [{"params": ps}], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, min_8bit_size=256
        )

    folded = []
    real = adam8bit_fused.FusedUpdate.update
    monkeypatch.setattr(
        adam8bit_fused.FusedUpdate, "update", lambda *a, **k: (folded.append(a[8] is not None), real(*a, **k))[1]
    )
    ps = [torch.nn.Parameter(x.clone()) for x in start]
    opt = optimizer(ps)
    for t, gs in enumerate(grads, start=1):
        states = [
            {k: torch.as_tensor(v).clone() for k, v in opt.state[p].items()} if p in opt.state else None for p in ps
        ]
        before = [p.detach().clone() for p in ps]
        for p, gr in zip(ps, gs):
            p.grad = gr.clone()
        opt.step()
        step = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        for p, gr, st, w0 in zip(ps, gs, states, before):
            n = gr.numel()
            blocks = adam8bit.num_blocks(n)
            codes = (
                [st["exp_avg"].view(-1).clone(), st["exp_avg_sq"].view(-1).clone()]
                if st
                else [torch.zeros(n, dtype=torch.uint8) for _ in range(2)]
            )
            scales = (
                [st[k].clone() for k in (adam8bit.EXP_AVG_ABSMAX, adam8bit.EXP_AVG_SQ_ABSMAX)]
                if st
                else [torch.zeros(blocks) for _ in range(2)]
            )
            psi = torch.empty(n)
            assert real(compiled, gr.reshape(-1), psi, codes, scales, beta1, beta2, eps) == []  # the ψ path
            state = opt.state[p]
            assert torch.equal(state["exp_avg"].view(-1), codes[0]) and torch.equal(
                state["exp_avg_sq"].view(-1), codes[1]
            )
            assert torch.equal(state[adam8bit.EXP_AVG_ABSMAX], scales[0])
            assert torch.equal(state[adam8bit.EXP_AVG_SQ_ABSMAX], scales[1])
            decay = -lr * weight_decay
            w_ref = w0.reshape(-1).clone().add_(psi, alpha=-step)
            if decay:
                w_ref.add_(w_ref, alpha=decay)
            got = p.detach().reshape(-1)
            assert (got - w_ref).abs().le(weight_step_tolerance(w_ref, step * psi, decay)).all()
            assert not torch.equal(got, w0.reshape(-1))
    assert folded == [True] * 6  # two tensors, three steps, each one kernel call with the weight step


def test_the_weight_step_runs_only_where_the_engine_update_is_plain(monkeypatch, compiled):
    """bfloat16 weights, a norm-growth limit and projected matrices keep the ψ path (the engine's own update)."""
    modes = []
    real = adam8bit_fused.FusedUpdate.update
    monkeypatch.setattr(
        adam8bit_fused.FusedUpdate,
        "update",
        lambda *a, **k: (modes.append(len(a) > 8 and a[8] is not None), real(*a, **k))[1],
    )

    def steps(dtype=torch.float32, **group):
        modes.clear()
        params, loss_fn = matrix_problem([(64, 300), (200, 40)], seed=3, dtype=dtype)
        opt = gradproj.GaLoreAdamW8bit([{"params": params, **group}], lr=1e-2, min_8bit_size=256)
        train(params, opt, 2, loss_fn)
        return modes

    assert steps() == [True] * 4
    assert steps(norm_growth_limit=1.01) == [False] * 4
    assert steps(rank=16, update_proj_gap=200, scale=0.25) == [False] * 4
    assert steps(dtype=torch.bfloat16) == []  # the kernel takes float32 only: the eager update
    # a tensor below min_8bit_size keeps fp32 moments: the ψ path of Adam, no kernel
    modes.clear()
    small = torch.nn.Parameter(torch.randn(10, 20))
    opt = gradproj.GaLoreAdamW8bit([{"params": [small]}], lr=1e-2, min_8bit_size=256)
    for _ in range(2):
        small.grad = torch.randn(10, 20)
        opt.step()
    assert modes == [] and opt.state[small]["exp_avg"].dtype == torch.float32


def test_the_scalar_lookups_give_the_gathers_results():
    """Built without its explicit AVX-512 gathers (the source a CPU without AVX-512 compiles: plain loops over the
    tables, which the compiler may vectorize its own way), the kernel gives the same codes, scales, ψ, moments and
    weights bit for bit: both look up the same tables and multiply the same floats."""
    scalar = adam8bit_fused._build(gathers=False)
    assert scalar is not None
    n = 256 * 40 + 77  # whole blocks and a partial one
    for weight_step in (None, (-1e-2, -1e-3)):
        results = []
        for kernel in (built(), scalar):
            r, codes, scales = random_state(n, seed=2)
            out, moments = torch.randn(n, generator=torch.Generator().manual_seed(3)), torch.empty(2 * n)
            assert kernel.update(r, out, codes, scales, 0.9, 0.999, 1e-6, weight_step, moments) == []
            results.append([*codes, *scales, out, moments])
        assert all(torch.equal(a, b) for a, b in zip(*results))
