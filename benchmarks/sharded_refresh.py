"""Compute of one basis refresh per GPU under FSDP2: Gram matrix + eigh (``sharded_refresh="gram"``) vs
the SVD of the whole gradient (``"gather"``, and what one process or DDP runs).

Per distinct matrix shape of a LLaMA block with a right projection, in one process: the SVD of the
m x n gradient, and the work one of k ranks does on the Gram path — the Gram product of its m/k rows
(an m/k x n GEMM) plus the n x n eigendecomposition. The collectives (an n x n float32 all-reduce vs an
m x n all-gather) are left out: their cost depends on the interconnect (byte counts in docs/scaling.md).
The two are timed alternately, so that load from other processes affects both alike; medians.

    PYTHONPATH=. python benchmarks/sharded_refresh.py --model llama_1b --rank 512 --world-size 8 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import LLAMA, machine  # noqa: E402

from gradproj.distributed.sharding import gram_top_eigenvectors  # noqa: E402
from gradproj.projectors.svd import top_singular_vectors  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_1b", choices=list(LLAMA))
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    h, i, _, _ = LLAMA[args.model]
    k = args.world_size
    print(f"{args.model}, rank {args.rank}, {k} ranks; {machine()}")
    print(f"| shape (m x n) | SVD of G | Gram of m/{k} rows + eigh | ratio |")
    print("|---|---:|---:|---:|")
    for m, n in [(h, h), (i, h)]:  # the right-projected shapes (q, k, v, o; gate, up)
        g = torch.Generator().manual_seed(m)
        G = (torch.randn(m, n, generator=g) @ torch.diag(torch.logspace(0, -3, n))).to(device)
        rows = G[: -(-m // k)]

        def svd():
            top_singular_vectors(G)

        def gram():
            gram_top_eigenvectors(rows.float().t() @ rows.float(), args.rank)

        times = {"svd": [], "gram": []}
        for _ in range(args.repeats):
            for name, fn in (("svd", svd), ("gram", gram)):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
        s, gm = statistics.median(times["svd"]), statistics.median(times["gram"])
        print(f"| {m} x {n} | {s:.2f} s | {gm:.2f} s | {s / gm:.1f}x |")


if __name__ == "__main__":
    main()
