"""Per-GPU memory of LLaMA-1B / 7B pre-training under DDP and FSDP2 with each optimizer, and the
communication gradproj adds under FSDP2 (analytic: gradproj.distributed.estimate). Prints markdown.

    PYTHONPATH=. python benchmarks/scaling_memory.py --world-size 8
"""

from __future__ import annotations

import argparse

from gradproj.distributed.estimate import llama_tensors, per_gpu_memory, sharded_communication

RECIPES = {  # model -> optimizer -> projection rank (GaLore's and Fira's published recipes, docs/algorithms.md)
    "llama_1b": {"adamw": 0, "galore": 512, "galore_8bit": 512, "fira": 512},
    "llama_7b": {"adamw": 0, "galore": 1024, "galore_8bit": 1024, "fira": 64},
}
NAMES = {"adamw": "AdamW", "galore": "GaLore", "galore_8bit": "GaLore 8-bit", "fira": "Fira"}
GiB = 2**30


def memory_table(world: int, weight_bytes: int, grad_bytes: int, state_bytes: int) -> str:
    lines = ["| model | optimizer | rank | strategy | weights | gradients | optimizer states | total |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for model, recipe in RECIPES.items():
        tensors = llama_tensors(model)
        for opt, rank in recipe.items():
            for strategy in ("ddp", "fsdp"):
                m = per_gpu_memory(tensors, opt, strategy, world, rank=rank or 1, weight_bytes=weight_bytes,
                                   grad_bytes=grad_bytes, state_bytes=state_bytes)
                label = "DDP" if strategy == "ddp" else f"FSDP2 × {world}"
                lines.append(f"| {model} | {NAMES[opt]} | {rank or '-'} | {label} | "
                             + " | ".join(f"{m[k] / GiB:.2f}" for k in ("weights", "gradients", "optimizer_states",
                                                                         "total")) + " |")
    return "\n".join(lines)


def communication_table(grad_bytes: int) -> str:
    lines = ["| model | rank | per step (left R) | per refresh (Gram + gathers) | FSDP2's own per step |",
             "|---|---:|---:|---:|---:|"]
    for model, recipe in RECIPES.items():
        rank = recipe["galore"]
        c = sharded_communication(llama_tensors(model), rank, grad_bytes=grad_bytes)
        lines.append(f"| {model} | {rank} | {c['per_step'] / 2**20:.0f} MiB | {c['per_refresh'] / GiB:.2f} GiB | "
                     f"{c['fsdp_per_step'] / GiB:.1f} GiB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--weight-bytes", type=int, default=2)
    ap.add_argument("--grad-bytes", type=int, default=2)
    ap.add_argument("--state-bytes", type=int, default=2)
    args = ap.parse_args()
    print(memory_table(args.world_size, args.weight_bytes, args.grad_bytes, args.state_bytes))
    print()
    print(communication_table(args.grad_bytes))


if __name__ == "__main__":
    main()
