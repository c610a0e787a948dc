"""Accuracy of the global model against the round, for one or several federated runs (PNG)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from veil.fl.simulate import FLResult
from veil.plotting import figure, save_png


def plot_accuracy_rounds(runs: Mapping[str, FLResult], path: str | Path, *, target: float | None = None,
                         title: str = "federated learning: test accuracy per round") -> Path:
    """One line per run (label -> result), test accuracy after each round; ``target`` as a dotted line."""
    if not runs or not any(r.rounds for r in runs.values()):
        raise ValueError("plot_accuracy_rounds needs at least one run with a completed round")
    fig = figure(6.4, 4.2)
    ax = fig.add_subplot()
    for label, result in runs.items():
        ax.plot([r.round for r in result.rounds], [100 * r.accuracy for r in result.rounds], "o-", ms=3, label=label)
    if target is not None:
        ax.axhline(100 * target, color="grey", lw=1, ls=":", label=f"target {100 * target:g}%")
    ax.set(xlabel="round", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_png(fig, path)
