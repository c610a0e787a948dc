"""PATE's labelling step: answer public queries from teacher votes by LNMax, GNMax or Confident GNMax,
and account for it (see :mod:`veil.dp.pate_training` for the recipe and :mod:`veil.dp.pate` for the math)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from veil.dp.composition import validate_delta, validate_epsilon
from veil.dp.pate import (
    DEFAULT_ORDERS,
    confident_gnmax,
    gnmax_aggregate,
    gnmax_rdp_data_dependent,
    gnmax_rdp_data_independent,
    lnmax_aggregate,
    lnmax_epsilon,
    rdp_to_dp,
    vote_histograms,
)
from veil.randomness import numpy_rng

Aggregator = Literal["gnmax", "lnmax", "confident-gnmax"]
Data = npt.ArrayLike | torch.Tensor


def _labels(y: Data, n: int, name: str, num_classes: int | None = None) -> torch.Tensor:
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array of {n} labels (one per example), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise ValueError(f"{name} must hold integer class labels; convert with .astype(int)")
    arr = arr.astype(np.int64)
    top = num_classes if num_classes is not None else np.iinfo(np.int64).max
    if arr.size and (arr.min() < 0 or arr.max() >= top):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{name} out of range: labels must be {bound}, got min {arr.min()} and max {arr.max()}")
    return torch.from_numpy(arr)


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True, eq=False)
class PateLabels:
    """Noisy labels for the answered public queries, and what they cost.

    ``indices`` index the public set (its first ``num_asked`` rows were asked); ``labels[i]`` is the
    noisy label of ``x_public[indices[i]]``. ``plurality_agreement`` is the fraction of answered
    labels equal to the teachers' plurality vote; ``true_accuracy`` the fraction equal to the true
    labels (None when none were given; both None when no query was answered). Epsilons hold at
    ``delta`` (0 for LNMax); ``orders`` are the Renyi orders of the conversion (empty for LNMax).
    Read the module docstring before publishing ``epsilon_data_dependent``: it is not itself private."""

    aggregator: Aggregator
    num_classes: int
    indices: npt.NDArray[np.int64]
    labels: npt.NDArray[np.int64]
    num_asked: int
    num_answered: int
    plurality_agreement: float | None
    true_accuracy: float | None
    epsilon_data_independent: float
    epsilon_data_dependent: float
    delta: float
    orders: npt.NDArray[np.float64]
    params: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-query arrays)."""
        return {"aggregator": self.aggregator, "num_classes": self.num_classes, "num_asked": self.num_asked,
                "num_answered": self.num_answered, "plurality_agreement": self.plurality_agreement,
                "true_accuracy": self.true_accuracy, "epsilon_data_independent": self.epsilon_data_independent,
                "epsilon_data_dependent": self.epsilon_data_dependent, "delta": self.delta, **self.params}


def _check_aggregator(aggregator: str, given: dict[str, float | None]) -> None:
    needs = {"gnmax": {"sigma"}, "lnmax": {"epsilon_per_query"}, "confident-gnmax": {"sigma", "threshold", "sigma1"}}
    if aggregator not in needs:
        raise ValueError(f"aggregator must be one of {sorted(needs)}, got {aggregator!r}")
    missing = sorted(k for k in needs[aggregator] if given[k] is None)
    extra = sorted(k for k, v in given.items() if v is not None and k not in needs[aggregator])
    problems = []
    if missing:
        problems.append(f"aggregator {aggregator!r} needs {', '.join(missing)} (missing)")
    if extra:
        problems.append(f"aggregator {aggregator!r} does not use {', '.join(extra)}; drop it or pick the "
                        "aggregator it belongs to")
    if problems:
        raise ValueError("; ".join(problems))


def label_public_data(teacher_preds: npt.ArrayLike, num_classes: int, *, aggregator: Aggregator = "gnmax",
                      sigma: float | None = None, epsilon_per_query: float | None = None,
                      threshold: float | None = None, sigma1: float | None = None, num_queries: int | None = None,
                      delta: float = 1e-5, true_labels: npt.ArrayLike | None = None,
                      orders: npt.ArrayLike | None = None, rng: np.random.Generator | None = None) -> PateLabels:
    """Answer the first ``num_queries`` (default: all) public queries from the (T, N) ``teacher_preds``.

    - ``"gnmax"`` (needs ``sigma``): argmax(n + N(0, sigma^2)); every query answered.
    - ``"lnmax"`` (needs ``epsilon_per_query``): argmax(n + Lap(2 / epsilon_per_query)); every query
      answered; epsilon = num_asked * epsilon_per_query, delta = 0.
    - ``"confident-gnmax"`` (needs ``threshold``, ``sigma1``, ``sigma``): answered iff
      max(n) + N(0, sigma1^2) >= threshold, then GNMax with sigma; rejected queries are dropped.
      RDP(alpha) = num_asked * alpha / (2 sigma1^2) + sum over answered of the GNMax RDP.

    Parameters an aggregator does not use are refused rather than silently ignored."""
    _check_aggregator(aggregator, {"sigma": sigma, "epsilon_per_query": epsilon_per_query,
                                   "threshold": threshold, "sigma1": sigma1})
    hist_all = vote_histograms(teacher_preds, num_classes)
    total = hist_all.shape[0]
    if total == 0:
        raise ValueError("the public set is empty: PATE needs unlabelled public examples to label")
    asked = total if num_queries is None else _positive_int(num_queries, "num_queries")
    if asked > total:
        raise ValueError(f"num_queries ({asked}) exceeds the number of public examples ({total})")
    truth = None if true_labels is None else _labels(true_labels, total, "true_labels", num_classes).numpy()
    hist = hist_all[:asked]
    delta = validate_delta(delta, allow_zero=False)
    gen = numpy_rng(rng)
    lam = np.atleast_1d(np.array(DEFAULT_ORDERS if orders is None else orders, dtype=np.float64))  # a copy
    params: dict[str, float] = {}
    if aggregator == "lnmax":
        assert epsilon_per_query is not None  # checked by _check_aggregator
        eps_q = validate_epsilon(epsilon_per_query, "epsilon_per_query")
        raw = lnmax_aggregate(hist, eps_q, gen)
        eps_indep = eps_dep = lnmax_epsilon(eps_q / 2.0, asked)
        delta, lam, params = 0.0, np.empty(0), {"epsilon_per_query": eps_q}
    else:
        assert sigma is not None  # checked by _check_aggregator
        sig = validate_epsilon(sigma, "sigma")
        rdp_fixed = np.zeros_like(gnmax_rdp_data_independent(sig, lam))  # also validates the orders
        params = {"sigma": sig}
        if aggregator == "gnmax":
            raw = gnmax_aggregate(hist, sig, gen)
        else:
            assert sigma1 is not None and threshold is not None  # checked by _check_aggregator
            s1 = validate_epsilon(sigma1, "sigma1")
            raw = confident_gnmax(hist, threshold, s1, sig, gen)
            rdp_fixed = asked * lam / (2.0 * s1**2)  # the threshold check, paid on every query asked
            params |= {"sigma1": s1, "threshold": float(threshold)}
        answered = np.flatnonzero(raw >= 0)
        indep = rdp_fixed + answered.size * gnmax_rdp_data_independent(sig, lam)
        dep = rdp_fixed + np.sum([gnmax_rdp_data_dependent(hist[i], sig, lam) for i in answered], axis=0)
        eps_indep, eps_dep = rdp_to_dp(indep, lam, delta), rdp_to_dp(dep, lam, delta)
    indices = np.flatnonzero(raw >= 0).astype(np.int64)
    labels = raw[indices].astype(np.int64)
    plurality = np.argmax(hist[indices], axis=1) if indices.size else np.empty(0, np.int64)
    agreement = float(np.mean(labels == plurality)) if indices.size else None
    accuracy = float(np.mean(labels == truth[indices])) if truth is not None and indices.size else None
    for arr in (indices, labels, lam):
        arr.setflags(write=False)
    return PateLabels(aggregator=aggregator, num_classes=int(num_classes), indices=indices, labels=labels,
                      num_asked=asked, num_answered=int(indices.size), plurality_agreement=agreement,
                      true_accuracy=accuracy, epsilon_data_independent=float(eps_indep),
                      epsilon_data_dependent=float(min(eps_dep, eps_indep)), delta=delta, orders=lam, params=params)
