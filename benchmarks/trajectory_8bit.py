"""How far GaLoreAdamW8bit's training trajectory is from GaLoreAdamW's.

Pretrains the small LLaMA of common.byte_llama (hidden 128, 4 layers, byte vocabulary, on the Python
standard library's source) three times from the same initialisation: GaLoreAdamW, GaLoreAdamW8bit (same
hyper-parameters, same batches) and, as a yardstick for "how different is different", GaLoreAdamW on another
data order. Every moment tensor of >= 4096 values is 8-bit here (the projected matrices and the embeddings).

    python benchmarks/trajectory_8bit.py [--steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

import gradproj
from common import byte_llama, machine, stdlib_bytes



def run(cls, data, steps, batch, seq, data_seed):
    model = byte_llama(seed=0, max_positions=256)
    start = [p.detach().clone() for p in model.parameters()]
    groups = gradproj.param_groups(model, rank=32, update_proj_gap=50, scale=0.25)
    opt = cls(groups, lr=1e-2)
    g = torch.Generator().manual_seed(data_seed)
    losses = []
    for _ in tqdm(range(steps), desc=f"{cls.__name__} (data order {data_seed})", leave=False):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    quantized = sum(1 for st in opt.state.values() if st.get("exp_avg", torch.empty(0)).dtype == torch.uint8)
    return losses, [p.detach() for p in model.parameters()], start, quantized, gradproj.optimizer_state_bytes(opt)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = stdlib_bytes(2_000_000)
    fp32, w32, w0, _, b32 = run(gradproj.GaLoreAdamW, data, args.steps, args.batch, args.seq, 0)
    q8, w8, _, n8, b8 = run(gradproj.GaLoreAdamW8bit, data, args.steps, args.batch, args.seq, 0)
    other, w_other, _, _, _ = run(gradproj.GaLoreAdamW, data, args.steps, args.batch, args.seq, 1)

    def tail(xs, k=50):
        return sum(xs[-k:]) / len(xs[-k:])

    def distance(ws):  # ‖W − W_fp32‖ / ‖W_fp32 − W_0‖ over all parameters
        dist = sum((a - b).norm() ** 2 for a, b in zip(ws, w32)) ** 0.5
        return float(dist / sum((a - b).norm() ** 2 for a, b in zip(w32, w0)) ** 0.5)

    rel = [abs(a - b) / b for a, b in zip(q8, fp32)]  # same batches: per-step losses are comparable
    result = {
        "machine": machine(), "steps": args.steps, "quantized_tensors": n8,
        "loss_fp32_last50": tail(fp32), "loss_8bit_last50": tail(q8), "loss_other_order_last50": tail(other),
        "mean_rel_loss_diff_8bit": sum(rel) / len(rel), "max_rel_loss_diff_8bit": max(rel),
        "weight_distance_8bit": distance(w8), "weight_distance_other_order": distance(w_other),
        "state_bytes_fp32": b32["total"], "state_bytes_8bit": b8["total"],
    }
    print(f"machine: {result['machine']}; {args.steps} steps, batch {args.batch} x {args.seq} bytes; "
          f"{n8} moment tensors in 8 bits\n")
    print("| | GaLoreAdamW | GaLoreAdamW8bit | GaLoreAdamW, other data order |")
    print("|---|---|---|---|")
    print(f"| mean loss, last 50 steps | {tail(fp32):.4f} | {tail(q8):.4f} | {tail(other):.4f} |")
    print(f"| per-step loss difference to GaLoreAdamW (same batches), mean / max | - "
          f"| {result['mean_rel_loss_diff_8bit']:.2%} / {result['max_rel_loss_diff_8bit']:.2%} | (other batches) |")
    print(f"| ‖W − W_GaLoreAdamW‖ / ‖W_GaLoreAdamW − W_0‖ after {args.steps} steps | 0 "
          f"| {result['weight_distance_8bit']:.3f} | {result['weight_distance_other_order']:.3f} |")
    print(f"| optimizer state (KiB) | {b32['total'] / 1024:.0f} | {b8['total'] / 1024:.0f} | {b32['total'] / 1024:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "losses_fp32": fp32, "losses_8bit": q8}, indent=1))


if __name__ == "__main__":
    main()
