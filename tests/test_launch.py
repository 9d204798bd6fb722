"""The torchrun helpers of gradproj.distributed: process group from the environment, wrapping, data split,
rank-0 helpers and checkpoints, on 2 gloo ranks and on one process."""

import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradproj
from distributed_utils import run_distributed
from gradproj.distributed import (
    DistributedEnv,
    all_reduce_mean,
    init_distributed,
    load_checkpoint,
    quiet_other_ranks,
    rank_zero_only,
    save_checkpoint,
    shard_iterable,
    shutdown_distributed,
    split_batch,
    transformer_blocks,
    unwrap_model,
    wrap_model,
)
from problems import TinyNet, tiny_batch, tiny_loss, train


def make_opt(model):
    return gradproj.FiraAdamW(gradproj.param_groups(unwrap_model(model), rank=4, update_proj_gap=3, scale=0.5),
                              lr=1e-2)


def env_loss(env):
    """TinyNet's loss on this rank's share of micro-batch i (a loss for problems.train)."""
    return lambda model, i: tiny_loss(model, split_batch(tiny_batch(i), env))


def weights(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone())
            for n, p in unwrap_model(model).named_parameters()}


class Blocks(nn.Module):
    _no_split_modules = ["Block"]

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))


class Block(nn.Linear):
    def __init__(self):
        super().__init__(4, 4)


def _torchrun_body(rank, world, ckpt_dir):
    env = init_distributed(device="cpu")
    try:
        assert env == DistributedEnv(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        assert dist.get_backend() == "gloo" and env.is_main == (rank == 0)
        assert all_reduce_mean(float(rank), env) == 0.5
        assert rank_zero_only(lambda: "written")() == ("written" if rank == 0 else None)
        assert list(shard_iterable(range(7), env)) == [[0, 2, 4, 6], [1, 3, 5]][rank]
        x, y = split_batch((torch.arange(6), {"y": torch.arange(12).view(6, 2)}), env)
        assert x.tolist() == [[0, 1, 2], [3, 4, 5]][rank] and y["y"].shape == (3, 2)
        with pytest.raises(ValueError, match="does not split evenly over 2 ranks"):
            split_batch(torch.arange(5), env)
        quiet_other_ranks(env)
        assert logging.getLogger("gradproj").level == (logging.WARNING if rank else logging.NOTSET)

        assert isinstance(wrap_model(TinyNet(), env), nn.parallel.DistributedDataParallel)  # "auto" = DDP
        blocks = wrap_model(Blocks(), env, "fsdp")
        assert [type(b).__name__ for b in transformer_blocks(blocks)] == ["FSDPBlock"] * 3

        for strategy in ("ddp", "fsdp"):
            model = wrap_model(TinyNet(), env, strategy)
            opt = make_opt(model)
            train(model, opt, 4, env_loss(env))
            save_checkpoint(f"{ckpt_dir}/{strategy}", model, opt, env, extra={"step": 4, "note": strategy})
            train(model, opt, 3, env_loss(env), seed=4)
            expected = weights(model)

            model2 = wrap_model(TinyNet(seed=1), env, strategy)  # other weights: all of them must be loaded
            opt2 = make_opt(model2)
            assert load_checkpoint(f"{ckpt_dir}/{strategy}", model2, opt2, env) == {"step": 4, "note": strategy}
            train(model2, opt2, 3, env_loss(env), seed=4)
            got = weights(model2)
            assert all(torch.equal(got[n], expected[n]) for n in expected), strategy
    finally:
        shutdown_distributed()
    assert not dist.is_initialized()


def test_torchrun_helpers_on_two_ranks(tmp_path):
    """From torchrun's environment variables: gloo process group, rank-0 helpers, batch split, DDP / FSDP2
    wrapping, and checkpoints whose resume equals the uninterrupted run bit for bit under both."""
    run_distributed(_torchrun_body, str(tmp_path), torchrun_env=True)


def test_one_process_needs_no_process_group(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed(device="cpu")
    assert env == DistributedEnv() and not env.is_distributed and env.is_main
    model = TinyNet()
    assert wrap_model(model, env) is model and unwrap_model(model) is model
    batch = tiny_batch(0)
    assert split_batch(batch, env) is batch and all_reduce_mean(torch.tensor(2.5), env) == 2.5
    with pytest.raises(ValueError, match="needs a process group"):
        wrap_model(model, env, "fsdp")
    with pytest.raises(ValueError, match="strategy='zero'"):
        wrap_model(model, env, "zero")

    opt = make_opt(model)
    train(model, opt, 4, env_loss(env))
    save_checkpoint(tmp_path / "ckpt", model, opt, env, extra={"step": 4})
    train(model, opt, 3, env_loss(env), seed=4)
    model2 = TinyNet(seed=1)
    opt2 = make_opt(model2)
    assert load_checkpoint(tmp_path / "ckpt", model2, opt2, env) == {"step": 4}
    train(model2, opt2, 3, env_loss(env), seed=4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    extra = torch.load(tmp_path / "ckpt" / "extra.pt", weights_only=True)
    assert extra["extra"] == {"step": 4}
    with pytest.raises(FileNotFoundError, match="not a gradproj checkpoint"):
        load_checkpoint(tmp_path, model2, opt2, env)
    # a malformed optimizer-level entry is refused before the model or the optimizer change
    extra["optimizer_extra"] = {"timed_choices": {"left_layout": [["not", "a", "row"]]}}
    torch.save(extra, tmp_path / "ckpt" / "extra.pt")
    model3 = TinyNet(seed=2)
    opt3 = make_opt(model3)
    before = [p.detach().clone() for p in model3.parameters()]
    with pytest.raises(ValueError, match="timed_choices"):
        load_checkpoint(tmp_path / "ckpt", model3, opt3, env)
    assert all(torch.equal(a, b) for a, b in zip(before, model3.parameters())) and not opt3.state

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        init_distributed(device="cpu")
