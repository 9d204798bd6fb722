"""Optimizer-state bytes of a LLaMA, counted from its shapes (no model is built).

The count follows what the optimizers allocate: AdamW two moments per parameter (plus torch's 4-byte
step tensor per parameter tensor); GaLore a basis and two moments per projected decoder matrix (right
projection for m >= n: basis r x n, moments m x r; left otherwise: m x r and r x n) and AdamW moments for
the rest; GaLore 8-bit the same with each moment tensor of >= 4096 values stored as one byte per value
plus one fp32 scale per 256 values (smaller ones in fp32). `benchmarks/memory.py` checks this count
against ``gradproj.optimizer_state_bytes`` of the models it trains.

    python benchmarks/state_bytes.py [--models llama_60m ... llama_7b] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import math

from common import LLAMA

#: GaLore's pre-training ranks (docs/algorithms.md, GaLore)
RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}
VOCAB = 32000


def llama_tensors(name: str) -> tuple[list[tuple[int, int]], list[int]]:
    """(matrices GaLore projects — every decoder Linear, [out, in]; other tensors' sizes)."""
    h, i, _, layers = LLAMA[name]
    matrices = ([(h, h)] * 4 + [(i, h), (i, h), (h, i)]) * layers
    others = [VOCAB * h, VOCAB * h] + [h] * (2 * layers + 1)  # embedding, untied head, RMSNorms
    return matrices, others


def moment_bytes(numel: int, weight_bytes: int, eight_bit: bool, min_8bit_size: int = 4096) -> int:
    """Both Adam moments of a tensor of ``numel`` values."""
    if not eight_bit:
        return 2 * numel * weight_bytes
    if numel < min_8bit_size:
        return 2 * numel * 4
    return 2 * (numel + 4 * math.ceil(numel / 256))


def state_bytes(name: str, optimizer: str, weight_bytes: int) -> int:
    """``optimizer``: "adamw" (torch.optim.AdamW), "adamw_gradproj" (full-rank gradproj), "galore", "galore8bit"."""
    matrices, others = llama_tensors(name)
    if optimizer in ("adamw", "adamw_gradproj"):
        sizes = [m * n for m, n in matrices] + others
        return sum(moment_bytes(s, weight_bytes, False) for s in sizes) + (4 * len(sizes) if optimizer == "adamw" else 0)
    eight_bit = optimizer == "galore8bit"
    r = RANKS[name]
    total = sum(moment_bytes(s, weight_bytes, eight_bit) for s in others)
    for m, n in matrices:
        if r >= min(m, n):
            total += moment_bytes(m * n, weight_bytes, eight_bit)
        elif m >= n:
            total += r * n * weight_bytes + moment_bytes(m * r, weight_bytes, eight_bit)
        else:
            total += m * r * weight_bytes + moment_bytes(r * n, weight_bytes, eight_bit)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(RANKS))
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    wb = 4 if args.dtype == "float32" else 2
    print(f"optimizer state, {args.dtype} weights (8-bit moments: 1 byte + fp32 scale per 256 values)\n")
    print("| model | rank | AdamW GiB | GaLore GiB | GaLore 8-bit GiB | GaLore vs AdamW | GaLore 8-bit vs AdamW |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        a, g, q = (state_bytes(name, o, wb) / 2**30 for o in ("adamw_gradproj", "galore", "galore8bit"))
        print(f"| {name} | {RANKS[name]} | {a:.3f} | {g:.3f} | {q:.3f} | {g / a - 1:+.1%} | {q / a - 1:+.1%} |")


if __name__ == "__main__":
    main()
