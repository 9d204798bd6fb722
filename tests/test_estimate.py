"""The analytic per-GPU memory of gradproj.distributed.estimate against counts made independently."""

import pytest
import torch

import gradproj
from gradproj.distributed.estimate import llama_tensors, per_gpu_memory, sharded_communication
from problems import TinyNet, tiny_batch, tiny_loss


def tiny_tensors(model, groups):
    projected = {id(p) for g in groups if "rank" in g for p in g["params"]}
    return [(tuple(p.shape), id(p) in projected) for p in model.parameters()]


@pytest.mark.parametrize("cls,name", [(gradproj.GaLoreAdamW, "galore"), (gradproj.FiraAdamW, "fira"),
                                      (torch.optim.AdamW, "adamw")])
def test_one_gpu_estimate_equals_measured_state(cls, name):
    model = TinyNet()
    groups = gradproj.param_groups(model, rank=4, update_proj_gap=3, scale=0.5)
    opt = cls(groups if name != "adamw" else model.parameters(), lr=1e-2)
    tiny_loss(model, tiny_batch(0)).backward()
    opt.step()
    est = per_gpu_memory(tiny_tensors(model, groups), name, rank=4, weight_bytes=4, grad_bytes=4, state_bytes=4)
    measured = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                   if torch.is_tensor(v) and k != "step")  # torch's AdamW keeps a tensor step count
    assert est["optimizer_states"] == measured
    assert est["weights"] == est["gradients"] == 4 * sum(p.numel() for p in model.parameters())


def test_llama_7b_counts():
    tensors = llama_tensors("llama_7b")
    n = sum(torch.Size(s).numel() for s, _ in tensors)
    assert n == 6_738_415_616  # LLaMA-7B (vocabulary 32000, untied head)
    adamw = per_gpu_memory(tensors, "adamw", "ddp")
    assert adamw["weights"] == adamw["gradients"] == 2 * n and adamw["optimizer_states"] == 4 * n
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


def test_communication_counts():
    comm = sharded_communication([((40, 16), True), ((16, 40), True), ((16,), False)], rank=4, grad_bytes=4)
    assert comm["per_refresh"] == 16 * 16 * 4 + 16 * 40 * 4  # Gram of the right one, gather of the left one
    assert comm["per_step"] == 2 * 4 * 40 * 4  # reduce-scatter of R and all-gather of ψ of the left one
    assert comm["fsdp_per_step"] == 3 * 4 * (40 * 16 * 2 + 16)
