"""PNG plots of DP training: the privacy-loss curve over training, and accuracy against epsilon.

Both draw on an Agg canvas (matplotlib's global backend is left alone) and are written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from veil.dp.train import EpochRecord
from veil.plotting import figure, save_png


def plot_privacy_curve(history: Sequence[EpochRecord], path: str | Path, *, delta: float,
                       target_epsilon: float | None = None, title: str = "privacy loss over training") -> Path:
    """Spent epsilon (both accountants) after every epoch, with the test accuracy on a second axis."""
    if not history:
        raise ValueError("plot_privacy_curve needs at least one epoch of history")
    fig = figure(6.4, 4.2)
    ax = fig.add_subplot()
    epochs = [r.epoch for r in history]
    ax.plot(epochs, [r.epsilon_prv for r in history], "o-", ms=3, label="epsilon (PRV accountant)")
    ax.plot(epochs, [r.epsilon_rdp for r in history], "s--", ms=3, label="epsilon (RDP accountant)")
    if target_epsilon is not None:
        ax.axhline(target_epsilon, color="grey", lw=1, ls=":", label=f"target {target_epsilon:g}")
    ax.set(xlabel="epoch", ylabel=f"epsilon spent (delta = {delta:g})", title=title)
    ax.grid(alpha=0.3)
    accs = [r.test_accuracy for r in history]
    if all(a is not None for a in accs):
        ax2 = ax.twinx()
        ax2.plot(epochs, [100 * a for a in accs if a is not None], color="tab:green", lw=1.5, label="test accuracy")
        ax2.set_ylabel("test accuracy (%)", color="tab:green")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="center right")
    else:
        ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_accuracy_vs_epsilon(runs: Sequence[Mapping[str, Any]], path: str | Path, *,
                             references: Sequence[Mapping[str, Any]] = (), non_private: float | None = None,
                             title: str = "test accuracy against epsilon") -> Path:
    """``runs``: dicts with ``epsilon`` and ``test_accuracy`` (and optional ``label``), one point each,
    joined per label; ``references``: published points (``epsilon``, ``test_accuracy``, ``label``)."""
    if not runs:
        raise ValueError("plot_accuracy_vs_epsilon needs at least one run")
    fig = figure(6.0, 4.2)
    ax = fig.add_subplot()
    by_label: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        point = (float(r["epsilon"]), 100 * float(r["test_accuracy"]))
        by_label.setdefault(str(r.get("label", "Veil")), []).append(point)
    for label, pts in by_label.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        for e, a in pts:
            ax.annotate(f"{a:.2f}%", (e, a), textcoords="offset points", xytext=(4, -10), fontsize=7)
    refs: dict[str, list[tuple[float, float]]] = {}
    for ref in references:
        refs.setdefault(str(ref["label"]), []).append((float(ref["epsilon"]), 100 * float(ref["test_accuracy"])))
    for label, pts in refs.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "x", ms=7, label=label)
    if non_private is not None:
        ax.axhline(100 * non_private, color="grey", ls=":", lw=1, label=f"non-private {100 * non_private:.2f}%")
    ax.set_xscale("log")
    ax.set(xlabel="epsilon (log scale)", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path)


def plot_privacy_curves(histories: Mapping[str, Sequence[EpochRecord]], path: str | Path, *, delta: float) -> Path:
    """Several runs' epsilon (configured accountant) against epoch on one axis."""
    if not histories:
        raise ValueError("plot_privacy_curves needs at least one run")
    fig = figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name, history in histories.items():
        ax.plot([r.epoch for r in history], [r.epsilon for r in history], "o-", ms=2, label=name)
    ax.set(xlabel="epoch", ylabel=f"epsilon spent (delta = {delta:g})", title="privacy loss over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)
