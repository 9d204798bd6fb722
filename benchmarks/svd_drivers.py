"""Time torch.linalg.svd's CUDA drivers against the Gram-matrix eigendecomposition for GaLore refresh shapes.

    python benchmarks/svd_drivers.py [--shapes 2048x5461 ...] [--rank 512]

For each shape: median time of the thin SVD with the default driver and with gesvd / gesvdj / gesvda, of
``eigh`` of the smaller Gram matrix (the ``eigh`` projector), and the captured-energy ratio of each top-r
subspace to the default SVD's (1.0 = the same subspace).
"""

from __future__ import annotations

import argparse

import torch

from common import median_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["2048x2048", "2048x5461", "4096x11008"])
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = "cuda"
    print("| shape | rank | method | ms | energy / default SVD's |\n|---|---|---|---|---|")
    for spec in args.shapes:
        m, n = map(int, spec.split("x"))
        g = torch.Generator(device=dev).manual_seed(0)
        decay = torch.logspace(0, -3, min(m, n), device=dev)
        U, _ = torch.linalg.qr(torch.randn(m, min(m, n), device=dev, generator=g))
        V, _ = torch.linalg.qr(torch.randn(n, min(m, n), device=dev, generator=g))
        G = (U * decay) @ V.T  # a decaying spectrum, like real gradients
        r = args.rank
        ref_energy = None
        methods = {"svd (default)": lambda: torch.linalg.svd(G, full_matrices=False)}
        for driver in ("gesvd", "gesvdj", "gesvda"):
            methods[f"svd {driver}"] = lambda d=driver: torch.linalg.svd(G, full_matrices=False, driver=d)
        methods["eigh of Gram"] = lambda: torch.linalg.eigh(G @ G.T if m <= n else G.T @ G)
        for name, fn in methods.items():
            try:
                ms = median_time(fn, args.repeats, device=dev) * 1e3
                out = fn()
            except Exception as err:  # a driver that refuses this shape
                print(f"| {spec} | {r} | {name} | failed: {type(err).__name__} | - |")
                continue
            if name.startswith("svd"):
                basis = out[0][:, :r]
            else:
                vecs = out[1][:, -r:]
                basis = vecs if m <= n else G @ vecs
                basis, _ = torch.linalg.qr(basis)
            energy = (basis.T @ G).norm() ** 2
            ref_energy = ref_energy or energy
            print(f"| {spec} | {r} | {name} | {ms:.1f} | {float(energy / ref_energy):.6f} |")


if __name__ == "__main__":
    main()
