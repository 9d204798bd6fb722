"""Fine-tune a causal language model with the transformers ``Trainer`` and a gradproj optimizer.

Configure GaLore / APOLLO with transformers' own arguments and swap one line — the optimizer Trainer gets:

    args = TrainingArguments(..., optim="galore_adamw", optim_target_modules=["q_proj", "v_proj", ...],
                             optim_args="rank=128, update_proj_gap=200, scale=0.25")
    trainer = Trainer(model=model, args=args, train_dataset=...,
                      optimizers=create_optimizer(model, args))   # gradproj.integrations.transformers

``optim`` is any of transformers' GaLore / APOLLO names (``galore_adamw``, ``galore_adamw_8bit``,
``galore_adafactor``, ``apollo_adamw``, each also ``..._layerwise``); gradproj runs them, with no
galore-torch or apollo-torch installed. ``create_optimizer`` also builds the learning-rate scheduler from
``lr_scheduler_type`` and the warm-up. Trainer saves the optimizer in every checkpoint; gradproj's state is
tensors and numbers only, so ``--resume`` (``resume_from_checkpoint``) loads it with
``torch.load(weights_only=True)`` and continues bit-exactly.

Layerwise names update each weight during backward, so Trainer's own gradient clipping sees no gradients:
``create_optimizer`` hands ``max_grad_norm`` to the optimizer (clipping each weight's gradient) and
``gradient_accumulation_steps`` to its accumulation; Trainer's logged ``grad_norm`` is then 0.0. Use
``bf16=True``, not ``fp16=True`` (a GradScaler cannot unscale gradients that are already consumed).

Runs offline: without ``--model`` a small LLaMA is built from a config and trained on bytes of local text
(default: the Python standard library's sources); ``--model DIR`` fine-tunes a model saved with
``save_pretrained`` (with its tokenizer) instead.

    python examples/finetune_trainer.py --out runs/ft --steps 60 --save-steps 30
    python examples/finetune_trainer.py --out runs/ft --steps 60 --save-steps 30 --resume
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from torch.utils.data import Dataset

import gradproj
from gradproj.integrations.transformers import create_optimizer
from gradproj.train.data import ByteTokenizer, iter_documents, split_stream
from gradproj.train.models import build_model

#: module-name patterns whose weights are projected (LLaMA / Mistral / Qwen naming)
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Windows(Dataset):
    """Non-overlapping windows of ``seq_len`` tokens; labels are the inputs (the model shifts them)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        n = len(tokens) // seq_len
        self.x = tokens[: n * seq_len].view(n, seq_len).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def load_model_and_tokens(args):
    docs = iter_documents(args.data, max_bytes=args.max_bytes)
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model)
        tok = AutoTokenizer.from_pretrained(args.model)
        ids = [i for d in docs for i in tok(d)["input_ids"] + [tok.eos_token_id]]
        tokens = torch.tensor(ids)
    else:
        tokens = ByteTokenizer().encode_corpus(docs)
        model = build_model("tiny", ByteTokenizer.vocab_size, args.seq_len, seed=args.seed)
    return model, tokens


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Trainer output_dir (checkpoints go to OUT/checkpoint-N)")
    p.add_argument("--model", help="a directory saved with save_pretrained (default: a tiny LLaMA built here)")
    p.add_argument("--data", nargs="+", help="local text / .jsonl files or directories (default: the standard library)")
    p.add_argument("--max-bytes", type=int, default=400_000)
    p.add_argument("--optim", default="galore_adamw", help="a transformers GaLore/APOLLO name (default galore_adamw)")
    p.add_argument("--target-modules", nargs="+", default=DEFAULT_TARGETS)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--update-proj-gap", type=int, default=50)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--save-steps", type=int, default=30)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    from transformers import Trainer, TrainingArguments

    model, tokens = load_model_and_tokens(args)
    train_tokens, val_tokens = split_stream(tokens, 0.05, args.seq_len)
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        gradient_accumulation_steps=args.grad_accum,
        optim=args.optim,  # transformers' names; gradproj runs them (create_optimizer below)
        optim_target_modules=args.target_modules,
        optim_args=f"rank={args.rank}, update_proj_gap={args.update_proj_gap}, scale={args.scale}",
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=max(1, args.steps // 10),
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=args.quiet,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Windows(train_tokens, args.seq_len),
        eval_dataset=Windows(val_tokens, args.seq_len),
        optimizers=create_optimizer(model, training_args),  # the one line: gradproj's optimizer and scheduler
    )
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = {"train_loss": result.training_loss, **trainer.evaluate()}
    metrics["eval_ppl"] = math.exp(metrics["eval_loss"])
    state = gradproj.optimizer_state_bytes(trainer.optimizer)
    if not args.quiet:
        print(f"train loss {metrics['train_loss']:.4f}, eval loss {metrics['eval_loss']:.4f}, "
              f"eval ppl {metrics['eval_ppl']:.2f}, optimizer state {state['total'] / 2**20:.2f} MiB")
        print(f"checkpoints: {sorted(d for d in os.listdir(args.out) if d.startswith('checkpoint-'))}")
    return metrics


if __name__ == "__main__":
    main()
