"""``LayerSampler(keep_inactive_state=True)``: a deactivated block keeps its optimizer state (moments, basis,
step count) for its return, as the released LISA / OwLore code does; memory counts it; resume is exact."""


import pytest
import torch

import gradproj
from problems import train
from reference_algorithms import ReferenceGaLore
from test_sampling import (
    LAYERS, checkpoint_then_continue, continues_like, galore_groups, llama_loss, three_blocks, tiny_llama,
)


def clone_state(state):
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k] for k, v in a.items()
    )


def test_returning_block_resumes_its_state_like_a_reference_that_keeps_it():
    """Blocks step like one plain GaLore reference per block, created at the block's first draw and never
    dropped, stepped only while the block is active: its moments, basis and step count (hence bias correction
    and the refresh every T of the block's own steps) carry over a frozen interval. While a block is frozen,
    its state does not change by a bit."""
    blocks, ref_blocks, loss = three_blocks()
    sampler = gradproj.LayerSampler(blocks, n_active=1, interval=3, seed=2, keep_inactive_state=True)
    # the reference: exact SVD, every matrix refreshed at t % T == 0
    opt = gradproj.GaLoreAdamW([{"params": blocks.parameters(), "rank": 3, "update_proj_gap": 2, "scale": 0.5}],
                               lr=2e-2, sampler=sampler, projector="svd", refresh_stagger=False)
    refs, frozen_state, history = {}, {}, []
    resumed = 0
    for step in range(30):
        active = sampler.active
        history.append(active[0])
        for i in active:
            refs.setdefault(i, ReferenceGaLore([ref_blocks[i].weight], lr=2e-2, rank=3, gap=2, alpha=0.5))
            if i in frozen_state:  # back from a frozen interval: exactly the state it left with
                assert same_state(opt.state[blocks[i].weight], frozen_state.pop(i)), (step, i)
                resumed += 1
        for mods in (blocks, ref_blocks):
            for mod in mods:
                mod.weight.grad = None
        loss(blocks).backward()
        opt.step()
        loss(ref_blocks, active).backward()
        for i in active:
            refs[i].step()
        for i in active:
            if i not in sampler.active:  # deactivated by this step: remember what it holds
                frozen_state[i] = clone_state(opt.state[blocks[i].weight])
        for a, b in zip(blocks, ref_blocks):
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-10, atol=1e-12)
    assert resumed >= 2, history  # blocks left and came back
    # a returning block's step count went on from where it stopped: the sum over blocks is the steps taken
    assert sum(opt.state[b.weight]["step"] for b in blocks if b.weight in opt.state) == 30


def test_memory_counts_the_state_of_every_block_that_has_been_active():
    """Kept: the state bytes are the analytic state of every block visited so far plus the always-trained
    part; freed (same draws): one block's plus the always-trained part."""
    models = [tiny_llama(), tiny_llama()]
    opts = [gradproj.GaLoreAdamW(galore_groups(m), lr=1e-2,
                                 sampler=gradproj.LayerSampler(m.model.layers, n_active=1, interval=2, seed=0,
                                                               keep_inactive_state=keep))
            for m, keep in zip(models, (True, False))]

    def galore_bytes(m, n, r=4):  # basis + two moments, fp32, on the shorter side ("std")
        return 4 * ((r * n + 2 * m * r) if m >= n else (m * r + 2 * r * n))

    block = models[0].model.layers[0]
    one_block = sum(galore_bytes(*lin.weight.shape) for lin in gradproj.sampling.block_linears(block))
    one_block += sum(2 * 4 * p.numel() for p in block.parameters() if p.dim() == 1)
    always = sum(2 * 4 * p.numel() for n, p in models[0].named_parameters() if ".layers." not in n)
    visited = set(opts[0].sampler.active)
    for s in range(16):
        for model, opt in zip(models, opts):
            train(model, opt, 1, llama_loss, seed=s)
        assert opts[0].sampler.active == opts[1].sampler.active
        kept, freed = (gradproj.optimizer_state_bytes(o)["total"] for o in opts)
        # the blocks that have stepped: every block active before this step's switch
        assert kept == len(visited) * one_block + always, (s, visited)
        trained = [i for i in range(LAYERS) if any(p in opts[1].state for p in models[1].model.layers[i].parameters())]
        assert freed == len(trained) * one_block + always and len(trained) <= 1
        visited.update(opts[0].sampler.active)
    assert len(visited) == LAYERS


def test_resume_with_kept_state_is_bit_identical():
    calib = [{"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(50))}]
    model = tiny_llama()
    opt = gradproj.owlore(model, n_active=2, interval=3, rank=4, update_proj_gap=2, batches=calib, M=3, lr=1e-2,
                          keep_inactive_state=True)
    train(model, opt, 10, llama_loss)
    inactive = [i for i in range(LAYERS) if i not in opt.sampler.active]
    held = [i for i in inactive if all(p in opt.state for p in model.model.layers[i].parameters())]
    assert held, "no inactive block holds state at the checkpoint"
    ckpt, expected_active, expected = checkpoint_then_continue(model, opt)
    assert ckpt["opt"]["gradproj"]["sampler"]["keep_inactive_state"] is True
    model2 = tiny_llama(seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2 = gradproj.owlore(model2, n_active=2, interval=3, rank=4, update_proj_gap=2, probs="uniform", seed=9,
                           lr=1e-2, keep_inactive_state=True)
    opt2.load_state_dict(ckpt["opt"])
    for i in held:  # the frozen blocks' state survived the load
        assert all(p in opt2.state for p in model2.model.layers[i].parameters())
    continues_like(model2, opt2, expected_active, expected)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert (p in opt.state) == (q in opt2.state)
        if p in opt.state:
            assert same_state(opt.state[p], opt2.state[q])


def test_resume_refuses_the_other_setting_before_loading_anything():
    model = tiny_llama()
    opt = gradproj.owlore(model, n_active=2, interval=3, rank=4, probs="uniform", lr=1e-2, keep_inactive_state=True)
    train(model, opt, 4, llama_loss)
    sd = opt.state_dict()
    opt2 = gradproj.owlore(tiny_llama(), n_active=2, interval=3, rank=4, probs="uniform", lr=1e-2)
    active = opt2.sampler.active
    with pytest.raises(ValueError, match="keep_inactive_state = True, this sampler False"):
        opt2.load_state_dict(sd)
    assert len(opt2.state) == 0 and opt2.sampler.active == active and opt2.sampler.steps == 0
    # a checkpoint written before the option existed holds no key: its run freed the state
    old = {**sd, "gradproj": {"sampler": {k: v for k, v in sd["gradproj"]["sampler"].items()
                                          if k != "keep_inactive_state"}}}
    opt2.load_state_dict(old)
    assert opt2.sampler.steps == 4
    opt3 = gradproj.owlore(tiny_llama(), n_active=2, interval=3, rank=4, probs="uniform", lr=1e-2,
                           keep_inactive_state=True)
    with pytest.raises(ValueError, match="keep_inactive_state = False, this sampler True"):
        opt3.load_state_dict(old)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_keep_inactive_state_must_be_a_bool(value):
    layers = tiny_llama().model.layers
    flags = [p.requires_grad for p in layers.parameters()]
    with pytest.raises(TypeError, match=f"keep_inactive_state = {value!r} must be True"):
        gradproj.LayerSampler(layers, n_active=1, interval=2, keep_inactive_state=value)
    assert [p.requires_grad for p in layers.parameters()] == flags
