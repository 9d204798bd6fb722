"""Run a test body in 2 CPU processes joined by a gloo process group (as torchrun would launch them)."""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# fork skips re-importing torch in every child (seconds each); spawn where fork does not exist
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def _entry(rank, fn, world_size, store_dir, args, torchrun_env):
    torch.set_num_threads(1)
    if torchrun_env:  # what torchrun sets; the test body initializes the process group itself
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(torchrun_env))
        fn(rank, world_size, *args)
        return
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, *args, world_size=2, timeout=120, torchrun_env=False):
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; re-raise the first failure here.

    With ``torchrun_env=True`` no process group is created: the children get torchrun's environment
    variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) instead.
    """
    _preload()
    port = _free_port() if torchrun_env else 0
    with tempfile.TemporaryDirectory() as store_dir:
        ctx = mp.start_processes(_entry, args=(fn, world_size, store_dir, args, port), nprocs=world_size,
                                 join=False, start_method=START_METHOD)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"distributed test body did not finish in {timeout} s")


def _preload() -> None:
    """Import here, once, what every child would otherwise import itself after the fork (seconds each:
    fully_shard imports torch._dynamo)."""
    import importlib

    for name in ("torch._dynamo", "torch.distributed.tensor", "torch.distributed.fsdp",
                 "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict",
                 "torch.nn.parallel"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_share(loss):
    """``loss(model, batch)`` on this rank's contiguous share of ``tiny_batch(i)`` (problems.tiny_batch): a
    loss for problems.train whose ranks together see the batch one process would."""
    from problems import tiny_batch

    def on_this_rank(model, i):
        world, rank = dist.get_world_size(), dist.get_rank()
        return loss(model, tuple(t.chunk(world)[rank] for t in tiny_batch(i)))

    return on_this_rank
