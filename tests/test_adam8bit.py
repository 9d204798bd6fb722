"""GaLoreAdamW8bit: 8-bit blockwise moments against bitsandbytes' own 8-bit Adam, state layout and bytes."""

import math
import sys

import pytest
import torch
from torch import nn

import gradproj
from problems import TinyNet, clone_params, matrix_problem, tiny_batch, tiny_loss, train
from reference_algorithms import ReferenceGaLore

bnb = pytest.importorskip("bitsandbytes")

# In all comparisons eps = 0: bitsandbytes adds eps·sqrt(1 - beta2^t) to sqrt(v), GaLore adds eps; with eps = 0
# both are lr·sqrt(1 - beta2^t)/(1 - beta1^t)·m/sqrt(v), so only rounding separates them.


def step_all(pairs, loss_fn, steps):
    for _ in range(steps):
        for opt, ps in pairs:
            train(ps, opt, 1, loss_fn)


def test_unprojected_group_is_bitsandbytes_adam8bit():
    params, loss_fn = matrix_problem([(96, 64), (40, 20)], seed=0)  # 6144 elements: 8-bit; 800 < 4096: fp32
    ref_params = clone_params(params)
    start = params[0].detach().clone()
    ours = gradproj.GaLoreAdamW8bit(params, lr=1e-2, eps=0.0)
    ref = bnb.optim.Adam8bit(ref_params, lr=1e-2, eps=0.0, min_8bit_size=4096)
    step_all([(ours, params), (ref, ref_params)], loss_fn, 20)
    moved = (ref_params[0] - start).abs().max()
    for a, b in zip(params, ref_params):
        assert (a - b).abs().max() < 1e-5 * moved
    big, small = ours.state[params[0]], ours.state[params[1]]
    assert torch.equal(big["exp_avg"], ref.state[ref_params[0]]["state1"])  # the same codes
    assert torch.equal(big["exp_avg_sq"], ref.state[ref_params[0]]["state2"])
    torch.testing.assert_close(big["exp_avg_absmax"], ref.state[ref_params[0]]["absmax1"])
    assert small["exp_avg"].dtype == torch.float32


class GaLoreOverBitsandbytes:
    """galore-torch's GaLoreAdamW8bit algorithm with bitsandbytes' own 8-bit Adam as the inner step: bnb steps a
    zero tensor shaped like R whose gradient is R; that step, scaled and projected back, is added to W."""

    def __init__(self, params, lr, rank, gap, scale, min_8bit_size):
        self.params, self.scale, self.lr, self.min_8bit_size = list(params), scale, lr, min_8bit_size
        self.galore = ReferenceGaLore(self.params, lr=lr, rank=rank, gap=gap, alpha=scale)  # basis and projections

    def zero_grad(self):
        self.galore.zero_grad()

    @torch.no_grad()
    def step(self):
        g = self.galore
        for W, st in zip(self.params, g.state):
            side = g.side(W)
            if st["t"] % g.gap == 0:
                st["P"] = g.basis(W.grad, side)
            R = g.project(W.grad, st["P"], side)
            if "Z" not in st:
                st["Z"] = nn.Parameter(torch.zeros_like(R))
                st["adam"] = bnb.optim.Adam8bit([st["Z"]], lr=self.lr, eps=0.0, min_8bit_size=self.min_8bit_size)
            st["Z"].zero_()
            st["Z"].grad = R
            st["adam"].step()
            W += self.scale * g.back(st["Z"], st["P"], side)
            st["t"] += 1


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_projected_matches_galore_over_bitsandbytes(proj_type):
    # std: R 96 x 8 (right) and 8 x 100 (left, a partial last block); reverse_std: 8 x 64 and 40 x 8 (fp32)
    params, loss_fn = matrix_problem([(96, 64), (40, 100)], seed=1)
    ref_params = clone_params(params)
    starts = [p.detach().clone() for p in params]
    group = {"rank": 8, "update_proj_gap": 5, "scale": 0.5, "proj_type": proj_type}
    # the reference: exact SVD, every matrix refreshed at t % T == 0
    ours = gradproj.GaLoreAdamW8bit([{"params": params, **group}], lr=1e-2, eps=0.0, min_8bit_size=256,
                                    projector="svd", refresh_stagger=False)
    ref = GaLoreOverBitsandbytes(ref_params, lr=1e-2, rank=8, gap=5, scale=0.5, min_8bit_size=256)
    ref.galore.proj_type = proj_type
    step_all([(ours, params), (ref, ref_params)], loss_fn, 12)  # refreshes at t = 0, 5, 10
    for a, b, s in zip(params, ref_params, starts):
        assert (a - b).abs().max() < 1e-4 * (b - s).abs().max()
    assert ours.state[params[0]]["exp_avg"].dtype == torch.uint8


def test_chunked_update_is_bit_identical_to_one_pass(monkeypatch):
    """Large tensors are updated in chunks of whole blocks (bounded fp32 transients); blocks are independent, so
    the result is the same bits as one pass (here 1000 x 3 values in chunks of 512: a partial last chunk)."""
    import gradproj.inner.adam8bit as adam8bit

    runs = []
    for chunk in (adam8bit.CHUNK_SIZE, 512):
        monkeypatch.setattr(adam8bit, "CHUNK_SIZE", chunk)
        params, loss_fn = matrix_problem([(1000, 3)], seed=4)
        opt = gradproj.GaLoreAdamW8bit(params, lr=1e-2, min_8bit_size=256)
        step_all([(opt, params)], loss_fn, 4)
        runs.append((params[0].detach(), opt.state[params[0]]))
    (w1, s1), (w2, s2) = runs
    assert torch.equal(w1, w2)
    assert all(torch.equal(s1[k], s2[k]) for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"))


def test_state_is_uint8_codes_plus_block_scales_and_bytes_are_analytic():
    model = nn.ModuleDict({"a": nn.Linear(64, 96, bias=True), "b": nn.Linear(200, 30, bias=False),
                           "emb": nn.Embedding(80, 64)})
    groups = [{"params": [model["a"].bias, model["emb"].weight]},
              {"params": [model["a"].weight, model["b"].weight], "rank": 24, "update_proj_gap": 10, "scale": 0.25}]
    opt = gradproj.GaLoreAdamW8bit(groups, lr=1e-3)
    x = torch.randn(5, 64)
    (model["a"](x).sum() + model["b"](torch.randn(5, 200)).sum() + model["emb"](torch.tensor([1, 2])).sum()).backward()
    opt.step()

    def quantized(numel):  # two uint8 moments + two fp32 scales per block of 256
        return {"moments": 2 * numel, "scales": 2 * 4 * math.ceil(numel / 256)}

    # a.weight 96x64 (right: R 96x24 = 2304 < 4096: fp32), b.weight 30x200 (left: R 24x200 = 4800: 8-bit),
    # emb 80x64 = 5120 unprojected: 8-bit, a.bias 96: fp32
    q_b, q_emb = quantized(24 * 200), quantized(80 * 64)
    expected = {
        "basis": 4 * (24 * 64 + 30 * 24),
        "moments": 2 * 4 * (96 * 24 + 96) + q_b["moments"] + q_emb["moments"],
        "scales": q_b["scales"] + q_emb["scales"],
    }
    got = gradproj.optimizer_state_bytes(opt)
    assert {k: got[k] for k in expected} == expected
    assert got["total"] == sum(expected.values())
    st = opt.state[model["b"].weight]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.uint8 and st["exp_avg"].shape == (24, 200)
    assert st["exp_avg_absmax"].dtype == torch.float32 and st["exp_avg_absmax"].shape == (math.ceil(4800 / 256),)
    assert opt.state[model["a"].weight]["exp_avg"].dtype == torch.float32
    # the same moments in fp32 (GaLoreAdamW) take 4 bytes per element: 8-bit cuts the quantized ones ~3.9x
    assert (q_b["moments"] + q_b["scales"]) * 3.9 < 2 * 4 * 24 * 200


def test_trajectory_stays_close_to_galore_adamw():
    """Training loss of the 8-bit moments follows the fp32 moments closely (weights differ more: Adam's
    per-coordinate normalisation turns v's quantization error into direction error on small coordinates)."""
    losses = {}
    for cls in (gradproj.GaLoreAdamW, gradproj.GaLoreAdamW8bit):
        model = TinyNet(dim=32, hidden=128)
        opt = cls(gradproj.param_groups(model, rank=8, update_proj_gap=10, scale=0.5), lr=1e-2, min_8bit_size=256) \
            if cls is gradproj.GaLoreAdamW8bit else cls(gradproj.param_groups(model, rank=8, update_proj_gap=10,
                                                                             scale=0.5), lr=1e-2)
        losses[cls] = train(model, opt, 40)
        if cls is gradproj.GaLoreAdamW8bit:
            assert opt.state[model.fc1.weight]["exp_avg"].dtype == torch.uint8
    ref, q = losses[gradproj.GaLoreAdamW], losses[gradproj.GaLoreAdamW8bit]
    assert ref[-1] < 0.5 * ref[0]
    assert max(abs(a - b) for a, b in zip(ref, q)) < 0.05 * ref[0]


def test_bf16_weights_and_reset_on_refresh():
    model = TinyNet().to(torch.bfloat16)
    opt = gradproj.GaLoreAdamW8bit(gradproj.param_groups(model, rank=4, update_proj_gap=2, scale=0.5), lr=1e-2,
                                   min_8bit_size=100, moments_on_refresh="reset")
    train(model, opt, 3)
    st = opt.state[model.fc1.weight]  # R 40 x 4 = 160 elements: 8-bit
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_absmax"].dtype == torch.float32
    assert st["inner_start"] == 2  # reset at the refresh of t = 2; the quantized state restarted with it
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())


def test_missing_bitsandbytes_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ImportError, match=r"pip install 'gradproj\[bnb\]'"):
        gradproj.GaLoreAdamW8bit([nn.Parameter(torch.randn(4, 4))])


@pytest.mark.gpu
def test_cuda_quantization_agrees_with_cpu():
    """bitsandbytes' CUDA and CPU blockwise quantizers store the same moments to within one code step.

    (Whole CPU-vs-CUDA trajectories are not compared: cuSOLVER and LAPACK may return singular vectors of
    opposite signs, and moments carried across a refresh then mean different things on the two devices,
    exactly as for the 32-bit optimizer.)"""
    from gradproj.inner.adam8bit import dequantize, dynamic_map, num_blocks, quantize_

    g = torch.Generator().manual_seed(0)
    for signed, x in ((True, torch.randn(64, 300, generator=g)), (False, torch.rand(64, 300, generator=g) ** 4)):
        out = {}
        for device in ("cpu", "cuda"):
            codes = torch.empty(x.shape, dtype=torch.uint8, device=device)
            absmax = torch.empty(num_blocks(x.numel()), dtype=torch.float32, device=device)
            quantize_(x.to(device), codes, absmax, signed)
            out[device] = (dequantize(codes, absmax, signed).cpu(), absmax.cpu())
        torch.testing.assert_close(out["cuda"][1], out["cpu"][1])  # the block scales are exact maxima
        step = dynamic_map(signed, torch.device("cpu")).diff().abs().max()
        scale = out["cpu"][1].repeat_interleave(256)[: x.numel()].reshape(x.shape)
        assert ((out["cuda"][0] - out["cpu"][0]).abs() <= step * scale + 1e-7).all()


@pytest.mark.gpu
def test_cuda_trajectory_stays_close_to_galore_adamw():
    """On CUDA, as on CPU: the 8-bit moments follow the fp32 moments' training loss closely."""
    losses = {}
    for cls in (gradproj.GaLoreAdamW, gradproj.GaLoreAdamW8bit):
        model = TinyNet(dim=32, hidden=128).cuda()
        kwargs = {"min_8bit_size": 256} if cls is gradproj.GaLoreAdamW8bit else {}
        opt = cls(gradproj.param_groups(model, rank=8, update_proj_gap=10, scale=0.5), lr=1e-2, **kwargs)
        losses[cls] = train(model, opt, 40, lambda m, i: tiny_loss(m, tuple(t.cuda() for t in tiny_batch(i))))
        if cls is gradproj.GaLoreAdamW8bit:
            assert opt.state[model.fc1.weight]["exp_avg"].dtype == torch.uint8
            assert opt.state[model.fc1.weight]["exp_avg"].is_cuda
    ref, q = losses[gradproj.GaLoreAdamW], losses[gradproj.GaLoreAdamW8bit]
    assert ref[-1] < 0.5 * ref[0]
    assert max(abs(a - b) for a, b in zip(ref, q)) < 0.05 * ref[0]


def test_distributed_checkpoint_state_dict_api_round_trips_the_8bit_state():
    """torch.distributed.checkpoint's get/set_optimizer_state_dict (FQN-keyed; what FSDP2 checkpoints go through)
    keeps uint8 codes and fp32 scales of a bf16 model and resumes bit-identically."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def make(model):
        groups = gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5)
        return gradproj.GaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=100)

    models = [TinyNet().to(torch.bfloat16), TinyNet().to(torch.bfloat16)]
    opt = make(models[0])
    train(models[0], opt, 4)
    sd = get_optimizer_state_dict(models[0], opt)
    assert sd["state"]["fc1.weight"]["exp_avg"].dtype == torch.uint8
    models[1].load_state_dict(models[0].state_dict())
    opt2 = make(models[1])
    set_optimizer_state_dict(models[1], opt2, sd)
    st = opt2.state[models[1].fc1.weight]
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_absmax"].dtype == torch.float32
    for s in range(3):
        for model, o in zip(models, (opt, opt2)):
            train(model, o, 1, seed=10 + s)
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
