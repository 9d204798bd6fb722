"""Train a causal language model with accelerate and a gradproj optimizer: the swap, checkpoints, exact resume.

The only change to an accelerate loop is the line that builds the optimizer::

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)                         # before
    optimizer = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=128, update_proj_gap=200, scale=0.25),
                                     lr=1e-2)                                           # after
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

``accelerator.save_state(dir)`` / ``accelerator.load_state(dir)`` save and restore the optimizer with the
model, the scheduler and the RNG; gradproj's state loads with ``torch.load(weights_only=True)``.

**Clipping.** In normal mode call ``accelerator.clip_grad_norm_`` as usual. With ``--layerwise``
(``layerwise=True``: every weight is updated during backward and its gradient freed) there is nothing left
to clip — ``accelerator.clip_grad_norm_`` would return 0.0 and clip nothing — so the optimizer gets
``max_grad_norm`` (each weight's gradient clipped before its update) and the loop does not clip.
``accelerator.accumulate`` and ``gradient_accumulation_steps`` work in both modes (``accumulation_steps``
of the optimizer in layerwise mode). Mixed precision: ``bf16``; ``fp16`` uses a GradScaler, which layerwise
mode refuses (the gradients are consumed before it could unscale them).

Runs offline on bytes of local text (default: the Python standard library's sources) with a small LLaMA
built from a config. Batches are a pure function of the step, so a resumed run sees the same data.

    python examples/finetune_accelerate.py --out runs/acc --steps 40 --save-every 20
    python examples/finetune_accelerate.py --out runs/acc --steps 40 --save-every 20 --resume
"""

from __future__ import annotations

import argparse
import os

import torch

import gradproj
from gradproj.train.data import ByteTokenizer, iter_documents, split_stream
from gradproj.train.models import build_model


def batch(windows: torch.Tensor, step: int, size: int) -> torch.Tensor:
    """Batch number ``step``: ``size`` windows, cycling through the data in order."""
    idx = (torch.arange(size) + step * size) % len(windows)
    return windows[idx]


def latest_checkpoint(out: str) -> tuple[str | None, int]:
    steps = [int(d.split("-")[1]) for d in os.listdir(out) if d.startswith("step-")] if os.path.isdir(out) else []
    return (os.path.join(out, f"step-{max(steps)}"), max(steps)) if steps else (None, 0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoints go to OUT/step-N")
    p.add_argument("--data", nargs="+", help="local text / .jsonl files or directories (default: the standard library)")
    p.add_argument("--max-bytes", type=int, default=200_000)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--update-proj-gap", type=int, default=50)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--layerwise", action="store_true", help="update each weight during backward (layerwise=True)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    args = p.parse_args(argv)

    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=not torch.cuda.is_available())
    tokens = ByteTokenizer().encode_corpus(iter_documents(args.data, max_bytes=args.max_bytes))
    train_tokens, _ = split_stream(tokens, 0.05, args.seq_len)
    n = len(train_tokens) // args.seq_len
    windows = train_tokens[: n * args.seq_len].view(n, args.seq_len).long()
    model = build_model("tiny", ByteTokenizer.vocab_size, args.seq_len, seed=args.seed)

    # the swap: gradproj's optimizer over param groups that project the decoder blocks' Linear weights
    groups = gradproj.param_groups(model, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale)
    if args.layerwise:
        optimizer = gradproj.GaLoreAdamW(groups, lr=args.lr, layerwise=True, accumulation_steps=args.grad_accum,
                                         max_grad_norm=args.max_grad_norm)
    else:
        optimizer = gradproj.GaLoreAdamW(groups, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start = 0
    if args.resume:
        path, start = latest_checkpoint(args.out)
        if path is None:
            raise SystemExit(f"--resume: no checkpoint in {args.out}")
        accelerator.load_state(path)
    losses = []
    for step in range(start, args.steps):
        for micro in range(args.grad_accum):
            x = batch(windows, step * args.grad_accum + micro, args.batch_size).to(accelerator.device)
            with accelerator.accumulate(model):
                loss = model(input_ids=x, labels=x).loss
                accelerator.backward(loss)
                if not args.layerwise and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        losses.append(loss.item())
        if (step + 1) % args.save_every == 0:
            accelerator.save_state(os.path.join(args.out, f"step-{step + 1}"))
    return {"losses": losses, "model": accelerator.unwrap_model(model)}


if __name__ == "__main__":
    result = main()
    print(f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
