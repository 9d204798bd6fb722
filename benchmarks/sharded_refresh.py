"""Refresh cost of a basis under FSDP2: Gram matrix + eigh vs all-gather + SVD, against one process's SVD.

Two CPU processes joined by gloo, one thread each, each holding half of the rows of every gradient
matrix of one decoder block of the model (``torch.chunk`` split, as FSDP2 does). For each distinct
shape, the median wall time of a refresh (maximum over the ranks) with ``sharded_refresh="gram"`` and
``"gather"``, and of ``SVDProjector.compute_basis`` on the whole matrix in one process (one thread).

    PYTHONPATH=. python benchmarks/sharded_refresh.py --model llama_1b --rank 512 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from common import LLAMA, machine  # noqa: E402

from gradproj.distributed.sharding import RowSharding, ShardedProjector  # noqa: E402
from gradproj.projectors import SVDProjector  # noqa: E402


def shapes(model: str) -> list[tuple[int, int]]:
    h, i, _, _ = LLAMA[model]
    return [(h, h), (i, h), (h, i)]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    return statistics.median(times)


def worker(rank, world, store, args, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for m, n in shapes(args.model):
        G = torch.randn(m, n, generator=torch.Generator().manual_seed(m * n)) * 0.01
        p = distribute_tensor(G, mesh, [Shard(0)])
        sharding = RowSharding(p)
        base = SVDProjector((m, n), args.rank, "std", {"update_proj_gap": 200})
        result = {"shape": (m, n), "side": base.side}
        for method in ("gram", "gather"):
            proj = ShardedProjector(base, sharding, method, split_cols=True)
            if method == "gram" and not proj.uses_gram():
                continue
            result[method] = timed(lambda: proj.refresh(p.to_local(), {}, 0), args.repeats)
        dist.barrier()
        if rank == 0:
            result["svd"] = statistics.median(
                (lambda t0: (base.compute_basis(G, {}, 0), time.perf_counter() - t0)[1])(time.perf_counter())
                for _ in range(args.repeats))
        dist.barrier()
        rows.append(result)
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_1b", choices=list(LLAMA))
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.pt")
        mp.start_processes(worker, args=(2, os.path.join(d, "store"), args, out), nprocs=2, start_method="spawn")
        rows = torch.load(out, weights_only=True)
    torch.set_num_threads(1)
    print(f"{args.model}, rank {args.rank}, 2 gloo ranks x 1 thread; {machine()}")
    print("| shape (m x n) | side | one-process SVD | gather + SVD | Gram + eigh | SVD / Gram |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        gram = f"{r['gram']:.2f} s" if "gram" in r else "-"
        ratio = f"{r['svd'] / r['gram']:.1f}x" if "gram" in r else "-"
        print(f"| {r['shape'][0]} x {r['shape'][1]} | {r['side']} | {r['svd']:.2f} s | {r['gather']:.2f} s | "
              f"{gram} | {ratio} |")


if __name__ == "__main__":
    main()
