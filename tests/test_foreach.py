"""The ``foreach`` option: regular GaLore steps of many matrices batched (gradproj/optimizers/multi_tensor.py).

The batched step must be the per-parameter step, only issued differently: same trajectory, same state
(keys, shapes, dtypes), checkpoints interchangeable, and everything it does not cover left to ``_update``.
On the CPU the per-matrix form runs the very ops of the per-parameter path in the same order, so it is held
to bit equality. The stacked form (small matrices: one ``bmm`` / ``baddbmm_`` per chunk) may block its GEMMs
differently from ``mm`` / ``addmm_``; it is held to a few float32 ulps of a weight (bfloat16: one ulp), far
below one step (lr · scale = 5e-3 here).
"""

from __future__ import annotations

import io

import pytest
import torch

import gradproj
from gradproj.optimizers.engine import Engine
from gradproj import kernels
from gradproj.optimizers import base as base_mod
from gradproj.optimizers import multi_tensor
from problems import clone_params, matrix_problem, train
from reference_algorithms import ReferenceGaLore

# 2 x tall (right projection), 2 x wide (left), a square one alone in its bucket, a Fira matrix, a DCT one
SHAPES = [(40, 24), (40, 24), (24, 40), (24, 40), (30, 30), (28, 20), (20, 28)]
GAP, STEPS = 3, 7  # refreshes at t = 0, 3, 6
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.bfloat16: dict(rtol=2**-8, atol=1e-6)}


def problem(dtype, seed=0):
    params, loss_fn = matrix_problem(SHAPES, seed=seed, dtype=dtype)
    bias = torch.nn.Parameter(torch.linspace(-1, 1, 24).to(dtype))
    return params + [bias], lambda ps, index=None: loss_fn(ps[:-1]) + ((ps[-1] - 0.3) ** 2).sum()


def make(params, foreach, impl="torch", **kw):
    mats = params[:-1]
    proj = {"rank": 6, "update_proj_gap": GAP, "scale": 0.5}
    groups = [
        {"params": mats[:5], **proj},
        {"params": [mats[5]], **proj, "residual": "fira"},
        {"params": [mats[6]], **proj, "projector": "dct"},
        {"params": [params[-1]]},
    ]
    # the expectations below (refresh steps at t % GAP == 0, the reference's exact SVD) assume these two
    kw = {"projector": "svd", "refresh_stagger": False, **kw}
    return gradproj.GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1, foreach=foreach, impl=impl, **kw)


def assert_same_state(a, b, exact):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for key, x in sa[k].items():
            y = sb[k][key]
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and x.shape == y.shape, key
                if exact:
                    assert torch.equal(x, y), key
            else:
                assert x == y, key


@pytest.fixture(params=["stacked", "per_matrix"])
def gemm_form(request, monkeypatch):
    if request.param == "per_matrix":
        monkeypatch.setattr(multi_tensor, "BATCHED_GEMM_MAX_NUMEL", 0)
    else:  # the CUDA form, on the CPU
        monkeypatch.setattr(multi_tensor, "BATCHED_GEMM_DEVICES", ("cuda", "cpu"))
    return request.param


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                               (torch.bfloat16, torch.float32)], ids=["f32", "bf16", "bf16_state_f32"])
def test_trajectory_matches_per_parameter_path(dtype, state_dtype, gemm_form):
    params, loss_fn = problem(dtype)
    p_ref = clone_params(params)
    ours, ref = make(params, True, state_dtype=state_dtype), make(p_ref, False, state_dtype=state_dtype)
    train(params, ours, STEPS, loss_fn)
    train(p_ref, ref, STEPS, loss_fn)
    for a, b, w0 in zip(params, p_ref, problem(dtype)[0]):
        assert not torch.equal(a, w0)
        if gemm_form == "per_matrix":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **TOL[dtype])
    assert_same_state(ours, ref, exact=gemm_form == "per_matrix")


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_matches_independent_reference(proj_type):
    """foreach=True against the plain GaLore of tests/reference_algorithms.py (both sides, refreshes)."""
    params, loss_fn = matrix_problem(SHAPES[:5], seed=3)
    p_ref = clone_params(params)
    ours = gradproj.GaLoreAdamW([{"params": params, "rank": 6, "update_proj_gap": GAP, "scale": 0.5,
                                  "proj_type": proj_type}], lr=1e-2, weight_decay=0.1, foreach=True,
                                projector="svd", refresh_stagger=False)  # the reference: exact SVD at t % T == 0
    ref = ReferenceGaLore(p_ref, lr=1e-2, rank=6, gap=GAP, alpha=0.5, proj_type=proj_type, wd=0.1)
    for _ in range(STEPS):
        train(params, ours, 1, loss_fn)
        train(p_ref, ref, 1, loss_fn)
    for a, b in zip(params, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=3e-5)  # tests/test_parity.py's float32 tolerance


@pytest.mark.skipif(not (kernels.triton_import_error() is None and kernels.interpreter_requested()),
                    reason="needs triton and TRITON_INTERPRET=1 (tests/conftest.py sets it)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_triton_impl_folds_the_decay_like_its_kernel(dtype):
    """impl='triton': the batched step takes the Triton apply_update's form (decay as the GEMM's beta)
    against the per-parameter Triton kernels (run under the interpreter); the moments use the reference's
    ops, which for float32 state is the kernel's arithmetic and for bf16 state rounds per op where the
    kernel rounds once (a few bf16 ulps of the weights after 4 steps: rtol 2^-8)."""
    params, loss_fn = problem(dtype)
    p_ref = clone_params(params)
    ours, ref = make(params, True, impl="triton"), make(p_ref, False, impl="triton")
    train(params, ours, 4, loss_fn)
    train(p_ref, ref, 4, loss_fn)
    # bf16: the moments round per op here and once in the kernel; after 4 steps that moves a few weights by
    # up to 2^-9 (a quarter of a bf16 ulp at 1.0); a wrong decay or eps would move every weight by far more
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=2**-8)
    for a, b in zip(params, p_ref):
        torch.testing.assert_close(a, b, **tol)
        if dtype != torch.float32:
            assert float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm()) < 2e-3


def counting_update(monkeypatch):
    calls: list[int] = []
    original = Engine.update

    def wrapper(self, p, *args, **kwargs):
        calls.append(id(p))
        return original(self, p, *args, **kwargs)

    monkeypatch.setattr(Engine, "update", wrapper)
    return calls


def test_batched_path_is_taken_for_eligible_parameters_only(monkeypatch):
    calls = counting_update(monkeypatch)
    params, loss_fn = problem(torch.float32)
    opt = make(params, True)
    # the bias (unprojected Adam) is stepped by torch's fused AdamW kernel (multi_tensor.collect_dense)
    eligible, others = {id(p) for p in params[:5]}, {id(p) for p in params[5:-1]}
    train(params, opt, 1, loss_fn)  # t = 0: every basis is computed by the per-parameter path
    assert sorted(calls) == sorted(id(p) for p in params[:-1])
    for t in (1, 2, 3):
        calls.clear()
        train(params, opt, 1, loss_fn)
        if t % GAP == 0:  # a refresh step: all of them through _update, then they rejoin
            assert sorted(calls) == sorted(id(p) for p in params[:-1])
        else:
            assert set(calls) == others and len(calls) == len(others) and not eligible & set(calls)
    assert all(opt.state[p]["step"] == 4 for p in params)


def test_false_means_never(monkeypatch):
    calls = counting_update(monkeypatch)
    params, loss_fn = problem(torch.float32)
    opt = make(params, False)
    train(params, opt, 2, loss_fn)  # step 1 is a regular step, yet every matrix runs _update
    assert len(calls) == 2 * (len(params) - 1)  # the bias: torch's fused AdamW kernel (collect_dense)
    ran = []
    monkeypatch.setattr(multi_tensor, "_step_chunk", lambda *a: ran.append(a))
    params, loss_fn = problem(torch.float32)
    train(params, make(params, False), 3, loss_fn)
    assert not ran


def test_auto_on_the_cpu_times_both_paths_then_keeps_the_faster(monkeypatch):
    """foreach=None on the CPU: a bucket's first regular steps alternate between the batched and the
    per-parameter path (timed), then the faster one is kept; the trajectory is foreach=False's bit for bit."""
    monkeypatch.setattr(multi_tensor, "_CPU_CHOICE", {})
    monkeypatch.setattr(multi_tensor, "_CPU_TRIALS", {})
    monkeypatch.setattr(multi_tensor, "BATCHED_GEMM_MAX_NUMEL", 0)
    calls = counting_update(monkeypatch)
    params, loss_fn = problem(torch.float32)
    p_ref = clone_params(params)
    mats = params[:4]  # the two 2-matrix buckets of group 0 (the square one is a bucket of its own)
    opt, ref = make(params, None), make(p_ref, False)
    for g in opt.param_groups + ref.param_groups:
        if "rank" in g:
            g["update_proj_gap"] = 100  # no refresh among the timed steps
    train(params, opt, 1, loss_fn)  # the first basis: the per-parameter path
    train(p_ref, ref, 1, loss_fn)
    forms = []
    for _ in range(2 * multi_tensor.CPU_TRIALS):
        calls.clear()
        train(params, opt, 1, loss_fn)
        train(p_ref, ref, 1, loss_fn)
        forms.append(not ({id(p) for p in mats} & set(calls)))
    assert forms == [True, False] * multi_tensor.CPU_TRIALS  # batched first, then the other way, alternating
    assert len(multi_tensor._CPU_CHOICE) == 3  # one choice per bucket: (40, 24) x2, (24, 40) x2, (30, 30)
    assert all(len(t[True]) == len(t[False]) == multi_tensor.CPU_TRIALS for t in multi_tensor._CPU_TRIALS.values())
    for key in multi_tensor._CPU_CHOICE:
        multi_tensor._CPU_CHOICE[key] = False
    calls.clear()
    train(params, opt, 1, loss_fn)
    train(p_ref, ref, 1, loss_fn)
    assert {id(p) for p in mats} <= set(calls)
    for key in multi_tensor._CPU_CHOICE:
        multi_tensor._CPU_CHOICE[key] = True
    calls.clear()
    train(params, opt, 1, loss_fn)
    train(p_ref, ref, 1, loss_fn)
    assert not {id(p) for p in mats} & set(calls)
    for a, b in zip(params, p_ref):
        assert torch.equal(a, b)


def test_chunks_split_and_give_the_same_result(monkeypatch):
    monkeypatch.setattr(multi_tensor, "BATCHED_GEMM_DEVICES", ("cuda", "cpu"))
    params, loss_fn = problem(torch.float32)
    p_ref = clone_params(params)
    ref = make(p_ref, True)
    train(p_ref, ref, STEPS, loss_fn)
    sizes = []
    chunk = multi_tensor._step_chunk
    monkeypatch.setattr(multi_tensor, "_step_chunk",
                        lambda opt, b, items: (sizes.append(len(items)), chunk(opt, b, items)))
    monkeypatch.setattr(multi_tensor, "CHUNK_BYTES", 1)  # one matrix per chunk
    opt = make(params, True)
    train(params, opt, STEPS, loss_fn)
    assert sizes and set(sizes) == {1}
    for a, b in zip(params, p_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("first", [True, False], ids=["foreach_then_per_param", "per_param_then_foreach"])
def test_checkpoint_resumes_on_the_other_path(first):
    """A state dict saved by one path loads (weights_only) into the other, which continues bit for bit in
    the per-matrix form: the state layout is the same."""
    params, loss_fn = problem(torch.float32)
    p_ref = clone_params(params)
    ref = make(p_ref, False)
    train(p_ref, ref, 8, loss_fn)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multi_tensor, "BATCHED_GEMM_MAX_NUMEL", 0)
        opt = make(params, first)
        train(params, opt, 4, loss_fn)  # t = 4 next: a regular step on both sides of the switch
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
        for g in sd["param_groups"]:
            assert g["foreach"] is first
            g["foreach"] = not first  # the other path from here on (the saved option would win otherwise)
        resumed = make(params, not first)
        resumed.load_state_dict(sd)
        assert all(g["foreach"] is (not first) for g in resumed.param_groups)
        train(params, resumed, 4, loss_fn)
    for a, b in zip(params, p_ref):
        assert torch.equal(a, b)
    assert_same_state(resumed, ref, exact=True)


def test_bad_input_elsewhere_raises_before_the_batched_step_changes_anything():
    params, loss_fn = problem(torch.float32)
    opt = make(params, True)
    train(params, opt, 1, loss_fn)
    opt.zero_grad()
    loss_fn(params).backward()  # t = 1: the first five matrices are batched this step
    params[-1].grad = params[-1].grad.to_sparse()
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params[:5]]
    with pytest.raises(ValueError, match="sparse gradient"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) and opt.state[p]["step"] == 1 for p, m in zip(params, moments))


@pytest.mark.parametrize("bad", ["yes", 1, 0, "auto"])
def test_invalid_foreach_raises(bad):
    params, _ = problem(torch.float32)
    with pytest.raises(ValueError, match=r"param group 0: foreach = .*use None .*True .*False"):
        gradproj.GaLoreAdamW(params, foreach=bad)
    opt = gradproj.GaLoreAdamW(params[:1])
    with pytest.raises(ValueError, match="param group 1: foreach"):
        opt.add_param_group({"params": params[1:2], "foreach": bad})
    assert len(opt.param_groups) == 1


def test_foreach_is_a_group_key_that_round_trips():
    params, loss_fn = problem(torch.float32)
    opt = gradproj.GaLoreAdamW([{"params": params[:2], "rank": 6, "update_proj_gap": GAP, "scale": 0.5},
                                {"params": params[2:], "foreach": False}], foreach=True)
    assert [g["foreach"] for g in opt.param_groups] == [True, False]
    assert [g["foreach"] for g in opt.state_dict()["param_groups"]] == [True, False]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_gpu_trajectory_matches_per_parameter_path(impl):
    """CUDA, bf16 weights with fp32 state: foreach (the default there) against foreach=False."""
    params, loss_fn = problem(torch.bfloat16)
    params = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    p_ref = clone_params(params)
    ours = make(params, None, impl=impl, state_dtype=torch.float32)
    ref = make(p_ref, False, impl=impl, state_dtype=torch.float32)
    train(params, ours, STEPS, loss_fn_cuda(loss_fn))
    train(p_ref, ref, STEPS, loss_fn_cuda(loss_fn))
    for a, b in zip(params, p_ref):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-5)  # GEMM blocking and one bf16 rounding apart


def loss_fn_cuda(loss_fn):
    return lambda ps, index=None: loss_fn([p.cpu() for p in ps])
