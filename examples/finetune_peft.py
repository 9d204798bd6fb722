"""PEFT and GaLore together: LoRA adapters on attention, full-rank-quality GaLore updates on the MLPs.

LoRA (``peft``) freezes the model and trains small adapters; GaLore trains whole weight matrices with
optimizer state the size of a low-rank adapter. Here the attention projections get LoRA adapters and the
MLP weights are trained in full, their gradients projected by GaLore. The one-line swap is the optimizer::

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)      # before
    optimizer = gradproj.GaLoreAdamW(gradproj.param_groups(model, target_modules=["mlp"], rank=128,
                                                           update_proj_gap=200, scale=0.25), lr=1e-2)  # after

``param_groups`` keeps frozen weights out (``trainable_only``) and puts the LoRA matrices in the regular
group (Adam, unprojected). Had a GaLore rank above the LoRA rank been asked for the adapters themselves, they
would train unprojected with one warning: a projection cannot shrink a matrix that is already that small.

Checkpoints are one ``torch.save`` of the model's trainable weights, the optimizer, the scheduler and the
step; they load with ``torch.load(weights_only=True)``, and a resumed run continues bit-exactly.

    python examples/finetune_peft.py --out runs/peft --steps 40 --save-every 20
    python examples/finetune_peft.py --out runs/peft --steps 40 --save-every 20 --resume
"""

from __future__ import annotations

import argparse
import os

import torch

import gradproj
from gradproj.train.data import ByteTokenizer, iter_documents, split_stream
from gradproj.train.models import build_model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoints go to OUT/step-N.pt")
    p.add_argument("--data", nargs="+", help="local text / .jsonl files or directories (default: the standard library)")
    p.add_argument("--max-bytes", type=int, default=200_000)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--rank", type=int, default=32, help="GaLore rank of the MLP weights")
    p.add_argument("--update-proj-gap", type=int, default=50)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    args = p.parse_args(argv)

    from peft import LoraConfig, get_peft_model

    tokens = ByteTokenizer().encode_corpus(iter_documents(args.data, max_bytes=args.max_bytes))
    train_tokens, _ = split_stream(tokens, 0.05, args.seq_len)
    n = len(train_tokens) // args.seq_len
    windows = train_tokens[: n * args.seq_len].view(n, args.seq_len).long()

    base = build_model("tiny", ByteTokenizer.vocab_size, args.seq_len, seed=args.seed)
    model = get_peft_model(base, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                            target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():  # the MLPs train in full (with GaLore); the rest stays frozen
        if ".mlp." in name:
            param.requires_grad_(True)

    # the swap: GaLore on the MLP weights, Adam on the LoRA matrices
    groups = gradproj.param_groups(model, target_modules=["mlp"], rank=args.rank,
                                   update_proj_gap=args.update_proj_gap, scale=args.scale)
    optimizer = gradproj.GaLoreAdamW(groups, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    start = 0
    if args.resume:
        found = [int(f[5:-3]) for f in os.listdir(args.out) if f.startswith("step-")] if os.path.isdir(args.out) else []
        if not found:
            raise SystemExit(f"--resume: no checkpoint in {args.out}")
        ckpt = torch.load(os.path.join(args.out, f"step-{max(found)}.pt"), weights_only=True)
        model.load_state_dict(ckpt["model"], strict=False)  # the trainable weights; the frozen ones are the base's
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start = ckpt["step"]
    losses = []
    for step in range(start, args.steps):
        x = windows[(torch.arange(args.batch_size) + step * args.batch_size) % len(windows)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if (step + 1) % args.save_every == 0:
            os.makedirs(args.out, exist_ok=True)
            state = model.state_dict()
            torch.save({"model": {n: state[n] for n in trainable}, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step + 1},
                       os.path.join(args.out, f"step-{step + 1}.pt"))
    return {"losses": losses, "model": model, "groups": groups}


if __name__ == "__main__":
    result = main()
    print(f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
