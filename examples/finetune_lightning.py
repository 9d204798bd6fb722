"""Train a causal language model with Lightning and a gradproj optimizer: the swap, checkpoints, exact resume.

The only change to a LightningModule is ``configure_optimizers``::

    def configure_optimizers(self):
        groups = gradproj.param_groups(self.model, rank=128, update_proj_gap=200, scale=0.25)
        optimizer = gradproj.GaLoreAdamW(groups, lr=1e-2)                # instead of torch.optim.AdamW(...)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": ..., "interval": "step"}}

Lightning's checkpoints hold the optimizer's ``state_dict()``; ``Trainer.fit(..., ckpt_path=...)`` restores it
(and the scheduler and the step count), and gradproj's state loads with ``torch.load(weights_only=True)``.

**Clipping.** In normal mode ``Trainer(gradient_clip_val=...)`` works as usual. With ``--layerwise``
(``layerwise=True``: every weight is updated during backward, inside Lightning's closure, and its gradient
freed) Lightning's clipping would find no gradients and silently clip nothing; pass
``gradient_clip_val=None`` and give the optimizer ``max_grad_norm`` (each weight's gradient clipped before its
update). ``accumulate_grad_batches=k`` pairs with ``accumulation_steps=k``. Use ``precision="bf16-mixed"``,
not ``"16-mixed"``: its GradScaler cannot unscale gradients that are already consumed (the optimizer raises).

Runs offline on bytes of local text (default: the Python standard library's sources) with a small LLaMA
built from a config. Lightning restarts a plain ``DataLoader`` from its first batch when it resumes in the
middle of an epoch, so here the batch is a function of the global step (the loader only paces the loop):
a resumed run sees the batches the uninterrupted one saw.

    python examples/finetune_lightning.py --out runs/pl --steps 40 --save-every 20
    python examples/finetune_lightning.py --out runs/pl --steps 40 --save-every 20 --resume
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
    p.add_argument("--out", required=True, help="checkpoints go to OUT/epoch=E-step=S.ckpt")
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
    p.add_argument("--save-every", type=int, default=20, help="optimizer steps between checkpoints")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    args = p.parse_args(argv)

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class LitLM(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.losses: list[float] = []

        def training_step(self, _, batch_idx):
            micro = self.global_step * args.grad_accum + batch_idx % args.grad_accum  # micro-batch number
            idx = (torch.arange(args.batch_size) + micro * args.batch_size) % len(windows)
            x = windows[idx].to(self.device)
            loss = self.model(input_ids=x, labels=x).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            # the swap: gradproj's optimizer over param groups that project the decoder blocks' Linear weights
            groups = gradproj.param_groups(self.model, rank=args.rank, update_proj_gap=args.update_proj_gap,
                                           scale=args.scale)
            if args.layerwise:
                optimizer = gradproj.GaLoreAdamW(groups, lr=args.lr, layerwise=True,
                                                 accumulation_steps=args.grad_accum, max_grad_norm=args.max_grad_norm)
            else:
                optimizer = gradproj.GaLoreAdamW(groups, lr=args.lr)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    tokens = ByteTokenizer().encode_corpus(iter_documents(args.data, max_bytes=args.max_bytes))
    train_tokens, _ = split_stream(tokens, 0.05, args.seq_len)
    n = len(train_tokens) // args.seq_len
    windows = train_tokens[: n * args.seq_len].view(n, args.seq_len).long()
    loader = torch.utils.data.DataLoader(range(args.steps * args.grad_accum), batch_size=None)  # paces the loop

    L.seed_everything(args.seed, verbose=False)
    module = LitLM(build_model("tiny", ByteTokenizer.vocab_size, args.seq_len, seed=args.seed))
    checkpoints = ModelCheckpoint(dirpath=args.out, every_n_train_steps=args.save_every, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="auto",
        devices=1,
        accumulate_grad_batches=args.grad_accum,
        gradient_clip_val=None if args.layerwise else args.max_grad_norm,  # layerwise: the optimizer clips
        callbacks=[checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ckpt = None
    if args.resume:
        found = sorted(f for f in os.listdir(args.out) if f.endswith(".ckpt")) if os.path.isdir(args.out) else []
        if not found:
            raise SystemExit(f"--resume: no checkpoint in {args.out}")
        ckpt = os.path.join(args.out, max(found, key=lambda f: int(f.split("step=")[1].split(".")[0])))
    trainer.fit(module, loader, ckpt_path=ckpt)
    return {"losses": module.losses, "model": module.model, "checkpoints": sorted(os.listdir(args.out))}


if __name__ == "__main__":
    result = main()
    print(f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}; checkpoints {result['checkpoints']}")
