"""The analytic per-GPU memory of gradproj.distributed.estimate against counts made independently, and
against the single-GPU estimator it is a layer over."""

import pytest
import torch

import gradproj
from gradproj.distributed.estimate import llama_tensors, per_gpu_memory, sharded_communication
from gradproj.memory_estimate import estimate_memory
from problems import TinyNet, train


def tiny_tensors(model, groups):
    projected = {id(p) for g in groups if "rank" in g for p in g["params"]}
    return [(tuple(p.shape), id(p) in projected) for p in model.parameters()]


@pytest.mark.parametrize("cls,name", [(gradproj.GaLoreAdamW, "galore"), (gradproj.FiraAdamW, "fira"),
                                      (torch.optim.AdamW, "adamw")])
def test_one_gpu_estimate_equals_measured_state(cls, name):
    model = TinyNet()
    groups = gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5)
    opt = cls(groups if name != "adamw" else model.parameters(), lr=1e-2)
    train(model, opt, 1)
    est = per_gpu_memory(tiny_tensors(model, groups), name, rank=4, weight_bytes=4, grad_bytes=4, state_bytes=4)
    measured = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert est["optimizer_states"] == measured == gradproj.optimizer_state_bytes(opt)["total"]
    assert est["weights"] == est["gradients"] == 4 * sum(p.numel() for p in model.parameters())


def test_llama_7b_counts():
    tensors = llama_tensors("llama_7b")
    n = sum(torch.Size(s).numel() for s, _ in tensors)
    assert n == 6_738_415_616  # LLaMA-7B (vocabulary 32000, untied head)
    adamw = per_gpu_memory(tensors, "adamw", "ddp")
    # two bf16 moments per element, and torch's float32 `step` tensor per parameter
    assert adamw["weights"] == adamw["gradients"] == 2 * n and adamw["optimizer_states"] == 4 * n + 4 * len(tensors)
    # FSDP2 on 8 GPUs: GPU 0 holds ceil(m / 8) rows of every tensor
    fsdp = per_gpu_memory(tensors, "adamw", "fsdp", 8)
    assert fsdp["weights"] == 2 * sum(-(-s[0] // 8) * torch.Size(s[1:]).numel() for s, _ in tensors)
    # GaLore rank 1024: per block, q k v o and gate / up are right-projected (basis r x n replicated,
    # moments m x r split by rows), down is left-projected (basis m x r split by rows, moments r x n by columns)
    g = per_gpu_memory(tensors, "galore", "fsdp", 8, rank=1024)
    h, i, r = 4096, 11008, 1024
    block = 2 * (2 * (4 * (h // 8) * r + 2 * (i // 8) * r) + 2 * r * (i // 8)) + 2 * (6 * r * h + (h // 8) * r)
    other = 2 * 2 * (2 * 32000 // 8 * h) + 2 * 2 * (h // 8) * 65  # embeddings, head; 65 norms of h
    assert g["optimizer_states"] == 32 * block + other
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        per_gpu_memory(tensors, "sgd")


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adafactor", "galore_adamw", "fira_adamw", "galore_adamw8bit",
                                  "galore_adafactor", "galore", "galore_8bit", "fira"])
def test_one_gpu_is_the_single_gpu_estimate(name):
    tensors = llama_tensors("llama_60m")
    for wb, dtype in ((2, "bfloat16"), (4, "float32")):
        gpu = per_gpu_memory(tensors, name, rank=128, weight_bytes=wb, grad_bytes=wb, state_bytes=wb)
        est = estimate_memory("llama_60m", name, rank=128, dtype=dtype, state_dtype=dtype)
        assert (gpu["weights"], gpu["gradients"], gpu["optimizer_states"]) == (est.weights, est.gradients,
                                                                               est.optimizer_states)
        # FSDP on one GPU holds everything, as DDP does
        assert per_gpu_memory(tensors, name, "fsdp", 1, rank=128, weight_bytes=wb, grad_bytes=wb,
                              state_bytes=wb) == gpu


def test_galore_8bit_is_an_alias_with_blockwise_moments():
    # one uint8 per moment element plus one float32 scale per block of 256; fp32 moments under 4096 elements
    big, small = ((4096, 1024), True), ((64,), False)
    g = per_gpu_memory([big, small], "galore_8bit", rank=256, weight_bytes=2, state_bytes=2)
    r_elems = 4096 * 256  # right projection: R is 4096 x 256
    assert g["optimizer_states"] == 2 * (r_elems + 4 * (r_elems // 256)) + 2 * 256 * 1024 + 2 * 4 * 64
    assert g == per_gpu_memory([big, small], "galore_adamw8bit", rank=256, weight_bytes=2, state_bytes=2)


def test_communication_counts():
    comm = sharded_communication([((40, 16), True), ((16, 40), True), ((16,), False)], rank=4, grad_bytes=4)
    assert comm["per_refresh"] == 16 * 16 * 4 + 16 * 40 * 4  # Gram of the right one, gather of the left one
    assert comm["per_step"] == 2 * 4 * 40 * 4  # reduce-scatter of R and all-gather of ψ of the left one
    assert comm["fsdp_per_step"] == 3 * 4 * (40 * 16 * 2 + 16)
