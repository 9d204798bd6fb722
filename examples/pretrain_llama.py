"""Pretrain a small LLaMA on the Python standard library's source, with GaLoreAdamW and with AdamW.

Runs on CPU in about a minute; no download. Reports training loss and optimizer-state memory of both.
"""

from __future__ import annotations

import argparse
import logging
import sysconfig
import time
from pathlib import Path

import torch
from tqdm import tqdm

import gradproj


def stdlib_bytes(limit: int) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return torch.tensor(list(out[:limit]), dtype=torch.long)


def make_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def train(name: str, data: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> dict:
    model = make_model(seed)
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    else:
        groups = gradproj.param_groups(model, rank=32, update_proj_gap=50, scale=0.25)
        opt = gradproj.GaLoreAdamW(groups, lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    bar = tqdm(range(steps), desc=name, leave=False)
    for _ in bar:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    state = gradproj.optimizer_state_bytes(opt)["total"] if name != "adamw" else sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"name": name, "loss": sum(losses[-10:]) / 10, "state_bytes": state, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = stdlib_bytes(2_000_000)
    rows = [train(n, data, args.steps, args.batch, args.seq, args.seed) for n in ("adamw", "galore_adamw")]
    print(f"{'optimizer':<14}{'final loss':>12}{'state MiB':>12}{'seconds':>10}")
    for r in rows:
        print(f"{r['name']:<14}{r['loss']:>12.3f}{r['state_bytes'] / 2**20:>12.2f}{r['seconds']:>10.1f}")
    print(f"GaLore optimizer state = {rows[1]['state_bytes'] / rows[0]['state_bytes']:.1%} of AdamW's")


if __name__ == "__main__":
    main()
