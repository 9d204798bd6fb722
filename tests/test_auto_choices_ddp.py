"""Choices made by timing agree across the ranks of a distributed run: rank 0's measurement decides.

Data-parallel replicas see the same averaged gradient; if one rank projected in bfloat16 and another in float32
(``proj_dtype="auto"``), or one used the other left-projection layout, their weights would round differently
and drift apart. Each rank here is scripted to measure the opposite outcome; both must end with rank 0's choice
and bit-identical weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import gradproj
from distributed_utils import run_distributed
from gradproj.projectors import base
from gradproj.projectors.base import AUTO_KEY, agree_across_ranks


def _scripted_timer(rank):
    # rank 0: bfloat16 twice as fast (chooses it); rank 1: bfloat16 slower (would keep float32)
    seconds = {"float32": 2e-3, "bfloat16": 1e-3 if rank == 0 else 3e-3}

    def timer(label, run, device, repeats=1):
        run()
        return seconds[label]

    return timer


def _body(rank, world):
    assert agree_across_ranks(rank + 5, torch.device("cpu")) == 5  # every rank gets rank 0's value
    base._AUTO_DECISIONS.clear()
    base._BF16_INPUTS["cpu"] = False  # the scripted timings cover float32 and bfloat16 only
    base.measure_seconds = _scripted_timer(rank)  # a forked child: the patch dies with it
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(48, 80, generator=g) * 0.02)  # the same start on both ranks
    groups = [{"params": [W], "rank": 8, "update_proj_gap": 2, "scale": 0.25, "proj_type": "left"}]
    opt = gradproj.GaLoreAdamW(groups, lr=1e-2)
    for i in range(4):
        W.grad = torch.randn(48, 80, generator=torch.Generator().manual_seed(100 + i))  # as if all-reduced
        opt.step()
    assert opt.state[W][AUTO_KEY] == 1  # rank 0's measurement, on rank 1 too
    weights = [torch.empty_like(W.detach()) for _ in range(world)]
    dist.all_gather(weights, W.detach())
    assert torch.equal(weights[0], weights[1])


def test_ranks_take_rank_zeros_timed_choices():
    run_distributed(_body)
