"""Loss-curve plots (PNG, matplotlib's Agg backend, imported only when a plot is written)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _smooth(values: Sequence[float]) -> list[float]:
    """Exponential moving average over about 1/25 of the run, bias-corrected at the start."""
    beta = 1.0 - 1.0 / max(1.0, len(values) / 25)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = beta * avg + (1 - beta) * v
        weight = beta * weight + (1 - beta)
        out.append(avg / weight if weight > 0 else v)
    return out


def plot_losses(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str = "") -> Path:
    """One PNG with the training loss (faint: per step; bold: moving average) and the validation loss
    (markers) of every run, by step."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("loss plots need matplotlib: pip install matplotlib") from err

    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)  # render with Agg without touching pyplot's global backend
    ax = fig.add_subplot()
    for i, (name, history) in enumerate(runs.items()):
        color = f"C{i % 10}"
        steps = [r["step"] for r in history]
        losses = [r["loss"] for r in history]
        ax.plot(steps, losses, color=color, lw=0.6, alpha=0.3)
        ax.plot(steps, _smooth(losses), color=color, lw=1.6, label=f"{name} train (moving average)")
        val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o--", color=color, ms=4, lw=1, label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def try_plot_losses(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str = "") -> Path | None:
    """:func:`plot_losses`, or a logged warning (and None) when matplotlib is not installed."""
    try:
        return plot_losses(runs, path, title)
    except ImportError as err:
        import logging

        logging.getLogger("gradproj").warning("gradproj: no %s written: %s", Path(path).name, err)
        return None
