"""Test-set evaluation of the M-209 key-recovery network: accuracies, breakdowns, plots, a JSON summary.

Given the network's ``(N, 131)`` pin probabilities and ``(N, 22, 28)`` lug-pair count probabilities
(``veil.m209.model.predict``) and the true keys:

* a pin is right when ``(p >= 0.5) == pin``; ``pin_accuracy`` is the mean over all N x 131 pins,
  ``pin_accuracy_per_wheel`` the mean over each wheel's pins (``WHEEL_STARTS``, ``WHEEL_SIZES``);
* a lug-pair count is right when the argmax over its 28 classes equals the true count;
  ``lug_accuracy`` is the mean over all N x 22 counts, ``lug_exact_fraction`` the keys with all 22 right;
* ``by_overlaps`` and ``by_non_shared`` break these down by the number of bars with two lugs and the number
  of bars with one lug (the counts of pairs ``(0, k)``, k = 1..6: ``lugs[:, 1:7].sum(1)``); their keys are
  the counts as strings, so the summary is JSON as it stands (``write_summary``).

Plots (``plot_test``, ``plot_accuracy_vs_letters``) need the ``plots`` extra (matplotlib); they draw on the
Agg canvas without pyplot's global state and write each PNG atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.files import write_atomic
from veil.m209.dataset import PackedSet
from veil.m209.machine import LUG_PAIRS, NUM_BARS, NUM_PINS, NUM_WHEELS, WHEEL_SIZES, WHEEL_STARTS
from veil.plotting import figure, save_png

LUG_CLASSES = NUM_BARS + 1  # a lug-pair count is 0..27
#: Per-key pin accuracy histogram: [0, 0.5), then 20 bins of 0.025 up to 1.0 (the last one closed).
HISTOGRAM_EDGES: tuple[float, ...] = (0.0, *(0.5 + 0.025 * i for i in range(21)))
#: Wheel 1 pin accuracy reported by the HistoCrypt 2024 study, by number of known-plaintext letters.
HISTOCRYPT_2024_WHEEL1: dict[int, float] = {52: 0.719, 104: 0.884, 200: 0.967}
_OVERLAP_PAIRS = slice(1 + NUM_WHEELS, len(LUG_PAIRS))  # (j, k), 1 <= j < k: bars with two lugs
_SINGLE_PAIRS = slice(1, 1 + NUM_WHEELS)  # (0, k): bars with one lug


def _array(name: str, value: Any, shape: tuple[int | None, ...], problems: list[str]) -> npt.NDArray[Any] | None:
    """``value`` as an array of ``shape`` (None: any length), or None after noting the problem."""
    arr = np.asarray(value)
    want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
    if arr.ndim != len(shape) or any(s is not None and a != s for a, s in zip(arr.shape, shape)):
        problems.append(f"{name}: expected shape {want}, got {arr.shape}")
        return None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        problems.append(f"{name}: expected numbers, got dtype {arr.dtype}")
        return None
    return arr


def _inputs(pin_probs: Any, lug_probs: Any, data: PackedSet | None, pins: Any, lugs: Any, overlaps: Any,
            letters: int | None) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any],
                                          npt.NDArray[Any], int]:
    """Validated ``(pin_probs, lug_probs, pins, lugs, overlaps)`` and ``letters``; every problem in one error."""
    given = [n for n, v in (("pins", pins), ("lugs", lugs), ("overlaps", overlaps), ("letters", letters))
             if v is not None]
    if data is not None:
        if given:
            raise ValueError(f"evaluate_predictions: pass either data or {', '.join(given)}, not both")
        pins, lugs, overlaps = data.pins, data.lugs, data.overlaps
        letters = int(data.meta["letters"]) if "letters" in data.meta else int(data.keystream.shape[1])
    elif len(given) < 4:
        raise ValueError("evaluate_predictions: without data, pass all of pins=, lugs=, overlaps= and letters=")
    problems: list[str] = []
    pp = _array("pin_probs", pin_probs, (None, NUM_PINS), problems)
    lp = _array("lug_probs", lug_probs, (None, len(LUG_PAIRS), LUG_CLASSES), problems)
    pn = _array("pins", pins, (None, NUM_PINS), problems)
    lg = _array("lugs", lugs, (None, len(LUG_PAIRS)), problems)
    ov = _array("overlaps", overlaps, (None,), problems)
    for name, p in (("pin_probs", pp), ("lug_probs", lp)):
        if p is not None and not (np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()):
            problems.append(f"{name}: probabilities must be finite and in [0, 1] (found NaN, inf or out of range)")
    if pn is not None and not np.isin(pn, (0, 1)).all():
        problems.append("pins: values must be 0 or 1")
    if lg is not None and ((lg < 0).any() or (lg > NUM_BARS).any() or (lg.sum(1) != NUM_BARS).any()):
        problems.append(f"lugs: lug-pair counts must be 0..{NUM_BARS} and sum to {NUM_BARS} per key")
    elif lg is not None and ov is not None and lg.shape[0] == ov.shape[0] and \
            (lg[:, _OVERLAP_PAIRS].sum(1) != ov).any():
        problems.append("overlaps: must equal the lugs' overlap-pair counts, lugs[:, 7:].sum(1)")
    if not isinstance(letters, (int, np.integer)) or isinstance(letters, bool) or letters < 1:
        problems.append(f"letters: expected a positive int, got {letters!r}")
    sizes = {n: a.shape[0] for n, a in (("pin_probs", pp), ("lug_probs", lp), ("pins", pn), ("lugs", lg),
                                        ("overlaps", ov)) if a is not None}
    if len(set(sizes.values())) > 1:
        problems.append(f"the arrays disagree on N (the number of keys): {sizes}")
    elif sizes and not next(iter(sizes.values())):
        problems.append("no keys to evaluate (N = 0)")
    if problems:
        raise ValueError("evaluate_predictions: " + "; ".join(problems))
    assert pp is not None and lp is not None and pn is not None and lg is not None and ov is not None
    return pp, lp, pn.astype(bool), lg.astype(np.int64), ov.astype(np.int64), int(letters)  # type: ignore[arg-type]


def per_key_pin_accuracy(pin_probs: npt.ArrayLike, pins: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``(N,)``: the fraction of each key's 131 pins predicted right (probability >= 0.5 means effective)."""
    problems: list[str] = []
    pp = _array("pin_probs", pin_probs, (None, NUM_PINS), problems)
    pn = _array("pins", pins, (None, NUM_PINS), problems)
    if pp is not None and pn is not None and pp.shape != pn.shape:
        problems.append(f"pin_probs {pp.shape} and pins {pn.shape} disagree on N")
    if pp is not None and not np.isfinite(pp).all():
        problems.append("pin_probs: found NaN or inf")
    if problems:
        raise ValueError("per_key_pin_accuracy: " + "; ".join(problems))
    assert pp is not None and pn is not None
    return ((pp >= 0.5) == pn.astype(bool)).mean(axis=1)


def _group(pin_right: npt.NDArray[np.bool_], lug_right: npt.NDArray[np.bool_]) -> dict[str, Any]:
    return {"keys": len(pin_right), "pin_accuracy": float(pin_right.mean()),
            "lug_accuracy": float(lug_right.mean()), "keys_all_pins_right": float(pin_right.all(1).mean())}


def evaluate_predictions(pin_probs: npt.ArrayLike, lug_probs: npt.ArrayLike, data: PackedSet | None = None, *,
                         pins: npt.ArrayLike | None = None, lugs: npt.ArrayLike | None = None,
                         overlaps: npt.ArrayLike | None = None, letters: int | None = None) -> dict[str, Any]:
    """The JSON-ready summary described in the module docstring. The truth comes from ``data`` (a packed split;
    ``letters`` from its meta) or from all of ``pins`` (N, 131) 0/1, ``lugs`` (N, 22), ``overlaps`` (N,) and
    ``letters``. Raises ValueError listing every shape or value problem (NaN probabilities included)."""
    pp, lp, pn, lg, ov, n_letters = _inputs(pin_probs, lug_probs, data, pins, lugs, overlaps, letters)
    pin_right = (pp >= 0.5) == pn
    lug_right = lp.argmax(axis=2) == lg
    per_key = pin_right.mean(axis=1)
    non_shared = lg[:, _SINGLE_PAIRS].sum(1)
    counts, _ = np.histogram(per_key, bins=np.asarray(HISTOGRAM_EDGES))
    return {
        "keys": len(pp), "letters": n_letters,
        "pin_accuracy": float(pin_right.mean()),
        "pin_accuracy_per_wheel": [float(pin_right[:, s:s + n].mean()) for s, n in zip(WHEEL_STARTS, WHEEL_SIZES)],
        "keys_all_pins_right": float(pin_right.all(1).mean()),
        "lug_accuracy": float(lug_right.mean()),
        "lug_exact_fraction": float(lug_right.all(1).mean()),
        "by_overlaps": {str(v): _group(pin_right[ov == v], lug_right[ov == v]) for v in np.unique(ov)},
        "by_non_shared": {str(v): _group(pin_right[non_shared == v], lug_right[non_shared == v])
                          for v in np.unique(non_shared)},
        "per_key_pin_accuracy_histogram": {"edges": list(HISTOGRAM_EDGES), "counts": [int(c) for c in counts]},
    }


def write_summary(summary: dict[str, Any], path: str | Path) -> None:
    """``summary`` as JSON (indent 2, no NaN) to ``path``, atomically."""
    write_atomic(path, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())


def _of(summary: dict[str, Any]) -> str:
    return f"L = {summary['letters']} letters, {summary['keys']} keys"


def plot_test(summary: dict[str, Any], per_key_accuracy: npt.ArrayLike, out_dir: str | Path, *,
              prefix: str = "m209") -> list[Path]:
    """Three PNGs in ``out_dir``: ``{prefix}-pin-histogram.png`` (per-key pin accuracy),
    ``{prefix}-by-overlaps.png`` (pin and lug accuracy by overlaps, key counts on the bars) and
    ``{prefix}-per-wheel.png`` (pin accuracy per wheel). Returns their paths."""
    acc = np.asarray(per_key_accuracy, dtype=np.float64)
    if acc.shape != (summary["keys"],):
        raise ValueError(f"plot_test: per_key_accuracy: expected shape ({summary['keys']},) (the summary's keys), "
                         f"got {acc.shape}")
    out = Path(out_dir)
    paths = []

    fig = figure()
    ax = fig.add_subplot()
    edges = np.asarray(summary["per_key_pin_accuracy_histogram"]["edges"])
    counts, _ = np.histogram(acc, bins=edges)
    left, width = edges[:-1].copy(), np.diff(edges)
    left[0], width[0] = 0.5 - 2 * width[1], width[1]  # the "below 0.5" bin, as wide as the others, set apart
    ax.bar(left, counts, width=width, align="edge", edgecolor="black", color="tab:blue")
    ax.bar(left[:1], counts[:1], width=width[:1], align="edge", edgecolor="black", color="tab:red")
    ticks = np.linspace(0.6, 1.0, 5)
    ax.set_xticks([left[0] + width[0] / 2, *ticks], ["<0.5", *(f"{t:.1f}" for t in ticks)])
    ax.set_xlim(left[0] - 0.005, 1.005)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("pin accuracy per key (red: all keys below 0.5)")
    ax.set_ylabel("keys")
    ax.set_title(f"Per-key pin accuracy ({_of(summary)})")
    paths.append(save_png(fig, out / f"{prefix}-pin-histogram.png"))

    fig = figure(8.0, 4.5)
    ax = fig.add_subplot()
    groups = summary["by_overlaps"]
    xs = sorted(set(range(1, 13)) | {int(k) for k in groups})
    present = [x for x in xs if str(x) in groups]
    pin = [groups[str(x)]["pin_accuracy"] for x in present]
    lug = [groups[str(x)]["lug_accuracy"] for x in present]
    ax.bar(np.asarray(present) - 0.2, pin, width=0.4, label="pin accuracy", color="tab:blue")
    ax.bar(np.asarray(present) + 0.2, lug, width=0.4, label="lug-pair count accuracy", color="tab:orange")
    for x, p, g in zip(present, pin, lug):
        ax.annotate(str(groups[str(x)]["keys"]), (x, max(p, g)), xytext=(0, 2), textcoords="offset points",
                    ha="center", fontsize=8)
    ax.set_xticks(xs)
    ax.set_ylim(0, 1.2)
    ax.set_xlabel("overlaps (bars with two lugs); numbers above the bars: keys")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper center", ncols=2)
    ax.set_title(f"Accuracy by overlaps ({_of(summary)})")
    paths.append(save_png(fig, out / f"{prefix}-by-overlaps.png"))

    fig = figure()
    ax = fig.add_subplot()
    per_wheel = summary["pin_accuracy_per_wheel"]
    bars = ax.bar(range(1, NUM_WHEELS + 1), per_wheel, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.1%}" for v in per_wheel], fontsize=8)
    ax.set_xticks(range(1, NUM_WHEELS + 1), [f"{w + 1}\n({n} pins)" for w, n in enumerate(WHEEL_SIZES)])
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("wheel")
    ax.set_ylabel("pin accuracy")
    ax.set_title(f"Pin accuracy per wheel ({_of(summary)})")
    paths.append(save_png(fig, out / f"{prefix}-per-wheel.png"))
    return paths


def plot_accuracy_vs_letters(summaries: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Mean pin accuracy, overall and per wheel, against the number of letters L of each summary, with the
    HistoCrypt 2024 study's wheel-1 results as reference markers. One summary per L; returns ``path``."""
    if not summaries:
        raise ValueError("plot_accuracy_vs_letters: summaries: expected at least one summary, got none")
    runs = sorted(summaries, key=lambda s: s["letters"])
    ls = [s["letters"] for s in runs]
    if len(set(ls)) != len(ls):
        raise ValueError(f"plot_accuracy_vs_letters: summaries: expected one per number of letters, got L = {ls}")
    fig = figure(8.0, 5.0)
    ax = fig.add_subplot()
    ax.plot(ls, [s["pin_accuracy"] for s in runs], "o-", color="black", lw=2, label="all pins")
    for w in range(NUM_WHEELS):
        ax.plot(ls, [s["pin_accuracy_per_wheel"][w] for s in runs], ".--", lw=1,
                label=f"wheel {w + 1} ({WHEEL_SIZES[w]} pins)")
    ref = sorted(HISTOCRYPT_2024_WHEEL1.items())
    ax.plot([r[0] for r in ref], [r[1] for r in ref], "r*", ms=12, label="HistoCrypt 2024, wheel 1")
    ax.set_xlabel("known-plaintext letters L")
    ax.set_ylabel("mean pin accuracy")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    keys = sorted({s["keys"] for s in runs})
    n = f"{keys[0]} keys each" if len(keys) == 1 else "keys " + ", ".join(str(s["keys"]) for s in runs)
    ax.set_title(f"Pin accuracy against letters (L = {', '.join(map(str, ls))}; {n})")
    return save_png(fig, Path(path))
