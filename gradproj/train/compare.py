"""``gradproj compare``: several optimizers on the same model, data and seed, one table and one plot."""

from __future__ import annotations

import ast
import copy
import csv
import io
import re
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from .loop import RunResult, TrainConfig, preflight, train
from .optimizers import OptimizerChoice, get_spec
from .runtime import make_runtime

COLUMNS = [
    ("optimizer", "optimizer"),
    ("final_train_loss", "train loss"),
    ("final_val_loss", "val loss"),
    ("final_val_ppl", "val ppl"),
    ("step_time_ms", "step time (ms)"),
    ("tokens_per_s", "tokens/s"),
    ("optimizer_state_bytes", "optimizer state (bytes)"),
    ("optimizer_state_mib", "optimizer state (MiB)"),
    ("peak_memory_bytes", "peak memory (bytes)"),
    ("peak_memory_mib", "peak memory (MiB)"),
]


def parse_value(text: str) -> Any:
    """``"3e-3"`` -> 0.003, ``"true"`` -> True, ``"[1, 2]"`` -> [1, 2], anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


_CHOICE_FIELDS = {f.name for f in fields(OptimizerChoice)} - {"name", "group_options", "optimizer_options"}


def parse_spec(spec: str, base: OptimizerChoice) -> OptimizerChoice:
    """``NAME[:key=value,...]`` -> an :class:`OptimizerChoice` on top of ``base``.

    Keys are the fields of :class:`OptimizerChoice` (``lr``, ``rank``, ``scale``, ``update_proj_gap``,
    ``projector``, ``proj_type``, ``weight_decay``, ``layerwise``, ...), ``group.KEY`` for a key of the
    projected param group, ``opt.KEY`` for a constructor argument.
    """
    name, _, rest = spec.partition(":")
    choice = replace(copy.deepcopy(base), name=name.strip())
    if rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ValueError(f"optimizer spec {spec!r}: expected NAME:key=value,key=value")
            parsed = parse_value(value)
            if key.startswith("group."):
                choice.group_options[key[6:]] = parsed
            elif key.startswith("opt."):
                choice.optimizer_options[key[4:]] = parsed
            elif key in _CHOICE_FIELDS:
                setattr(choice, key, parsed)
            else:
                raise ValueError(
                    f"optimizer spec {spec!r}: unknown key {key!r}; use one of {sorted(_CHOICE_FIELDS)}, "
                    "group.KEY (param-group key) or opt.KEY (constructor argument)"
                )
    return choice


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_") or "run"


def row(label: str, r: RunResult) -> dict[str, Any]:
    return {
        "optimizer": label,
        "final_train_loss": r.final_train_loss,
        "final_val_loss": r.final_val_loss,
        "final_val_ppl": r.final_val_ppl,
        "step_time_ms": 1000.0 * r.mean_step_time_s,
        "tokens_per_s": r.tokens_per_s,
        "optimizer_state_bytes": r.optimizer_state_bytes,
        "optimizer_state_mib": r.optimizer_state_bytes / 2**20,
        "peak_memory_bytes": r.peak_memory_bytes,
        "peak_memory_mib": r.peak_memory_bytes / 2**20,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]], config: TrainConfig, peak_kind: str) -> str:
    cols = [c for c in COLUMNS if not c[0].endswith("_bytes")]
    lines = [
        f"model `{config.model}`, {config.steps} steps of {config.batch_size} x {config.seq_len} tokens "
        f"(x{config.grad_accum} accumulation), seed {config.seed}, dtype {config.dtype}; peak memory is the "
        f"{peak_kind}.",
        "",
        "| " + " | ".join(title for _, title in cols) + " |",
        "|" + "|".join("---" if key == "optimizer" else "---:" for key, _ in cols) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[key]) for key, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[key for key, _ in COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def compare(
    config: TrainConfig,
    specs: list[str],
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, RunResult]]:
    """Train ``config`` once per optimizer spec (same model init, data and batches) and tabulate.

    With ``out_dir``: ``results.md``, ``results.csv``, ``loss_curves.png`` and one sub-directory per run
    (its ``metrics.jsonl``, ``config.json``, ``summary.json``).
    """
    if not specs:
        raise ValueError("compare needs at least one optimizer")
    choices = [parse_spec(s, config.optimizer) for s in specs]  # validate all specs before training
    labels = list(dict.fromkeys(specs))
    if len(labels) != len(specs):
        raise ValueError(f"optimizer specs repeat: {specs}")
    # every spec is checked before the first run starts: names and packages of all (instant), then each
    # optimizer built on a meta-device stand-in of the model; errors name the spec
    for label, choice in zip(labels, choices):
        try:
            get_spec(choice.name, choice.group_options.get("inner"))
            replace(config, optimizer=choice).validate()
        except (ValueError, TypeError) as err:
            raise type(err)(f"--optimizers {label!r}: {err}") from None
    run_configs = [
        preflight(replace(config, optimizer=c), where=f"--optimizers {label!r}") for label, c in zip(labels, choices)
    ]
    out = Path(out_dir) if out_dir is not None else None
    results: dict[str, RunResult] = {}
    rows = []
    runtime = make_runtime(config.device, config.parallel)  # one process group for all the runs
    try:
        for label, run_config in zip(labels, run_configs):
            results[label] = train(
                run_config,
                out_dir=out / _slug(label) if out is not None else None,
                runtime=runtime,
                progress=progress,
                report=report,
                label=label,
                checkpoints=False,
            )
            rows.append(row(label, results[label]))
    finally:
        runtime.close()
    if out is not None and runtime.is_main:
        from .plots import try_plot_losses

        kind = next(iter(results.values())).peak_memory_kind
        (out / "results.md").write_text(to_markdown(rows, config, kind))
        (out / "results.csv").write_text(to_csv(rows))
        try_plot_losses(
            {k: v.history for k, v in results.items()},
            out / "loss_curves.png",
            title=f"{config.model}: loss by optimizer",
        )
    return rows, results
