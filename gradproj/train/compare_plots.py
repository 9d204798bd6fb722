"""The plot of ``gradproj compare``: final losses with their seed ranges beside the smoothed mean curves.

Left: one bar per optimizer, its mean final validation loss at its best lr, the error bar spanning its
seeds' range; the axis starts near the lowest loss, so end-of-training gaps are visible. Right: the mean
over seeds of the smoothed training loss (a band over the seeds' range) and the mean validation loss
(dots) per optimizer, the y-range focused on the last three quarters of training. One legend entry per
optimizer, outside the axes. matplotlib's Agg backend, imported only when a plot is written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("gradproj")


def smooth(values: Sequence[float], span: float = 0.04) -> list[float]:
    """Exponential moving average over about ``span`` of the run (at least 5 steps), bias-corrected at the start."""
    beta = 1.0 - 1.0 / max(5.0, span * len(values))
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = beta * avg + (1 - beta) * v
        weight = beta * weight + (1 - beta)
        out.append(avg / weight)
    return out


def _mean_curve(histories: Sequence[Sequence[Mapping[str, Any]]], key: str) -> tuple[list[int], list[list[float]]]:
    """Steps where every history has ``key``, and each history's values there."""
    common = set.intersection(*({r["step"] for r in h if key in r} for h in histories))
    steps = sorted(common)
    per_run = [
        [v for _, v in sorted((r["step"], r[key]) for r in h if key in r and r["step"] in common)] for h in histories
    ]
    return steps, per_run


def focus_range(curves: Sequence[Sequence[float]], start_fraction: float = 0.25) -> tuple[float, float]:
    """A y-range holding every curve from ``start_fraction`` of its length on, with a 5 % margin."""
    tails = [v for c in curves for v in c[int(start_fraction * (len(c) - 1)) :]]
    lo, hi = min(tails), max(tails)
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 0.05
    return lo - pad, hi + pad


def plot_comparison(
    rows: Sequence[Mapping[str, Any]],
    curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    path: str | Path | None = None,
    title: str = "",
):
    """Draw (and with ``path`` write as PNG) the comparison figure; returns the matplotlib Figure."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("comparison plots need matplotlib: pip install 'gradproj[plot]'") from err

    fig = Figure(figsize=(12, 4.4), dpi=120)
    FigureCanvasAgg(fig)  # render with Agg without touching pyplot's global backend
    bars, lines = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    names = [r["optimizer"] for r in rows]
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}

    # final validation loss, mean +- the seeds' range
    means = [r["final_val_loss"] for r in rows]
    seeds = [list(r["val_loss_seeds"]) for r in rows]
    # the mean of one seed's loss can differ from it in the last bit: no negative whisker
    whiskers = [
        [max(0.0, m - min(s)) for m, s in zip(means, seeds)],
        [max(0.0, max(s) - m) for m, s in zip(means, seeds)],
    ]
    ypos = list(range(len(rows)))[::-1]
    lo = min(min(s) for s in seeds)
    hi = max(max(s) for s in seeds)
    pad = 0.15 * (hi - lo) if hi > lo else 0.01 * abs(hi) or 0.01
    base = lo - 2 * pad  # the bars start just left of the lowest seed: their lengths show the gaps
    bars.barh(
        ypos,
        [m - base for m in means],
        left=base,
        xerr=whiskers,
        color=[colors[n] for n in names],
        alpha=0.75,
        capsize=4,
        error_kw={"lw": 1.2},
    )
    for y, m, r in zip(ypos, means, rows):
        bars.text(m, y + 0.28, f" {m:.3f} (lr {r['lr']:.3g})", va="center", fontsize=7)
    bars.set_yticks(ypos, names, fontsize=8)
    bars.set_xlim(base, hi + 4 * pad)
    bars.set_xlabel("final validation loss (bars: mean over seeds; whiskers: range)")
    bars.grid(axis="x", alpha=0.3)

    # smoothed training loss: mean over seeds, band over seeds; validation: dots
    shown = []  # what the y-range must hold: the mean curves and the validation means
    for name in names:
        histories = curves[name]
        steps, per_run = _mean_curve(histories, "loss")
        smoothed = [smooth(v) for v in per_run]
        mean = [sum(col) / len(col) for col in zip(*smoothed)]
        shown.append(mean)
        lines.plot(steps, mean, color=colors[name], lw=1.6, label=name)
        if len(smoothed) > 1:
            band = list(zip(*smoothed))
            lines.fill_between(steps, [min(c) for c in band], [max(c) for c in band], color=colors[name], alpha=0.15)
        vsteps, vals = _mean_curve(histories, "val_loss")
        if vsteps:
            val_mean = [sum(c) / len(c) for c in zip(*vals)]
            lines.plot(vsteps, val_mean, "o", color=colors[name], ms=3.5)
            shown.append(val_mean)
    ymin, ymax = focus_range(shown)
    lines.set_ylim(ymin, ymax)
    lines.set_xlabel("step")
    lines.set_ylabel("loss (nats per token)")
    lines.set_title("training loss (smoothed, mean over seeds; band: range), validation (dots)", fontsize=8)
    lines.grid(alpha=0.3)
    lines.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(Path(path), bbox_inches="tight")
    return fig


def try_plot_comparison(
    rows: Sequence[Mapping[str, Any]],
    curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    path: str | Path,
    title: str = "",
) -> Path | None:
    """:func:`plot_comparison` to ``path``, or a logged warning (and None) when matplotlib is not installed."""
    try:
        plot_comparison(rows, curves, path, title)
    except ImportError as err:
        log.warning("gradproj: no %s written: %s", Path(path).name, err)
        return None
    return Path(path)
