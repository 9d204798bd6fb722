"""Fine-tuning with layerwise sampling: full AdamW, GaLore, LISA and OwLore at equal steps, plus LLaMA2-7B memory.

1. Pretrain a small byte-level LLaMA briefly with AdamW on the Python standard library's source (the
   top-level ``*.py`` files of the stdlib).
2. Fine-tune copies of it on a different corpus, the English text of the Python documentation topics that
   ship with every CPython for ``help()`` (``pydoc_data.topics``: reStructuredText-like prose, no code
   files), with each method for the same number of steps, the same batches and the same lr, once per
   fine-tuning seed (``--seeds``: the batch order and the sampler's draws; the pretrained model is the same):

   * ``adamw``        full fine-tuning, torch.optim.AdamW
   * ``galore``       GaLoreAdamW on every block Linear (rank, T, scale as OwLore's GaLore)
   * ``lisa``         uniform layer sampling of ``--n-active`` blocks, AdamW inside them; a deactivated
                      block's optimizer state is freed (``LayerSampler(keep_inactive_state=False)``)
   * ``lisa_keep``    the same, the state kept for the block's return, as the released LISA code does
   * ``owlore``       gradproj.owlore with ``--owlore-active`` blocks (default: as many as fit in LISA's
                      optimizer memory, as the paper spends OwLore's saving on more blocks); state freed
   * ``owlore_keep``  the same, the state (moments and projectors) kept, as the released OwLore code does

   Reported per method: held-out loss on the tail 10 % of the fine-tuning corpus (mean over seeds, the
   spread max − min, each seed), train loss (mean of the last 10 steps), peak optimizer-state bytes, and
   the peak of weights + gradients + optimizer state (tensor bytes measured at every step while gradients
   and the updated state coexist; activations excluded); keep − free per seed. On CUDA also
   torch.cuda.max_memory_allocated.
3. The analytic memory of LLaMA2-7B fine-tuning with OwLore's released recipe (no training).

    python benchmarks/finetune.py [--seeds 0 1 2] [--methods lisa lisa_keep owlore owlore_keep] [--plot docs/finetune.png]
    python benchmarks/finetune.py --analytic-only
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time

import torch
from tqdm import tqdm

import gradproj
from common import LLAMA, byte_llama, machine, stdlib_bytes

METHODS = ("adamw", "galore", "lisa", "lisa_keep", "owlore", "owlore_keep")


# --------------------------------------------------------------------------------------------- corpora
def pydoc_topics() -> torch.Tensor:
    """Bytes of the documentation topics bundled with CPython for help() (fine-tuning corpus)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.stack([data[s : s + seq] for s in starts.tolist()])


# ----------------------------------------------------------------------------------------------- model
def make_model(hidden: int, inter: int, layers: int, heads: int, seed: int):
    return byte_llama(hidden, inter, layers, heads, seed)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return gradproj.optimizer_state_bytes(opt)["total"]


@torch.no_grad()
def eval_loss(model, data: torch.Tensor, seq: int, n: int = 16) -> float:
    starts = torch.linspace(0, len(data) - seq - 1, n).long()
    x = windows(data, starts, seq)
    was = model.training
    model.eval()
    loss = model(input_ids=x, labels=x).loss.item()
    model.train(was)
    return loss


def pretrain(model, data, steps, batch, seq, lr, seed):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="pretrain (stdlib source)", leave=False)
    for _ in bar:
        x = windows(data, torch.randint(0, len(data) - seq - 1, (batch,), generator=g), seq)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def build(method: str, model, args, calib, seed: int):
    """The optimizer of one method."""
    common = dict(lr=args.lr)
    keep = method.endswith("_keep")
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), weight_decay=0.0, eps=1e-6, **common)
    if method == "galore":
        groups = gradproj.param_groups(model, rank=args.rank, update_proj_gap=args.gap, scale=args.scale)
        return gradproj.GaLoreAdamW(groups, **common)
    if method in ("lisa", "lisa_keep"):
        sampler = gradproj.LayerSampler(model.model.layers, args.n_active, args.interval, "uniform", seed=seed,
                                        keep_inactive_state=keep)
        return gradproj.GaLoreAdamW(model.parameters(), sampler=sampler, **common)
    if method in ("owlore", "owlore_keep"):
        return gradproj.owlore(model, n_active=args.owlore_active, interval=args.interval, rank=args.rank,
                               update_proj_gap=args.gap, scale=args.scale, batches=calib, M=args.M, seed=seed,
                               keep_inactive_state=keep, **common)
    raise ValueError(f"unknown method {method!r}; use one of {METHODS}")


def owlore_blocks_for_lisa_memory(model, args) -> int:
    """The most blocks OwLore (GaLore rank ``args.rank`` inside them) can train within the optimizer state of
    LISA's ``args.n_active`` blocks (Adam inside them), both freeing deactivated blocks' state: the paper's
    comparison, which spends OwLore's memory saving on more active blocks."""
    block = model.model.layers[0]
    adam = sum(2 * p.numel() for p in block.parameters())
    galore = sum(galore_entries(*lin.weight.shape, args.rank) for lin in gradproj.sampling.block_linears(block))
    galore += sum(2 * p.numel() for p in block.parameters() if p.dim() == 1)
    return max(1, min(len(model.model.layers), (args.n_active * adam) // galore))


def finetune(method, base_state, model_args, train, held_out, calib, args, seed: int) -> dict:
    model = make_model(*model_args, seed=args.seed)
    model.load_state_dict(base_state)
    weights = tensor_bytes(model.parameters())
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
        torch.cuda.reset_peak_memory_stats()
    opt = build(method, model, args, calib, seed)
    g = torch.Generator().manual_seed(seed + 1)  # the same batches for every method of a seed
    losses, held, states, peak_tensors = [], [], [], 0
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{method} seed {seed}", leave=False)
    for step in bar:
        if step % args.eval_every == 0:
            held.append((step, eval_loss(model, held_out, args.seq)))
        x = windows(train, torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=g), args.seq)
        if cuda:
            x = x.cuda()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        grads = tensor_bytes(p.grad for p in model.parameters())
        opt.step()
        st = state_bytes(opt)
        peak_tensors = max(peak_tensors, weights + grads + st)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        states.append(st)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    held.append((args.steps, eval_loss(model, held_out, args.seq)))
    row = {
        "method": method,
        "seed": seed,
        "train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "held_out_loss": held[-1][1],
        "state_peak": max(states),
        "peak_tensors": peak_tensors,
        "seconds": time.perf_counter() - t0,
        "losses": losses,
        "held_out": held,
        "states": states,
    }
    if cuda:
        row["cuda_peak"] = torch.cuda.max_memory_allocated()
    return row


# ------------------------------------------------------------------------------------ analytic 7B memory
def galore_entries(m: int, n: int, r: int) -> int:
    """Basis + two moments of one m x n matrix under GaLore's "std" side choice."""
    r = min(r, m, n)
    return (r * n + 2 * m * r) if m >= n else (m * r + 2 * r * n)


def analytic_7b(n_active=5, rank=256, vocab=32000, state_bytes_per=2, grad_bytes=2, weight_bytes=2) -> list[dict]:
    """Memory of LLaMA2-7B fine-tuning (weights, gradients, optimizer state; activations excluded).

    Assumptions: bf16 weights; bf16 gradients, only for parameters that train at that moment (frozen blocks
    have none; set_to_none frees them); optimizer state in ``state_bytes_per`` bytes per entry (2: bf16, as
    torch.optim and gradproj's default create it for bf16 weights; 4: fp32); AdamW = two moments per
    entry; GaLore = basis + two low-rank moments per block Linear, AdamW for embeddings, norms, head;
    embeddings, final norm and untied head always train (LISA, OwLore).
    """
    h, inter, _, layers = LLAMA["llama_7b"]
    mats = [(h, h)] * 4 + [(inter, h), (inter, h), (h, inter)]
    block_mat = sum(m * n for m, n in mats)
    block_norm = 2 * h
    block = block_mat + block_norm
    always = 2 * vocab * h + h  # embeddings, head, final norm
    total = layers * block + always
    galore_block = sum(galore_entries(m, n, rank) for m, n in mats) + 2 * block_norm
    adam_block = 2 * block

    def row(name, trainable, state_entries):
        w, g, s = total * weight_bytes, trainable * grad_bytes, state_entries * state_bytes_per
        return {"setup": name, "params": total, "weights": w, "grads": g, "state": s, "total": w + g + s}

    return [
        row("full fine-tuning, AdamW", total, 2 * total),
        row(f"GaLore rank {rank}, every block", total, layers * galore_block + 2 * always),
        row("LISA, 2 blocks, state freed", 2 * block + always, 2 * adam_block + 2 * always),
        row("LISA, 2 blocks, state kept (keep_inactive_state=True, as released)", 2 * block + always, 2 * total),
        row(f"OwLore {n_active} blocks, rank {rank}, state freed", n_active * block + always,
            n_active * galore_block + 2 * always),
        row(f"OwLore {n_active} blocks, state kept (keep_inactive_state=True, as released)", n_active * block + always,
            layers * galore_block + 2 * always),
    ]


def print_analytic() -> None:
    print("\nLLaMA2-7B fine-tuning memory (analytic; GiB = 2^30 bytes; activations excluded; bf16 weights and grads)\n")
    print("| setup | weights | grads | state bf16 | total, state bf16 | state fp32 | total, state fp32 |")
    print("|---|---|---|---|---|---|---|")
    gib = 2**30
    for b16, f32 in zip(analytic_7b(state_bytes_per=2), analytic_7b(state_bytes_per=4)):
        print(f"| {b16['setup']} | {b16['weights'] / gib:.2f} | {b16['grads'] / gib:.2f} | {b16['state'] / gib:.2f} "
              f"| {b16['total'] / gib:.2f} | {f32['state'] / gib:.2f} | {f32['total'] / gib:.2f} |")


# ------------------------------------------------------------------------------------------------- main
def plot(rows, path: str, title: str) -> None:
    """Held-out loss (mean over seeds) and optimizer state per step, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    bases = list(dict.fromkeys(m.removesuffix("_keep") for m in methods))  # a method and its _keep: one colour
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        color = f"C{bases.index(method.removesuffix('_keep'))}"
        style = "--" if method.endswith("_keep") else "-"
        steps = [s for s, _ in mine[0]["held_out"]]
        mean = [sum(r["held_out"][j][1] for r in mine) / len(mine) for j in range(len(steps))]
        ax1.plot(steps, mean, style, marker="o", ms=3, color=color, label=method)
        ax2.plot(range(1, len(mine[0]["states"]) + 1), [s / 2**20 for s in mine[0]["states"]], style, color=color,
                 label=method)
    ends = [sum(r["held_out_loss"] for r in rows if r["method"] == m) / sum(r["method"] == m for r in rows)
            for m in methods]
    ax1.set_ylim(min(ends) - 0.05, max(ends) + 0.35)  # the end of training, where the methods differ
    ax1.set(xlabel="fine-tuning step", ylabel="held-out loss (nats/byte)", title="held-out loss, mean over seeds")
    ax2.set(xlabel="fine-tuning step", ylabel="optimizer state (MiB)", title="optimizer state (first seed)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary_table(rows, seeds) -> list[str]:
    """One line per method: held-out loss mean, spread (max − min) and per seed; state; keep − free per seed."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["seed"]): r for r in rows}
    full = next((m for m in methods if m == "adamw"), None)
    cuda = "cuda_peak" in rows[0]
    lines = ["| method | held-out loss: mean | spread (max − min) | per seed | train loss, mean | optimizer state, "
             "peak (KiB) | peak weights+grads+state (KiB) | keep − free, per seed |" + (" CUDA peak (MiB) |" if cuda else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for m in methods:
        held = [by[m, s]["held_out_loss"] for s in seeds]
        train = [by[m, s]["train_loss"] for s in seeds]
        state = max(by[m, s]["state_peak"] for s in seeds)
        peak = max(by[m, s]["peak_tensors"] for s in seeds)
        diff = "—"
        base = m[: -len("_keep")] if m.endswith("_keep") else None
        if base in methods:
            diff = " / ".join(f"{by[m, s]['held_out_loss'] - by[base, s]['held_out_loss']:+.3f}" for s in seeds)
        share = f" ({state / max(by[full, s]['state_peak'] for s in seeds):.0%} of AdamW's)" if full else ""
        lines.append(f"| {m} | {sum(held) / len(held):.3f} | {max(held) - min(held):.3f} | "
                     f"{' / '.join(f'{h:.3f}' for h in held)} | {sum(train) / len(train):.3f} | {state / 1024:.0f}{share} "
                     f"| {peak / 1024:.0f} | {diff} |"
                     + (f" {max(by[m, s]['cuda_peak'] for s in seeds) / 2**20:.1f} |" if cuda else ""))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=352)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps, the same for every method")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tuning lr, the same for every method")
    ap.add_argument("--rank", type=int, default=32, help="GaLore rank (hidden / 4)")
    ap.add_argument("--gap", type=int, default=50, help="GaLore update_proj_gap T")
    ap.add_argument("--scale", type=float, default=1.0, help="GaLore scale (OwLore's recipe: 1.0)")
    ap.add_argument("--n-active", type=int, default=2, help="blocks LISA trains at a time (the LISA paper's 2)")
    ap.add_argument("--owlore-active", type=int, default=None,
                    help="blocks OwLore trains at a time (default: the most whose optimizer state fits in LISA's)")
    ap.add_argument("--interval", type=int, default=10, help="steps between draws (LISA, OwLore)")
    ap.add_argument("--M", type=float, default=13.0, help="outlier threshold for OwLore's ratios (the recipe's 13)")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--methods", nargs="+", default=["lisa", "lisa_keep", "owlore", "owlore_keep"], choices=METHODS)
    ap.add_argument("--seed", type=int, default=0, help="the pretrained model's seed (initialisation and batches)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="fine-tuning seeds: batch order and the samplers' draws")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: at these small shapes a second OpenMP thread costs more than "
                         "it gains, and much more on a shared machine")
    ap.add_argument("--plot", help="write the PNG here (e.g. docs/finetune.png)")
    ap.add_argument("--json", help="write all measurements here")
    ap.add_argument("--analytic-only", action="store_true")
    ap.add_argument("--from-json", help="print the table (and --plot) of an earlier run's --json, training nothing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.analytic_only:
        print_analytic()
        return
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        a = saved["args"]
        print("\n".join(summary_table(saved["rows"], a["seeds"])))
        if args.plot:
            plot(saved["rows"], args.plot, f"byte-level LLaMA ({a['layers']} layers, hidden {a['hidden']}): stdlib "
                                           f"source -> pydoc topics, {a['steps']} steps, seeds {a['seeds']}")
        return

    model_args = (args.hidden, args.intermediate, args.layers, args.heads)
    t0 = time.perf_counter()
    model = make_model(*model_args, seed=args.seed)
    if args.owlore_active is None:
        args.owlore_active = owlore_blocks_for_lisa_memory(model, args)
    pre_loss = pretrain(model, stdlib_bytes(2_000_000), args.pretrain_steps, args.batch, args.seq,
                        args.pretrain_lr, args.seed)
    base_state = copy.deepcopy(model.state_dict())
    text = pydoc_topics()
    cut = int(0.9 * len(text))
    train, held_out = text[:cut], text[cut:]
    g = torch.Generator().manual_seed(args.seed + 2)
    calib = [{"input_ids": windows(train, torch.randint(0, cut - args.seq - 1, (args.batch,), generator=g), args.seq)}
             for _ in range(args.calib_batches)]
    ratios = gradproj.outlier_ratios(model, batches=calib, M=args.M)
    before = eval_loss(model, held_out, args.seq)
    del model
    rows = [finetune(m, base_state, model_args, train, held_out, calib, args, seed)
            for seed in args.seeds for m in args.methods]
    wall = time.perf_counter() - t0

    print(f"machine: {machine()}; total {wall:.0f} s")
    print(f"model: LLaMA hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, byte vocab; "
          f"pretrained {args.pretrain_steps} steps on stdlib source (final train loss {pre_loss:.3f}); "
          f"held-out loss on the docs corpus before fine-tuning {before:.3f}")
    print(f"fine-tuning: {args.steps} steps, batch {args.batch} x {args.seq} bytes, lr {args.lr}; GaLore rank "
          f"{args.rank}, T {args.gap}, scale {args.scale}; LISA {args.n_active} and OwLore {args.owlore_active} of "
          f"{args.layers} blocks, interval {args.interval}; seeds {args.seeds}")
    print(f"OwLore sampling probabilities (calibrated outlier ratios, M={args.M:g}, normalised): "
          f"{[round(r, 3) for r in (ratios / ratios.sum()).tolist()]}\n")
    print("\n".join(summary_table(rows, args.seeds)))
    print_analytic()
    if args.plot:
        plot(rows, args.plot, f"byte-level LLaMA ({args.layers} layers, hidden {args.hidden}): stdlib source -> "
                              f"pydoc topics, {args.steps} steps, seeds {args.seeds}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ratios": ratios.tolist(), "held_out_before": before, "rows": rows}, f)


if __name__ == "__main__":
    main()
