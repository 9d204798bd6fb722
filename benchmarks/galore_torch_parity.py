"""How close gradproj's GaLoreAdamW stays to the original ``galore-torch`` package in float32, next to how far
``galore-torch`` moves from itself when one starting weight changes by one ulp.

Three matrices (tall, wide, square; the "std" side), rank 5, T 6, scale 0.25, lr 2e-2, a tanh regression loss
on fixed data: the shapes of tests/test_parity.py, in float32 instead of float64. Prints, after 1 and 20 steps,
the largest |gradproj − galore-torch| over all weights, the same for galore-torch against its own run from a
start one ulp away in one entry, and how many weights differ at all after the first step.

    PYTHONPATH=. python benchmarks/galore_torch_parity.py      # needs: pip install galore-torch
"""

from __future__ import annotations

import warnings

import torch

import gradproj

SHAPES = [(48, 20), (20, 48), (33, 33)]


def run(cls, start, data, steps, **kwargs):
    params = [w.clone().requires_grad_() for w in start]
    group = {"params": params, "rank": 5, "update_proj_gap": 6, "scale": 0.25, "proj_type": "std"}
    opt = cls([group], lr=2e-2, weight_decay=0.0, **kwargs)
    trajectory = []
    for _ in range(steps):
        opt.zero_grad()
        sum(((torch.tanh(x @ p.T) - y) ** 2).mean() for p, (x, y) in zip(params, data)).backward()
        opt.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


def largest_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def main() -> None:
    import galore_torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(0)
    start = [torch.randn(m, n) for m, n in SHAPES]
    data = [(torch.randn(16, n), torch.randn(16, m)) for m, n in SHAPES]
    nudged = [w.clone() for w in start]
    nudged[0].view(-1)[0] = torch.nextafter(nudged[0].view(-1)[0], torch.tensor(float("inf")))
    steps = 20
    ours = run(gradproj.GaLoreAdamW, start, data, steps, projector="svd", refresh_stagger=False)  # galore-torch's
    ref = run(galore_torch.GaLoreAdamW, start, data, steps, no_deprecation_warning=True)
    ref_nudged = run(galore_torch.GaLoreAdamW, nudged, data, steps, no_deprecation_warning=True)
    differing = sum(int((x != y).sum()) for x, y in zip(ours[0], ref[0]))
    total = sum(w.numel() for w in start)
    print(f"float32, shapes {SHAPES}, rank 5, T 6; torch {torch.__version__}")
    print(f"weights that differ from galore-torch's after step 1: {differing} of {total}")
    for k in (1, steps):
        print(f"after {k:2d} steps: max |gradproj - galore-torch| {largest_difference(ours[k - 1], ref[k - 1]):.3g}; "
              f"max |galore-torch - galore-torch from a start one ulp away| "
              f"{largest_difference(ref_nudged[k - 1], ref[k - 1]):.3g}")


if __name__ == "__main__":
    main()
