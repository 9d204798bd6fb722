"""DDP: every row of the generic optimizer table (each optimizer and each basis), on 2 ranks, equals one
process, and the replicated state agrees bit for bit on every rank although the ranks' global RNGs differ
(a basis drawing from the process RNG would fail here)."""

import torch
import torch.distributed as dist

import gradproj
from distributed_utils import rank_share, run_distributed
from optim_table import OPTIMIZERS
from problems import TinyNet, tiny_loss, train

STEPS = 7  # the table's update_proj_gap is 3: refreshes at t = 0, 3, 6
TOL = dict(rtol=1e-4, atol=2e-5)  # float32; two half-batch means averaged vs one whole-batch mean


def ddp(model):
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(1000 + dist.get_rank())  # what a per-rank seed does to the process RNG under torchrun
    return DistributedDataParallel(model)


def _body(rank, world):
    for spec in OPTIMIZERS:
        if spec.sampler is not None:
            # DDP fixes the set of synchronised parameters when it wraps the model, and a layer sampler
            # changes requires_grad afterwards: not a supported combination (docs/owlore.md)
            continue
        model = TinyNet()
        wrapped = ddp(model)
        opt = spec.make(model)
        train(wrapped, opt, STEPS, rank_share(tiny_loss))
        ref = TinyNet()
        ref_opt = spec.make(ref)
        train(ref, ref_opt, STEPS)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **TOL, msg=lambda m: f"{spec.id} {name}: {m}")
        assert gradproj.distributed.replicated_state_mismatches(opt) == [], spec.id
        if spec.id == "galore_adamw":
            adam_model, adam_opt = model, opt

    # and the check does catch state that differs between ranks
    if rank == 1:
        adam_opt.state[adam_model.fc1.weight]["exp_avg"].add_(1e-6)
    mismatches = gradproj.distributed.replicated_state_mismatches(adam_opt)
    assert len(mismatches) == 1 and "(40, 16)): exp_avg" in mismatches[0], mismatches


def test_ddp_matches_one_process_and_keeps_ranks_in_sync():
    run_distributed(_body)
