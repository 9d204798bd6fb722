"""``gradproj``: train, compare and size LLaMA models with gradproj optimizers.

    gradproj train                        # the tiny default on the standard library's sources, ~1 minute on CPU
    gradproj train --model llama_60m --optimizer fira_adamw --rank 128 --out runs/fira
    gradproj train --resume runs/fira     # continue exactly where the run stopped
    torchrun --nproc-per-node 4 -m gradproj train --model llama_1b --fsdp --out runs/1b   # DDP without --fsdp
    gradproj compare --optimizers adamw galore_adamw fira_adamw --out runs/cmp
    gradproj memory --model llama_7b --optimizer galore_adamw8bit --rank 1024 --layerwise --batch 1 --seq 256
    gradproj list                         # models, optimizers and projectors available here

See docs/cli.md for every option.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

#: train flags -> (section, field): "cfg" fields of TrainConfig, "opt" fields of OptimizerChoice
_TRAIN_FIELDS: dict[str, tuple[str, str]] = {}
#: train flags -> the flag as a user writes it (``opt_name`` -> ``--optimizer``)
_FLAGS: dict[str, str] = {}


def _kv(text: str) -> tuple[str, Any]:
    from .compare import parse_value

    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(value)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def _add(group, *flags, section: str, field: str, **kwargs):
    kwargs.setdefault("default", argparse.SUPPRESS)
    if kwargs.get("action") in (None, "append") and "choices" not in kwargs:
        kwargs.setdefault("metavar", flags[0].lstrip("-").upper().replace("-", "_"))
    action = group.add_argument(*flags, dest=field if section == "cfg" else f"opt_{field}", **kwargs)
    _TRAIN_FIELDS[action.dest] = (section, field)
    _FLAGS.setdefault(action.dest, flags[0])
    return action


def _add_train_options(p: argparse.ArgumentParser, *, compare: bool) -> None:
    from .. import registry

    m = p.add_argument_group("model and data")
    _add(m, "--model", section="cfg", field="model", help="LLaMA configuration (see `gradproj list`; default tiny)")
    _add(
        m,
        "--data",
        section="cfg",
        field="data",
        nargs="+",
        metavar="PATH",
        help="text / .jsonl files, directories, globs or hf:NAME[:CONFIG] (default: the standard library's sources)",
    )
    _add(
        m,
        "--text-key",
        section="cfg",
        field="text_key",
        help="field of .jsonl / datasets records holding the text (default text)",
    )
    _add(
        m,
        "--tokenizer",
        section="cfg",
        field="tokenizer",
        choices=["byte", "bpe"],
        help="byte-level (default) or a BPE trained on the corpus",
    )
    _add(
        m,
        "--vocab-size",
        section="cfg",
        field="vocab_size",
        type=_positive_int,
        help="BPE vocabulary size (default 4096; the byte tokenizer's is 256)",
    )
    _add(
        m,
        "--val-fraction",
        section="cfg",
        field="val_fraction",
        type=float,
        help="share of the corpus held out for validation (default 0.05)",
    )
    _add(m, "--max-bytes", section="cfg", field="max_bytes", type=_positive_int, help="read at most this much text")

    o = p.add_argument_group("optimizer")
    if not compare:
        _add(
            o,
            "--optimizer",
            section="opt",
            field="name",
            metavar="NAME",
            help=f"{', '.join(registry.optimizer_names())} (see `gradproj list`; default galore_adamw)",
        )
    _add(
        o,
        "--lr",
        section="opt",
        field="lr",
        type=float,
        help="peak learning rate (default: the optimizer's recipe, 1e-2 projected / 1e-3 full-rank and FRUGAL)",
    )
    _add(
        o, "--weight-decay", section="opt", field="weight_decay", type=float, help="decoupled weight decay (default 0)"
    )
    _add(
        o,
        "--rank",
        section="opt",
        field="rank",
        type=_positive_int,
        help="subspace rank (default: the optimizer's, else hidden // 4)",
    )
    _add(
        o,
        "--scale",
        "--alpha",
        section="opt",
        field="scale",
        type=float,
        help="alpha: projected matrices move at lr * scale (default 0.25; FRUGAL 1)",
    )
    _add(
        o,
        "--update-proj-gap",
        section="opt",
        field="update_proj_gap",
        type=_positive_int,
        help="T: refresh the subspace every T steps (default " + ("a quarter of --steps)" if compare else "200)"),
    )
    _add(
        o,
        "--proj-type",
        section="opt",
        field="proj_type",
        choices=["std", "reverse_std", "left", "right", "full"],
        help="projection side (default std)",
    )
    _add(
        o,
        "--projector",
        section="opt",
        field="projector",
        metavar="NAME",
        help=f"subspace basis: {', '.join(registry.projector_names())} or one registered with "
        "gradproj.register_projector (default randomized_svd)",
    )
    _add(
        o,
        "--target-modules",
        section="opt",
        field="target_modules",
        nargs="+",
        metavar="PATTERN",
        help="module names (substrings or regexes) whose weights are projected (default: every Linear of the blocks)",
    )
    _add(
        o,
        "--layerwise",
        section="opt",
        field="layerwise",
        action="store_true",
        help="per-layer updates during backward (every gradproj optimizer; with --grad-accum K, K backward passes "
        "per update)",
    )
    if not compare:  # compare: the spec option NAME:project_backward=True (not every method can take it)
        _add(
            o,
            "--project-backward",
            section="opt",
            field="project_backward",
            action="store_true",
            help="projected Linear weights receive R = P^T G from the backward pass instead of G (galore-style "
            "optimizers without a residual; not with --layerwise or --fsdp)",
        )
    _add(
        o,
        "--group-option",
        section="opt",
        field="group_options",
        type=_kv,
        action="append",
        metavar="KEY=VALUE",
        help="any further key of the projected param group (repeatable), e.g. limiter_gamma=1.05",
    )
    _add(
        o,
        "--optimizer-option",
        section="opt",
        field="optimizer_options",
        type=_kv,
        action="append",
        metavar="KEY=VALUE",
        help="any further constructor argument (repeatable), e.g. impl=torch, state_dtype=float32",
    )
    _add(
        o,
        "--sampler",
        section="opt",
        field="sampler",
        choices=["uniform", "owl"],
        help="train a few decoder blocks at a time: uniform (LISA) or owl (OwLore)",
    )
    _add(
        o,
        "--active-layers",
        section="opt",
        field="active_layers",
        type=_positive_int,
        help="blocks trained at a time with --sampler (default 2)",
    )
    _add(
        o,
        "--sample-interval",
        section="opt",
        field="sample_interval",
        type=_positive_int,
        help="steps between block draws with --sampler (default 50)",
    )
    _add(
        o,
        "--keep-inactive-state",
        section="opt",
        field="keep_inactive_state",
        action="store_true",
        help="with --sampler: keep a deactivated block's optimizer state (moments, basis) for its return instead "
        "of freeing it (optimizer memory grows toward that of every block)",
    )

    t = p.add_argument_group("training")
    _add(
        t,
        "--steps",
        section="cfg",
        field="steps",
        type=_positive_int,
        help="optimizer steps (default " + ("100 per run" if compare else "200") + ")",
    )
    _add(
        t,
        "--batch-size",
        "--batch",
        section="cfg",
        field="batch_size",
        type=_positive_int,
        help="sequences per step and process (default 8)",
    )
    _add(
        t,
        "--seq-len",
        "--seq",
        section="cfg",
        field="seq_len",
        type=_positive_int,
        help="tokens per sequence (default 128)",
    )
    _add(
        t,
        "--grad-accum",
        section="cfg",
        field="grad_accum",
        type=_positive_int,
        help="micro-batches per step (default 1)",
    )
    _add(
        t,
        "--schedule",
        section="cfg",
        field="schedule",
        choices=["cosine", "linear", "constant"],
        help="after warm-up (default cosine)",
    )
    _add(
        t,
        "--warmup",
        section="cfg",
        field="warmup",
        type=float,
        help="warm-up: a fraction of the steps if < 1, else steps (default 0.1)",
    )
    _add(t, "--min-lr-ratio", section="cfg", field="min_lr_ratio", type=float, help="final lr / peak lr (default 0.1)")
    _add(t, "--clip", section="cfg", field="clip", type=float, help="clip the global gradient norm (default 0: off)")
    _add(t, "--seed", section="cfg", field="seed", type=int, help="model init and batches (default 0)")
    _add(
        t,
        "--dtype",
        section="cfg",
        field="dtype",
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default float32)",
    )
    _add(t, "--device", section="cfg", field="device", help="auto (default), cpu, cuda, cuda:1, ...")
    _add(
        t,
        "--parallel",
        section="cfg",
        field="parallel",
        choices=["auto", "none", "ddp", "fsdp"],
        help="under torchrun: ddp or fsdp (FSDP2); auto (default): DDP under torchrun, else one process",
    )
    _add(
        t,
        "--fsdp",
        section="cfg",
        field="parallel",
        action="store_const",
        const="fsdp",
        help="shard parameters, gradients and optimizer state with FSDP2 (same as --parallel fsdp; needs torchrun)",
    )
    _add(
        t,
        "--log-every",
        section="cfg",
        field="log_every",
        type=_positive_int,
        help="write a metrics line every N steps (default 1)",
    )
    _add(
        t,
        "--eval-every",
        section="cfg",
        field="eval_every",
        type=_positive_int,
        help="validation every N steps and at the end (default 50)",
    )
    _add(
        t,
        "--eval-batches",
        section="cfg",
        field="eval_batches",
        type=_positive_int,
        help="validation batches (default 8)",
    )
    if not compare:
        _add(
            t,
            "--save-every",
            section="cfg",
            field="save_every",
            type=_positive_int,
            help="checkpoint every N steps and at the end (default 1000)",
        )
        _add(
            t,
            "--keep-checkpoints",
            section="cfg",
            field="keep_checkpoints",
            type=_positive_int,
            help="newest checkpoints kept (default 2)",
        )
        _add(
            t,
            "--stop-at",
            section="cfg",
            field="stop_at",
            type=_positive_int,
            help="stop after this step, keeping the schedule of --steps (resume later)",
        )

    r = p.add_argument_group("output")
    r.add_argument(
        "--out",
        metavar="DIR",
        help="write metrics.jsonl, loss.png, config.json, summary.json" + ("" if compare else ", checkpoints/"),
    )
    if not compare:
        r.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (its configuration is used)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--threads", type=_positive_int, help="torch CPU threads")


def _split(ns: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg: dict[str, Any] = {}
    opt: dict[str, Any] = {}
    for dest, (section, field) in _TRAIN_FIELDS.items():
        if hasattr(ns, dest):
            value = getattr(ns, dest)
            if field in ("group_options", "optimizer_options"):
                value = dict(value)
            (cfg if section == "cfg" else opt)[field] = value
    return cfg, opt


def _config(ns: argparse.Namespace):
    from .loop import TrainConfig
    from .optimizers import OptimizerChoice

    cfg, opt = _split(ns)
    return TrainConfig(optimizer=OptimizerChoice(**opt), **cfg)


def _is_main() -> bool:
    """False on the ranks of a torchrun job other than 0 (they train silently)."""
    return os.environ.get("RANK", "0") in ("", "0")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _report(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def _print_result(result, out: str | None) -> None:
    if not _is_main():
        return
    parts = ", ".join(
        f"{k} {_mib(v)}" for k, v in result.optimizer_state_parts.items() if not k.startswith("key:") and v
    )
    val = (
        f" | val loss {result.final_val_loss:.4f} | val ppl {result.final_val_ppl:.3f}"
        if result.final_val_loss is not None
        else ""
    )
    print(
        f"done: step {result.steps_done}, {result.tokens_per_s:,.0f} tokens/s, "
        f"{1000 * result.mean_step_time_s:,.1f} ms/step"
    )
    print(f"final train loss {result.final_train_loss:.4f}{val}")
    where = " on rank 0 (its shards under FSDP2)" if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
    print(f"optimizer state{where}: {_mib(result.optimizer_state_bytes)}" + (f" ({parts})" if parts else ""))
    print(f"peak memory: {_mib(result.peak_memory_bytes)} ({result.peak_memory_kind}); parameters {result.n_params:,}")
    if out:
        _print_written(
            out, ["metrics.jsonl", "loss.png", "config.json", "summary.json", "tokenizer.json", "checkpoints/"]
        )


def _print_written(out: str, names: list[str]) -> None:
    """``wrote DIR/: ...`` naming only the files that exist (a plot needs matplotlib, a checkpoint --out)."""
    there = [n for n in names if (Path(out) / n.rstrip("/")).exists()]
    if there:
        print(f"wrote {out}/: {', '.join(there)}")


def _flag(dest: str) -> str:
    return _FLAGS.get(dest, "--" + dest.replace("_", "-"))


def cmd_train(ns: argparse.Namespace) -> int:
    from .loop import RESUMABLE, TrainingInterrupted, preflight, train

    progress = not ns.quiet
    try:
        if ns.resume:
            cfg, opt = _split(ns)
            bad = sorted(k for k in cfg if k not in RESUMABLE) + [f"opt_{k}" for k in sorted(opt)]
            if bad:
                allowed = sorted({_flag(k) for k in RESUMABLE})
                raise ValueError(
                    f"--resume continues the run as {ns.resume}/config.json describes it; {', '.join(map(_flag, bad))} "
                    f"cannot change (only {', '.join(allowed)} may be given with --resume); start a new run with "
                    "another --out to change it"
                )
            result = train(
                out_dir=ns.out, resume=ns.resume, overrides=cfg, progress=progress, report=_report, stop_on_signal=True
            )
            out = ns.out or ns.resume
            if result.steps_trained == 0:
                if _is_main():
                    print(f"nothing to train: {ns.resume} is at step {result.steps_done}; its files are unchanged")
                    _print_result(result, None)
                return 0
        else:
            config = _config(ns)
            where = f"--optimizer {config.optimizer.name}"
            config = preflight(config, where)  # every check before the first line says what will run
            if _is_main():
                print(
                    f"gradproj train: {config.model} with {config.optimizer.name}, {config.steps} steps of "
                    f"{config.batch_size} x {config.seq_len} tokens" + (f" -> {ns.out}" if ns.out else "")
                )
            result = train(
                config,
                out_dir=ns.out,
                progress=progress,
                report=_report,
                stop_on_signal=True,
                where=where,
            )
            out = ns.out
    except TrainingInterrupted as stop:
        if _is_main():
            if stop.checkpoint is not None and stop.out_dir is not None:
                launcher = "torchrun [the same options] -m gradproj" if "WORLD_SIZE" in os.environ else "gradproj"
                print(
                    f"interrupted after step {stop.step}: saved {stop.checkpoint}\n"
                    f"continue with: {launcher} train --resume {shlex.quote(str(stop.out_dir))}",
                    file=sys.stderr,
                )
            else:
                print(f"interrupted after step {stop.step}; nothing saved (no --out)", file=sys.stderr)
        return 130
    _print_result(result, out)
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from .compare import compare

    config = _config(ns)
    result = compare(
        config,
        ns.optimizers,
        ns.out,
        seeds=ns.seeds,
        lr_grid=ns.lr_grid,
        embed_lr=ns.embed_lr,
        update_proj_gap=getattr(ns, "opt_update_proj_gap", None),  # not given: a quarter of the steps
        progress=not ns.quiet,
        report=_report,
    )
    if not _is_main():
        return 0
    print(result.markdown, end="")
    if ns.out:
        _print_written(ns.out, ["results.md", "results.csv", "runs.csv", "comparison.png"])
    return 0


def _embed_lr(text: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a learning rate, or 'off'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive learning rate, or 'off'")
    return value


#: --budget units (case-insensitive): decimal (GB = 10^9 bytes) and binary (GiB = 2^30 bytes)
SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """``"24GB"`` -> 24 * 10^9, ``"80 GiB"`` -> 80 * 2^30; a number without a unit is refused (GB or GiB?)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    forms = (
        "a number with a unit: " + ", ".join(u.upper().replace("I", "i") for u in SIZE_UNITS) + " (e.g. 24GB, 80GiB)"
    )
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; give {forms}")
    number, unit = match.groups()
    if not unit:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no unit, and GB (10^9 bytes) and GiB (2^30 bytes) differ by 7%; give {forms}"
        )
    if unit.lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown unit {unit!r}; give {forms}")
    return round(float(number) * SIZE_UNITS[unit.lower()])


def _size_text(text: str) -> str:
    parse_size(text)  # refuse a size without a unit while the arguments are parsed
    return text


def cmd_memory(ns: argparse.Namespace) -> int:
    from .. import registry
    from ..memory_estimate import estimate_memory
    from ..models import get_shape

    if (ns.batch_size > 0) != (ns.seq_len > 0):
        raise ValueError("give both --batch and --seq to count activations (or neither)")
    largest = get_shape(ns.model).hidden  # min(m, n) of every projected matrix of a LLaMA block is the hidden size
    if ns.rank is not None and ns.rank > largest:
        raise ValueError(
            f"--rank {ns.rank} exceeds {largest}, min(m, n) of the largest projected matrix of {ns.model} "
            f"(hidden size {largest}); at rank {largest} nothing is projected already. Use --rank {largest} or less"
        )
    entry = registry.get_optimizer(ns.optimizer)
    if ns.project_backward and not entry.projected:
        raise ValueError(
            f"--project-backward: {ns.optimizer} projects nothing, so no gradient would shrink; use it with a "
            "projecting optimizer such as galore_adamw, or drop it"
        )
    if ns.project_backward and (ns.layerwise or entry.residual != "none"):
        why = "--layerwise" if ns.layerwise else f"{ns.optimizer}'s residual rule ({entry.residual!r})"
        raise ValueError(
            f"--project-backward cannot be combined with {why}, which steps from full gradients; drop one of them"
        )
    est = estimate_memory(
        ns.model,
        ns.optimizer,
        ns.rank,
        layerwise=ns.layerwise,
        project_backward=ns.project_backward,
        dtype=ns.dtype,
        state_dtype=ns.state_dtype,
        batch_size=ns.batch_size,
        seq_len=ns.seq_len,
        proj_type=ns.proj_type,
        projector=ns.projector,
        attention=ns.attention,
        vocab_size=ns.vocab_size,
        active_layers=ns.active_layers,
        shards=ns.shards,
    )
    budget = parse_size(ns.budget) if ns.budget is not None else None
    per_device = ns.shards > 1
    if ns.json:
        d = est.as_dict()
        d["per_device"] = per_device
        if budget is not None:
            d["budget"] = budget
            d["fits"] = est.fits(budget)
        print(json.dumps(d, indent=2))
    else:
        print(est.table())
        if per_device:
            print(
                f"per device: each of the {ns.shards} devices holds 1/{ns.shards} of the weights, gradients and "
                "optimizer states (FSDP) and the activations of its own --batch"
            )
        if budget is not None:
            verdict = "fits" if est.fits(budget) else "does NOT fit"
            each = " per device" if per_device else ""
            print(
                f"{verdict} in {ns.budget.strip()}{each} ({budget / 1e9:.2f} GB, {budget / 2**30:.2f} GiB): "
                f"total {est.total / 1e9:.2f} GB{each}"
            )
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    from .. import registry
    from ..models import LLAMA_CONFIGS

    print("models (hidden / intermediate / heads / layers; train uses the tokenizer's vocabulary):")
    for name, s in LLAMA_CONFIGS.items():
        print(f"  {name:<12} {s.hidden:>5} {s.intermediate:>6} {s.heads:>3} {s.layers:>3}")
    from .optimizers import OPTIONAL_PACKAGES, installed, missing_packages

    print("optimizers (train / compare; memory knows all of them analytically):")
    for name, spec in registry.OPTIMIZERS.items():
        missing = missing_packages(spec)
        status = f"needs {', '.join(missing)}" if missing else "available"
        aliases = f" (also: {', '.join(spec.aliases)})" if spec.aliases else ""
        print(f"  {name:<18} {status:<20} lr {spec.lr:<7g} {spec.help}{aliases}")
    print(f"projectors: {', '.join(registry.projector_names())}")
    print(f"inner rules: {', '.join(registry.inner_names())}")
    print(f"residual rules: {', '.join(registry.residual_names())}")
    print("packages (looked up, not imported):")
    for pkg, use in {
        "transformers": "the LLaMA models of train / compare",
        "matplotlib": "loss plots",
        "tokenizers": "--tokenizer bpe",
        **OPTIONAL_PACKAGES,
    }.items():
        print(f"  {pkg:<13} {'installed' if installed(pkg) else 'NOT installed':<14} {use}")
    import torch

    print(
        f"  {'CUDA':<13} {'available' if torch.cuda.is_available() else 'not available':<14} GPU training, impl=triton"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import registry
    from ..models import LLAMA_CONFIGS

    parser = argparse.ArgumentParser(
        prog="gradproj", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{train,compare,memory,list}")

    p = sub.add_parser(
        "train",
        help="pretrain a LLaMA model with one optimizer",
        description="Pretrain a LLaMA model with one optimizer.",
    )
    _add_train_options(p, compare=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "compare",
        help="several optimizers on the same model and data, each at its best lr, over several seeds",
        description="Train the same model and data with several optimizers, each at the best of a small lr grid, "
        "over several seeds; write a table stating the protocol and one plot (docs/cli.md).",
    )
    p.add_argument(
        "--optimizers",
        nargs="+",
        required=True,
        metavar="SPEC",
        help="NAME or NAME:key=value,... (e.g. adamw galore_adamw:rank=64 'fira_adamw:lr=[3e-3,1e-2]')",
    )
    c = p.add_argument_group("protocol")
    c.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], metavar="SEED", help="seeds of every run (default 0 1)"
    )
    c.add_argument(
        "--lr-grid",
        type=_positive_int,
        default=3,
        metavar="N",
        help="lrs tried per optimizer without a given lr: N values on the 1-3-10 ladder around its default "
        "(default 3; 1: the default only)",
    )
    c.add_argument(
        "--embed-lr",
        type=_embed_lr,
        default=1e-2,
        metavar="LR",
        help="lr of embeddings, norms and head for every optimizer, full-rank ones too (default 1e-2; 'off': "
        "each optimizer's own lr)",
    )
    _add_train_options(p, compare=True)
    p.set_defaults(func=cmd_compare, steps=100)  # each optimizer trains lrs x seeds times: shorter runs by default

    p = sub.add_parser(
        "memory",
        help="analytic memory of a configuration and optimizer",
        description="Analytic memory: weights, gradients, optimizer states, activations.",
    )
    p.add_argument(
        "--model",
        default="llama_7b",
        choices=list(LLAMA_CONFIGS),
        help="configuration (default llama_7b; vocabulary 32000 except tiny)",
    )
    p.add_argument(
        "--optimizer",
        default="adamw",
        choices=registry.optimizer_names(aliases=True),
        metavar="NAME",
        help=f"any registered optimizer, installed or not: {', '.join(registry.optimizer_names())} (default adamw)",
    )
    p.add_argument("--rank", type=_positive_int, help="subspace rank (default: the optimizer's, else hidden // 4)")
    p.add_argument("--layerwise", action="store_true", help="per-layer updates: one gradient alive at a time")
    p.add_argument(
        "--project-backward",
        action="store_true",
        help="projected matrices receive R = P^T G from the backward pass (train --project-backward): their "
        "gradients are counted at R's size; not with --layerwise or a residual optimizer",
    )
    p.add_argument(
        "--batch-size", "--batch", type=int, default=0, help="sequences per step (with --seq: count activations)"
    )
    p.add_argument("--seq-len", "--seq", type=int, default=0, help="tokens per sequence")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="weights and gradients (default bfloat16)",
    )
    p.add_argument("--state-dtype", choices=["bfloat16", "float16", "float32"], help="Adam state (default: --dtype)")
    p.add_argument("--proj-type", default="std", choices=["std", "reverse_std", "left", "right", "full"])
    p.add_argument(
        "--projector",
        choices=registry.projector_names(),
        metavar="NAME",
        help=f"basis kind: {', '.join(registry.projector_names())} (default: the optimizer's, else svd)",
    )
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--vocab-size", type=_positive_int, help="override the vocabulary (default 32000)")
    p.add_argument(
        "--active-layers", type=_positive_int, help="blocks trained at a time under a layer sampler (LISA / OwLore)"
    )
    p.add_argument(
        "--shards",
        type=_positive_int,
        default=1,
        help="FSDP: weights, gradients and states split over N devices (the numbers are then per device)",
    )
    p.add_argument(
        "--budget",
        type=_size_text,
        metavar="SIZE",
        help="device memory to check against, with a unit: 24GB (10^9 bytes), 80GiB (2^30 bytes), 512MiB, ...",
    )
    p.add_argument("--json", action="store_true", help="print JSON with byte counts")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("list", help="models, optimizers and projectors available here")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.version:
        from .. import __version__

        print(f"gradproj {__version__}")
        return 0
    if ns.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if getattr(ns, "threads", None):
        import torch

        torch.set_num_threads(ns.threads)
    try:
        return ns.func(ns)
    except (ValueError, TypeError, FloatingPointError, ImportError) as err:
        parser.exit(2, f"gradproj {ns.command}: error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
