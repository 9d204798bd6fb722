"""The vectorized CPU quantizer of GaLoreAdamW8bit against bitsandbytes' own quantize_blockwise, bit for bit."""

import math

import pytest
import torch
from problems import matrix_problem, train

import gradproj
from gradproj.inner import adam8bit

bnb = pytest.importorskip("bitsandbytes")
F = adam8bit.bnb_functional()
CPU = torch.device("cpu")


def lut():
    q = adam8bit.lut_quantizer(CPU)
    assert q is not None, "the vectorized quantizer must reproduce the installed bitsandbytes"
    return q


def bnb_quantize(x, signed):
    codes, state = F.quantize_blockwise(x, code=adam8bit.dynamic_map(signed, x.device), blocksize=256)
    return codes, state.absmax


def assert_same_as_bnb(x, signed):
    codes, absmax = adam8bit.quantize_lut(lut(), x, signed)
    ref_codes, ref_absmax = bnb_quantize(x, signed)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes), f"{(codes != ref_codes).sum()} codes differ"


@pytest.mark.parametrize("signed", [True, False])
def test_codes_and_scales_equal_bitsandbytes_on_random_moments(signed):
    """Moments of many magnitudes (Adam's v spans decades within a block), whole and partial blocks, blocks
    with zeros and all-zero blocks (an embedding's untouched rows), against bitsandbytes on the same input."""
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 3.7e-3, 2.5e-9, 6.1e4):
        for n in (256 * 40, 256 * 40 - 77, 100):
            x = torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g)) * scale
            if not signed:
                x = x * x
            x[::7] = 0.0
            x[256:512] = 0.0  # an all-zero block where there is one
            assert_same_as_bnb(x, signed)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.7, 13.0, 1e-20, 3e30])
def test_codes_equal_bitsandbytes_at_every_bin_edge(signed, scale):
    """Where neighbouring bins of bitsandbytes' table give different codes, a value one rounding away lands in
    the other code: every such edge (±64 float steps) and ±1 with its neighbours, at block maxima where
    the scaling 1/absmax rounds (not only 1, the maximum the check at first use also covers)."""
    table = lut().tables[0 if signed else 1]
    t = adam8bit.boundary_values(table, signed)
    assert t.numel() > 200 * 64  # ~255 edges x 129 values per map
    assert_same_as_bnb(adam8bit._blocks_with_max(t, scale), signed)


def test_values_a_rounding_beyond_the_block_maximum_take_the_end_codes():
    """The maximum itself scales to fl(absmax · fl(1/absmax)), which is not always 1: bitsandbytes clamps to
    [-1, 1] before binning, the vectorized quantizer does not, and both must give codes 255 and 0 for
    ±absmax."""
    q = lut()
    off = 0
    for m in [*torch.linspace(0.5, 2.0, 2001).tolist(), 1e-30, 3e30]:
        x = torch.tensor([m, -m, m * 0.5] + [0.0] * 253)
        off += bool(x[0] * torch.reciprocal(x[0]) != 1.0)
        assert_same_as_bnb(x, signed=True)
        codes, _ = adam8bit.quantize_lut(q, x, signed=True)
        assert codes[0] == 255 and codes[1] == 0
    assert off > 0  # the case occurred


@pytest.mark.parametrize("zero_block", [False, True])
def test_non_finite_or_subnormal_block_maxima_are_left_to_bitsandbytes(zero_block):
    """Also beside an all-zero block (the smallest block maximum is then 0, not the subnormal one)."""
    q = lut()
    for bad in (float("nan"), float("inf"), 1e-39):
        ws = adam8bit.Workspace(768, CPU)
        ws.W.fill_(1.0)
        if zero_block:
            ws.W[0, 512:] = 0.0
        ws.W[0, 300] = bad
        if bad == 1e-39:
            ws.W[0, 256:512] = bad  # the block's maximum itself is subnormal: 1/absmax overflows
        codes = (torch.full((768,), 7, dtype=torch.uint8), torch.full((768,), 7, dtype=torch.uint8))
        absmax = (torch.full((3,), 5.0), torch.full((3,), 5.0))
        assert not q.quantize(ws, codes, absmax)
        assert all((c == 7).all() for c in codes) and all((a == 5.0).all() for a in absmax)  # nothing changed


def test_a_quantizer_that_rounds_otherwise_is_not_used(monkeypatch):
    """A bitsandbytes whose CPU quantizer rounds to the nearest code (as before 0.50) fails the check at first
    use: the optimizer then calls bitsandbytes' quantizer itself."""

    def nearest(A, code=None, absmax=None, out=None, blocksize=256, nested=False):
        n = A.numel()
        blocks = torch.nn.functional.pad(A.reshape(-1), (0, (-n) % blocksize)).view(-1, blocksize)
        scale = blocks.abs().amax(1)
        t = (blocks / scale.clamp_min(1e-38).unsqueeze(1)).reshape(-1)[:n]
        codes = (t.unsqueeze(1) - code).abs().argmin(1).to(torch.uint8).view(A.shape)
        return codes, type("State", (), {"absmax": scale})()

    monkeypatch.setattr(F, "quantize_blockwise", nearest)
    monkeypatch.setattr(adam8bit, "_LUT", {})
    assert adam8bit.lut_quantizer(CPU) is None
    calls = []
    monkeypatch.setattr(adam8bit, "quantize_", lambda *a, **k: calls.append(1))
    params, loss_fn = matrix_problem([(64, 80)], seed=2)
    train(params, gradproj.GaLoreAdamW8bit(params, lr=1e-2), 1, loss_fn)
    assert len(calls) == 2  # m and v of the one 8-bit tensor


def run(fast, *, steps=7, kernel="fused", dtype=torch.float32, chunk=None, monkeypatch=None):
    """A projected and an unprojected group (partial last blocks, zero-gradient rows, a refresh at t = 3)."""
    if chunk is not None:
        monkeypatch.setattr(adam8bit, "CHUNK_SIZE", chunk)
    saved = dict(adam8bit._LUT)
    if not fast:
        adam8bit._LUT[str(CPU)] = None
    try:
        g = torch.Generator().manual_seed(5)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in [(300, 90), (40, 700), (77, 129)]]
        emb = torch.nn.Parameter(torch.randn(500, 24, generator=g).to(dtype))
        odd = torch.nn.Parameter(torch.randn(1001, generator=g).to(dtype))  # an odd count: no code pairs
        groups = [
            {"params": ps, "rank": 16, "update_proj_gap": 3, "scale": 0.25, "adam_kernel": kernel},
            {"params": [emb, odd], "adam_kernel": kernel},
        ]
        opt = gradproj.GaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=256)
        for i in range(steps):
            for p in [*ps, odd]:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            grad = torch.randn(emb.shape, generator=g)
            grad[: 200 + 20 * i] = 0.0  # rows never touched: all-zero moment blocks
            emb.grad = grad.to(dtype)
            opt.step()
        return [*ps, emb, odd], opt
    finally:
        adam8bit._LUT.clear()
        adam8bit._LUT.update(saved)


def assert_same_run(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        sa, sb = oa.state[x], ob.state[y]
        for k in adam8bit.Adam8bit.state_keys:
            assert torch.equal(sa[k], sb[k]), k
    assert oa.state[pa[0]]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_is_bit_identical_to_the_bitsandbytes_quantizer(dtype):
    assert_same_run(run(True, dtype=dtype), run(False, dtype=dtype))


def test_chunked_fast_step_is_bit_identical_to_one_pass(monkeypatch):
    """Chunks of 512 values (whole blocks; the tensors here have partial last chunks and blocks)."""
    assert_same_run(run(True, chunk=512, monkeypatch=monkeypatch), run(True))


def test_reference_kernel_calls_bitsandbytes_and_matches(monkeypatch):
    """adam_kernel="reference" keeps bitsandbytes' quantizer (and galore-torch's Adam ops)."""
    calls = []
    real = adam8bit.quantize_
    monkeypatch.setattr(adam8bit, "quantize_", lambda *a, **k: (calls.append(1), real(*a, **k)))
    ref = run(True, kernel="reference", steps=3)
    assert len(calls) == 2 * 3 * 5  # m and v, 3 steps, 5 tensors of >= 256 elements
    calls.clear()
    fast = run(True, steps=3)
    assert not calls
    # the Adam ops differ (fused kernel against galore-torch's ops: a few roundings of ψ); the quantizer does
    # not: the codes agree but where a rounding of m or v moved a value across a code boundary
    for x, y in zip(fast[0], ref[0]):
        same = (fast[1].state[x]["exp_avg"] == ref[1].state[y]["exp_avg"]).float().mean()
        assert same > 0.99


@pytest.mark.parametrize("first, then", [(True, False), (False, True)])
def test_state_saved_by_one_quantizer_resumes_bit_exactly_under_the_other(first, then, monkeypatch):
    """The same stored tensors (uint8 codes shaped like R, fp32 scales per 256): a checkpoint written with one
    quantizer continues under the other exactly as an uninterrupted run."""
    saved = dict(adam8bit._LUT)

    def use(fast):
        adam8bit._LUT.clear()
        adam8bit._LUT.update(saved)
        if not fast:
            adam8bit._LUT[str(CPU)] = None

    def make(params):
        groups = [{"params": params, "rank": 8, "update_proj_gap": 4, "scale": 0.25}]
        return gradproj.GaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=256)

    try:
        params, loss_fn = matrix_problem([(96, 300), (200, 40)], seed=3)
        straight = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = make(params)
        use(first)
        train(params, opt, 3, loss_fn)
        st = opt.state[params[0]]
        assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg"].shape == (8, 300)
        assert st["exp_avg_absmax"].shape == (math.ceil(8 * 300 / 256),)
        sd = opt.state_dict()
        resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt2 = make(resumed)
        opt2.load_state_dict(sd)
        use(then)
        train(resumed, opt2, 3, loss_fn)
        use(True)
        train(straight, make(straight), 6, loss_fn)
        assert all(torch.equal(a, b) for a, b in zip(resumed, straight))
    finally:
        adam8bit._LUT.clear()
        adam8bit._LUT.update(saved)
