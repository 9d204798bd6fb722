"""project_backward under DDP (2 gloo processes): equals one process with the same global batch, and DDP
all-reduces the r-sized proxies instead of the projected weights (counted by a comm hook)."""

import torch
import torch.distributed as dist

import gradproj
from distributed_utils import run_distributed
from problems import train
from test_project_backward import F64, galore, llama, lm_loss, max_rel, weights

STEPS = 7  # update_proj_gap 3: refreshes at t = 0, 3, 6


def rank_loss(model, i):
    """lm_loss's batch (two sequences of equal length), this rank's sequence: the mean of the ranks' losses
    is the one-process loss, so DDP's averaged gradient is the one-process gradient."""
    g = torch.Generator().manual_seed(i)
    x = torch.randint(0, 64, (2, 12), generator=g)[dist.get_rank()].unsqueeze(0)
    return model(input_ids=x, labels=x).loss


def counting_hook(counts, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    counts[-1] += buffer.numel() * buffer.element_size()
    return allreduce_hook(None, bucket)


def _train_counting(model, opt, handle):
    from torch.nn.parallel import DistributedDataParallel

    wrapped = DistributedDataParallel(model)
    counts = []
    wrapped.register_comm_hook(counts, counting_hook)
    full = []
    for step in range(STEPS):
        counts.append(0)
        before = handle.full_reduced_bytes if handle is not None else 0
        train(wrapped, opt, 1, rank_loss, micro=2, seed=2 * step)
        full.append((handle.full_reduced_bytes if handle is not None else 0) - before)
    return counts, full


def _body(rank, world):
    model = llama()
    opt = galore(model)
    handle = gradproj.project_backward(model, opt)
    assert handle.distributed
    counts, full = _train_counting(model, opt, handle)

    ref = llama()
    ref_opt = galore(ref)
    train(ref, ref_opt, STEPS, lm_loss, micro=2)
    # DDP averages two half-batch gradients where one process sums the whole batch: float64 rounding, which
    # the projected run's reassociation adds to (see test_project_backward.F64)
    assert max_rel(weights(model), weights(ref)) <= F64

    # bytes DDP all-reduced per step (two micro-batches: DDP reduces at each backward outside no_sync)
    proxies = sum(p.numel() * p.element_size() for p in handle.proxies)
    projected = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if hasattr(m, "weight_projected_grad"))
    everything = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "projected" not in n)
    rest = everything - projected
    assert counts == [2 * (rest + proxies)] * STEPS
    # the full gradients of refresh steps, averaged once per step by the handle
    assert full == [projected if t % 3 == 0 else 0 for t in range(STEPS)]

    normal_model = llama()
    normal_counts, _ = _train_counting(normal_model, galore(normal_model), None)
    assert normal_counts == [2 * everything] * STEPS


def test_ddp_equals_one_process_and_reduces_the_projections():
    run_distributed(_body)
