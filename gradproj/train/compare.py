"""``gradproj compare``: several optimizers on the same model and data under one stated protocol.

The protocol (:func:`compare`, written at the top of every table):

* **Each optimizer at its own best learning rate**: the runs of a spec without an lr try a small grid around
  the optimizer's default (``lr_grid`` values on the 1-3-10 ladder, e.g. 3e-3, 1e-2, 3e-2 around GaLore's
  1e-2); a spec with ``lr=X`` (or ``--lr``) runs X, one with ``lr=[X,Y,...]`` runs those. The best lr is the
  one with the lowest mean final validation loss over the seeds.
* **The same lr split for everyone**: embeddings, norms and head (the parameters no method projects) train
  at ``embed_lr`` for every optimizer, full-rank ones included; the block matrices at each optimizer's own lr
  (projected methods move them at lr x scale, as their recipes do). ``embed_lr=None`` gives every optimizer
  its one lr for all parameters.
* **Several seeds** (model initialisation and batch order); every optimizer sees the same initial model and
  batches for a seed. Results are the mean over seeds +- half their range (every seed lies inside), and a
  difference from the best optimizer is called *beyond the seed spread* only when the two ranges do not overlap.
* **A subspace refresh inside the run**: ``update_proj_gap`` defaults to a quarter of the steps (four bases
  per matrix), not the 200 of long pre-training runs, which a short comparison would never reach.

With ``out_dir``: ``results.md``, ``results.csv`` (one row per optimizer), ``runs.csv`` (one row per run),
``comparison.png`` and one directory per run (``<spec>/lr_<lr>/seed_<seed>/``: ``metrics.jsonl``,
``config.json``, ``summary.json``).
"""

from __future__ import annotations

import ast
import copy
import csv
import io
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .loop import RunResult, TrainConfig, preflight, train
from .optimizers import OptimizerChoice, available_projectors, get_spec
from .runtime import make_runtime

#: columns of results.csv (one row per optimizer, at its best lr; means over the seeds)
COLUMNS = [
    ("optimizer", "optimizer"),
    ("lr", "best lr"),
    ("lr_source", "lr from"),
    ("final_val_loss", "val loss"),
    ("val_loss_spread", "+- (half the seed range)"),
    ("val_loss_per_seed", "val loss per seed"),
    ("vs_best", "vs best"),
    ("beyond_seed_spread", "beyond seed spread"),
    ("final_train_loss", "train loss"),
    ("final_val_ppl", "val ppl"),
    ("lr_grid", "val loss per lr"),
    ("update_proj_gap", "T"),
    ("step_time_ms", "step time (ms)"),
    ("tokens_per_s", "tokens/s"),
    ("optimizer_state_bytes", "optimizer state (bytes)"),
    ("optimizer_state_mib", "optimizer state (MiB)"),
    ("peak_memory_bytes", "peak memory (bytes)"),
    ("peak_memory_mib", "peak memory (MiB)"),
]
#: columns of runs.csv (one row per run)
RUN_COLUMNS = ["optimizer", "lr", "seed", "final_train_loss", "final_val_loss", "step_time_ms", "optimizer_state_bytes"]

DEFAULT_SEEDS = (0, 1)
DEFAULT_LR_GRID = 3
DEFAULT_EMBED_LR = 1e-2  # the projected recipes' lr, which they give the embeddings and head


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


def _split_items(text: str) -> list[str]:
    """Split ``key=value,key=value`` at the commas outside brackets (``lr=[1e-3,3e-3]`` is one item)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def parse_spec(spec: str, base: OptimizerChoice) -> OptimizerChoice:
    """``NAME[:key=value,...]`` -> an :class:`OptimizerChoice` on top of ``base``.

    Keys are the fields of :class:`OptimizerChoice` (``lr``, ``embed_lr``, ``rank``, ``scale``,
    ``update_proj_gap``, ``projector``, ``proj_type``, ``weight_decay``, ``layerwise``, ...), ``group.KEY`` for a
    key of the projected param group, ``opt.KEY`` for a constructor argument. ``lr=[X,Y]`` (compare only): the
    learning rates to try.
    """
    name, _, rest = spec.partition(":")
    choice = replace(copy.deepcopy(base), name=name.strip())
    if rest:
        for item in _split_items(rest):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ValueError(f"--optimizers {spec!r}: expected NAME:key=value,key=value")
            parsed = parse_value(value)
            if key.startswith("group."):
                choice.group_options[key[6:]] = parsed
            elif key.startswith("opt."):
                choice.optimizer_options[key[4:]] = parsed
            elif key in _CHOICE_FIELDS:
                setattr(choice, key, parsed)
            else:
                raise ValueError(
                    f"--optimizers {spec!r}: unknown key {key!r}; use one of {sorted(_CHOICE_FIELDS)}, "
                    "group.KEY (param-group key) or opt.KEY (constructor argument)"
                )
    return choice


# ------------------------------------------------------------------------------------------- protocol
def _ladder(j: int) -> float:
    """The 1-3-10 ladder: j = 0 -> 1, 1 -> 3, 2 -> 10, -1 -> 0.3, -2 -> 0.1, ..."""
    return float(f"{(1 if j % 2 == 0 else 3)}e{j // 2}")


def lr_grid_values(default: float, n: int) -> list[float]:
    """``n`` learning rates around ``default`` on the 1-3-10 ladder (one extra above when n is even);
    ``default`` itself is the centre (a default off the ladder is kept as it is, its neighbours on it)."""
    if n < 1:
        raise ValueError(f"lr_grid = {n} must be >= 1")
    j0 = round(2 * math.log10(default))
    on_ladder = math.isclose(_ladder(j0), default, rel_tol=1e-9)
    below = [_ladder(j) for j in range(j0 + 1, j0 - n - 2, -1) if _ladder(j) < default * (1 - 1e-9)]
    above = [_ladder(j) for j in range(j0 - 1, j0 + n + 2) if _ladder(j) > default * (1 + 1e-9)]
    lows, highs = below[: (n - 1) // 2][::-1], above[: n // 2]
    return [*lows, _ladder(j0) if on_ladder else default, *highs]


@dataclass
class Method:
    """One spec of a comparison, validated: the choice it trains and the learning rates it tries."""

    label: str
    choice: OptimizerChoice  # lr None: set per run from ``lrs``
    lrs: list[float]
    lr_source: str  # "grid" (around the optimizer's default), "spec" or "--lr"
    projected: bool


@dataclass
class Protocol:
    seeds: list[int]
    lr_grid: int
    embed_lr: float | None
    update_proj_gap: int


def _positive_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and float(value) > 0


def validate_specs(
    config: TrainConfig,
    specs: Sequence[str],
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    lr_grid: int = DEFAULT_LR_GRID,
    embed_lr: float | None = DEFAULT_EMBED_LR,
    update_proj_gap: int | None = None,
) -> tuple[list[Method], Protocol]:
    """Check every spec and protocol option before anything trains; ValueError naming the bad one.

    ``update_proj_gap`` None: a quarter of ``config.steps`` (a spec's own ``update_proj_gap`` wins).
    """
    if not specs:
        raise ValueError("compare needs at least one optimizer (--optimizers NAME [NAME ...])")
    if len(set(specs)) != len(specs):
        raise ValueError(f"optimizer specs repeat: {list(specs)}; give each once")
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds = {seeds!r}: give one or more integers (--seeds 0 1)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds = {seeds} repeat; give each seed once")
    if isinstance(lr_grid, bool) or not isinstance(lr_grid, int) or lr_grid < 1:
        raise ValueError(f"lr_grid = {lr_grid!r} must be a positive integer (1: each optimizer's default lr only)")
    if embed_lr is not None and not _positive_number(embed_lr):
        raise ValueError(f"embed_lr = {embed_lr!r} must be a positive number, or off (each optimizer's own lr)")
    if update_proj_gap is None:
        update_proj_gap = max(1, config.steps // 4)
    elif isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
        raise ValueError(f"update_proj_gap = {update_proj_gap!r} must be a positive integer")
    config.validate()
    base = replace(copy.deepcopy(config.optimizer), update_proj_gap=update_proj_gap)
    methods = []
    for spec in specs:
        try:
            choice = parse_spec(spec, base)
            entry = get_spec(choice.name)
        except (ValueError, TypeError) as err:
            raise type(err)(f"--optimizers {spec!r}: {err}") from None
        if choice.projector is not None and choice.projector not in available_projectors():
            raise ValueError(
                f"--optimizers {spec!r}: unknown projector {choice.projector!r}; "
                f"available: {', '.join(available_projectors())}"
            )
        if choice.embed_lr is None:
            choice.embed_lr = embed_lr
        elif not _positive_number(choice.embed_lr):
            raise ValueError(f"--optimizers {spec!r}: embed_lr = {choice.embed_lr!r} must be a positive number")
        given = choice.lr
        if isinstance(given, (list, tuple)):
            lrs, source = list(given), "spec"
        elif given is not None:
            lrs, source = [given], ("spec" if re.search(r"(^|[:,])\s*lr\s*=", spec) else "--lr")
        else:
            lrs, source = lr_grid_values(entry.lr, lr_grid), "grid"
        if not lrs or not all(_positive_number(lr) for lr in lrs) or len(set(lrs)) != len(lrs):
            raise ValueError(f"--optimizers {spec!r}: lr = {given!r}; give positive numbers, each once")
        for name in ("update_proj_gap", "rank", "active_layers", "sample_interval"):
            value = getattr(choice, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--optimizers {spec!r}: {name} = {value!r} must be a positive integer")
        # the optimizer built on a meta-device stand-in of the model: its errors name the spec
        preflight(replace(config, optimizer=replace(choice, lr=float(lrs[0]))), where=f"--optimizers {spec!r}")
        methods.append(Method(spec, replace(choice, lr=None), [float(x) for x in lrs], source, entry.projected))
    return methods, Protocol(seeds, lr_grid, embed_lr, update_proj_gap)


# -------------------------------------------------------------------------------------------- results
@dataclass
class Comparison:
    """What :func:`compare` measured: one row per optimizer, every run, and the table as markdown."""

    rows: list[dict[str, Any]]
    runs: dict[str, RunResult] = field(repr=False)
    markdown: str = ""
    #: per optimizer, the histories of its best lr's runs (one per seed): what the plot draws
    curves: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict, repr=False)


def _lr_text(lr: float) -> str:
    return f"{lr:.3g}"


def _loss(r: RunResult) -> float:
    return r.final_val_loss if r.final_val_loss is not None else r.final_train_loss


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _aggregate(
    methods: list[Method], protocol: Protocol, by_run: dict[tuple[str, float, int], RunResult]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for m in methods:
        per_lr = {lr: _mean([_loss(by_run[m.label, lr, s]) for s in protocol.seeds]) for lr in m.lrs}
        best = min(m.lrs, key=lambda lr: (per_lr[lr], lr))
        runs = [by_run[m.label, best, s] for s in protocol.seeds]
        losses = [_loss(r) for r in runs]
        val = _mean(losses)
        rows.append(
            {
                "optimizer": m.label,
                "lr": best,
                "lr_source": m.lr_source,
                "lr_at_grid_edge": len(m.lrs) > 1 and best in (min(m.lrs), max(m.lrs)),
                "final_val_loss": val,
                "val_loss_spread": (max(losses) - min(losses)) / 2,
                "val_loss_per_seed": " / ".join(f"{x:.4f}" for x in losses),
                "val_loss_seeds": losses,
                "final_train_loss": _mean([r.final_train_loss for r in runs]),
                "final_val_ppl": math.exp(min(val, 50.0)),
                "lr_grid": ", ".join(f"{_lr_text(lr)}: {per_lr[lr]:.4f}" for lr in m.lrs),
                "update_proj_gap": m.choice.update_proj_gap if m.projected else None,
                "step_time_ms": 1000.0 * _mean([r.mean_step_time_s for r in runs]),
                "tokens_per_s": _mean([r.tokens_per_s for r in runs]),
                "optimizer_state_bytes": max(r.optimizer_state_bytes for r in runs),
                "optimizer_state_mib": max(r.optimizer_state_bytes for r in runs) / 2**20,
                "peak_memory_bytes": max(r.peak_memory_bytes for r in runs),
                "peak_memory_mib": max(r.peak_memory_bytes for r in runs) / 2**20,
            }
        )
    best_row = min(rows, key=lambda r: r["final_val_loss"])
    lo_best = best_row["final_val_loss"] + best_row["val_loss_spread"]
    for r in rows:
        r["vs_best"] = r["final_val_loss"] - best_row["final_val_loss"]
        if r is best_row:
            r["beyond_seed_spread"] = "best"
        elif len(protocol.seeds) < 2:
            r["beyond_seed_spread"] = "one seed"
        else:  # the two optimizers' ranges over the seeds do not overlap
            r["beyond_seed_spread"] = "yes" if r["final_val_loss"] - r["val_loss_spread"] > lo_best else "no"
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def protocol_text(config: TrainConfig, protocol: Protocol, methods: list[Method], peak_kind: str) -> str:
    seeds = ", ".join(map(str, protocol.seeds))
    lines = [
        f"model `{config.model}`, {config.steps} steps of {config.batch_size} x {config.seq_len} tokens "
        f"(x{config.grad_accum} accumulation), dtype {config.dtype}, {config.schedule} schedule; seeds {seeds} "
        "(model initialisation and batch order; every optimizer sees the same ones).",
        "",
        "Protocol:",
        "- each optimizer at its best lr by mean final validation loss over the seeds; the lrs tried are in "
        "'val loss per lr' (from: grid = "
        f"{protocol.lr_grid} values on the 1-3-10 ladder around the optimizer's default; spec / --lr = given).",
    ]
    if protocol.embed_lr is not None:
        lines.append(
            f"- embeddings, norms and head train at lr {_lr_text(protocol.embed_lr)} for every optimizer (unless a "
            "spec sets embed_lr), the block matrices at the optimizer's lr (projected ones at lr x scale)."
        )
    else:
        lines.append("- every optimizer trains all its parameters at its one lr (no embed lr split).")
    if any(m.projected for m in methods):
        gap = protocol.update_proj_gap
        lines.append(
            f"- projected optimizers compute a new subspace every T = {gap} steps "
            f"({math.ceil(config.steps / gap)} bases per matrix over the run) unless a spec sets update_proj_gap."
        )
    lines += [
        "- val loss: mean over the seeds +- half their range; 'vs best' is the difference of means to the best "
        "optimizer, 'beyond seed spread' says whether the two ranges over the seeds are disjoint (only then is "
        "the difference resolved by this run).",
        f"- step time, tokens/s: means over the seeds at the best lr; peak memory is the {peak_kind}.",
    ]
    return "\n".join(lines)


def to_markdown(rows: list[dict[str, Any]], text: str) -> str:
    cols = [
        ("optimizer", "optimizer"),
        ("lr", "best lr"),
        ("val", "val loss"),
        ("val_loss_per_seed", "per seed"),
        ("vs", "vs best"),
        ("final_train_loss", "train loss"),
        ("lr_grid", "val loss per lr (from)"),
        ("update_proj_gap", "T"),
        ("step_time_ms", "step time (ms)"),
        ("tokens_per_s", "tokens/s"),
        ("optimizer_state_mib", "optimizer state (MiB)"),
        ("peak_memory_mib", "peak memory (MiB)"),
    ]
    lines = [
        text,
        "",
        "| " + " | ".join(title for _, title in cols) + " |",
        "|"
        + "|".join("---" if key in ("optimizer", "lr_grid", "val_loss_per_seed") else "---:" for key, _ in cols)
        + "|",
    ]
    for r in rows:
        cells = {
            **{k: _fmt(v) for k, v in r.items()},
            "lr": _lr_text(r["lr"]),
            "val": f"{r['final_val_loss']:.4f} ± {r['val_loss_spread']:.4f}",
            "vs": "best"
            if r["beyond_seed_spread"] == "best"
            else f"{r['vs_best']:+.4f}"
            + {"yes": " (beyond seed spread)", "no": " (within seed spread)", "one seed": " (one seed)"}[
                r["beyond_seed_spread"]
            ],
            "lr_grid": f"{r['lr_grid']} ({r['lr_source']})",
        }
        lines.append("| " + " | ".join(cells[key] for key, _ in cols) + " |")
    notes = [
        f"- {r['optimizer']}: the best lr is at the edge of the lrs tried; "
        + ("a wider grid (--lr-grid 5)" if r["lr_source"] == "grid" else "a wider list of lrs")
        + " may find a better one."
        for r in rows
        if r["lr_at_grid_edge"]
    ]
    unresolved = [r["optimizer"] for r in rows if r["beyond_seed_spread"] == "no"]
    if unresolved:
        notes.append(
            f"- not resolved by these seeds: {', '.join(unresolved)} against the best; more seeds (--seeds) may "
            "resolve them."
        )
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def to_csv(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    buf = io.StringIO()
    keys = list(columns) if columns is not None else [key for key, _ in COLUMNS]
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_") or "run"


def run_dir(out: Path, label: str, lr: float, seed: int) -> Path:
    """Where the run of ``label`` at ``lr`` and ``seed`` writes its files."""
    return out / _slug(label) / f"lr_{_lr_text(lr)}" / f"seed_{seed}"


# ------------------------------------------------------------------------------------------------ run
def compare(
    config: TrainConfig,
    specs: list[str],
    out_dir: str | Path | None = None,
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    lr_grid: int = DEFAULT_LR_GRID,
    embed_lr: float | None = DEFAULT_EMBED_LR,
    update_proj_gap: int | None = None,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> Comparison:
    """Train ``config`` for every spec, lr and seed of the protocol (module docstring) and tabulate.

    Every spec and option is validated (:func:`validate_specs`) before the first run starts. ``config.seed``
    is replaced by each of ``seeds``; ``update_proj_gap`` None: a quarter of the steps.
    """
    methods, protocol = validate_specs(
        config, specs, seeds=seeds, lr_grid=lr_grid, embed_lr=embed_lr, update_proj_gap=update_proj_gap
    )
    out = Path(out_dir) if out_dir is not None else None
    by_run: dict[tuple[str, float, int], RunResult] = {}
    runs: dict[str, RunResult] = {}
    run_rows = []
    runtime = make_runtime(config.device, config.parallel)  # one process group for all the runs
    try:
        for m in methods:
            for lr in m.lrs:
                for seed in protocol.seeds:
                    label = f"{m.label} lr={_lr_text(lr)} seed={seed}"
                    result = train(
                        replace(config, seed=seed, optimizer=replace(m.choice, lr=lr)),
                        out_dir=run_dir(out, m.label, lr, seed) if out is not None else None,
                        runtime=runtime,
                        progress=progress,
                        report=report,
                        label=label,
                        checkpoints=False,
                    )
                    by_run[m.label, lr, seed] = runs[label] = result
                    run_rows.append(
                        {
                            "optimizer": m.label,
                            "lr": lr,
                            "seed": seed,
                            "final_train_loss": result.final_train_loss,
                            "final_val_loss": result.final_val_loss,
                            "step_time_ms": 1000.0 * result.mean_step_time_s,
                            "optimizer_state_bytes": result.optimizer_state_bytes,
                        }
                    )
    finally:
        runtime.close()
    rows = _aggregate(methods, protocol, by_run)
    kind = next(iter(runs.values())).peak_memory_kind
    markdown = to_markdown(rows, protocol_text(config, protocol, methods, kind))
    curves = {r["optimizer"]: [by_run[r["optimizer"], r["lr"], s].history for s in protocol.seeds] for r in rows}
    comparison = Comparison(rows, runs, markdown, curves)
    if out is not None and runtime.is_main:
        from .compare_plots import try_plot_comparison

        (out / "results.md").write_text(markdown)
        (out / "results.csv").write_text(to_csv(rows))
        (out / "runs.csv").write_text(to_csv(run_rows, RUN_COLUMNS))
        try_plot_comparison(
            rows,
            curves,
            out / "comparison.png",
            title=f"{config.model}, {config.steps} steps, seeds {', '.join(map(str, protocol.seeds))}",
        )
    return comparison
