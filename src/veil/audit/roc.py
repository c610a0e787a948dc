"""From attack scores to audit figures: ROC curve, AUC, advantage, TPR at low FPR, and the empirical
lower bound on epsilon that an attack's error rates imply.

Convention: an attack gives each example a score, higher meaning "more likely a member", and
predicts *member* when ``score >= t`` for a threshold t. Over n nonmembers and m members,

    FPR(t) = #{nonmembers with score >= t} / n        (false positives: nonmembers called members)
    FNR(t) = #{members with score < t} / m            (false negatives: members called nonmembers)
    TPR(t) = 1 - FNR(t).

The ROC curve is (FPR(t), TPR(t)) over all t; the AUC is its area, equal to the probability that a
random member scores above a random nonmember (ties count 1/2): 0.5 is chance, 1.0 perfect. The
membership advantage (Yeom et al. 2018) is max_t TPR(t) - FPR(t).

Why error rates bound epsilon (Kairouz et al. 2015; Jagielski et al. 2020; Nasr et al. 2021): the
test "is this example in the training set?" is a hypothesis test between neighbouring data sets. If
training is (epsilon, delta)-DP then for every rejection region S, P[S | D] <= e^eps P[S | D'] + delta
in both directions, which for the test's error rates reads

    FPR + e^eps FNR >= 1 - delta      and      FNR + e^eps FPR >= 1 - delta,

so any attack with observed rates FPR, FNR certifies

    eps >= max( log((1 - delta - FPR) / FNR),  log((1 - delta - FNR) / FPR) ).

Observed rates are estimates; to make the bound hold with confidence 1 - alpha we replace each rate
by its Clopper-Pearson upper bound (exact binomial; each one-sided at level 1 - alpha/2, which is the
upper end of the two-sided 1 - alpha interval, so by a union bound both hold at once with probability
>= 1 - alpha). A term whose numerator is <= 0 implies nothing; the bound is never below 0.

The threshold must not be chosen on the data that evaluates it: picking the t that maximises the
bound over the same examples selects for lucky noise and overstates epsilon. :func:`split_epsilon`
chooses t on one random half of the members and nonmembers and evaluates on the other half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import beta

from veil.dp.composition import validate_delta
from veil.randomness import numpy_rng

__all__ = ["AttackResult", "EpsilonAudit", "attack_result", "clopper_pearson_upper", "epsilon_lower_bound",
           "split_epsilon"]

FloatArray = npt.NDArray[np.float64]


def _confidence(confidence: float) -> float:
    value = float(confidence)
    if not 0.0 < value < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    return value


def clopper_pearson_upper(errors: npt.ArrayLike, trials: npt.ArrayLike, *, confidence: float = 0.95) -> FloatArray:
    """Upper end of the two-sided Clopper-Pearson ``confidence`` interval for a binomial rate.

    With k errors in n trials and alpha = 1 - confidence, the bound is the (1 - alpha/2) quantile of
    Beta(k + 1, n - k), and 1 when k = n; for k = 0 it is 1 - (alpha/2)^(1/n). It is exact: the true
    rate exceeds it with probability at most alpha/2. Vectorised over ``errors`` and ``trials``."""
    k = np.asarray(errors, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError("Clopper-Pearson needs 0 <= errors <= trials and trials >= 1")
    alpha = 1.0 - _confidence(confidence)
    with np.errstate(invalid="ignore"):
        upper = beta.ppf(1.0 - alpha / 2, k + 1, np.maximum(n - k, 1e-300))
    return np.asarray(np.where(k >= n, 1.0, upper), dtype=np.float64)


def _bound_from_rates(fpr: FloatArray, fnr: FloatArray, delta: float) -> FloatArray:
    """max(log((1-delta-FPR)/FNR), log((1-delta-FNR)/FPR), 0), elementwise; 0 where nothing is implied."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where((1 - delta - fpr > 0) & (fnr > 0), np.log(np.maximum(1 - delta - fpr, 1e-300) / fnr), 0.0)
        b = np.where((1 - delta - fnr > 0) & (fpr > 0), np.log(np.maximum(1 - delta - fnr, 1e-300) / fpr), 0.0)
    return np.asarray(np.maximum(np.maximum(a, b), 0.0), dtype=np.float64)


def epsilon_lower_bound(false_positives: int, nonmembers: int, false_negatives: int, members: int, *,
                        delta: float = 0.0, confidence: float = 0.95) -> float:
    """The epsilon that any (epsilon, ``delta``)-DP training must have, given one threshold's errors.

    ``false_positives`` of ``nonmembers`` were called members, ``false_negatives`` of ``members`` were
    called nonmembers. With FPR+ and FNR+ the Clopper-Pearson upper bounds of the two rates (see
    :func:`clopper_pearson_upper`), the result is

        max(0, log((1 - delta - FPR+) / FNR+), log((1 - delta - FNR+) / FPR+)),

    valid with probability >= ``confidence``. It is 0.0 when the attack is no better than chance at
    this sample size. The threshold that produced the counts must have been chosen on other data
    (:func:`split_epsilon` does this); otherwise the bound is optimistic."""
    delta = validate_delta(delta)
    if members < 1 or nonmembers < 1:
        raise ValueError(f"need at least one member and one nonmember, got members={members}, "
                         f"nonmembers={nonmembers}")
    if not (0 <= false_positives <= nonmembers and 0 <= false_negatives <= members):
        raise ValueError(f"counts out of range: false_positives={false_positives} of {nonmembers} nonmembers, "
                         f"false_negatives={false_negatives} of {members} members")
    fpr = clopper_pearson_upper(false_positives, nonmembers, confidence=confidence)
    fnr = clopper_pearson_upper(false_negatives, members, confidence=confidence)
    return float(_bound_from_rates(fpr, fnr, delta))


def _counts_at(thresholds: FloatArray, member_scores: FloatArray,
               nonmember_scores: FloatArray) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """For each t: (#nonmembers with score >= t, #members with score < t)."""
    non_sorted, mem_sorted = np.sort(nonmember_scores), np.sort(member_scores)
    fp = len(non_sorted) - np.searchsorted(non_sorted, thresholds, side="left")
    fn = np.searchsorted(mem_sorted, thresholds, side="left")
    return fp.astype(np.int64), fn.astype(np.int64)


@dataclass(frozen=True)
class EpsilonAudit:
    """A threshold chosen on the selection half and the bound it certifies on the evaluation half."""

    epsilon_lower_bound: float
    threshold: float
    false_positives: int
    nonmembers: int
    false_negatives: int
    members: int
    delta: float
    confidence: float


def split_epsilon(member_scores: npt.ArrayLike, nonmember_scores: npt.ArrayLike, *, delta: float = 0.0,
                  confidence: float = 0.95, rng: np.random.Generator | None = None) -> EpsilonAudit:
    """Empirical epsilon lower bound from attack scores, with the threshold chosen on held-out data.

    1. Split members and nonmembers each into two random halves (``rng``; default seeded from
       ``secrets``): a selection half and an evaluation half.
    2. On the selection half, for every candidate threshold t (each distinct selection score, and
       +inf), compute the Clopper-Pearson bound of :func:`epsilon_lower_bound`; keep the best t.
    3. Count the errors of that t on the evaluation half and return their bound.

    Step 3 sees data that played no part in choosing t, so the bound keeps its ``confidence``;
    choosing t on the same examples would overstate it. Needs >= 2 members and >= 2 nonmembers."""
    delta = validate_delta(delta)
    confidence = _confidence(confidence)
    mem = np.asarray(member_scores, dtype=np.float64).ravel()
    non = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if len(mem) < 2 or len(non) < 2:
        raise ValueError(f"the epsilon bound needs >= 2 members and >= 2 nonmembers (the threshold is chosen on "
                         f"one half and evaluated on the other), got {len(mem)} and {len(non)}")
    if not (np.all(np.isfinite(mem)) and np.all(np.isfinite(non))):
        raise ValueError("attack scores must be finite (no NaN or inf)")
    gen = numpy_rng(rng)
    pm, pn = gen.permutation(len(mem)), gen.permutation(len(non))
    mem_sel, mem_eval = mem[pm[: len(mem) // 2]], mem[pm[len(mem) // 2:]]
    non_sel, non_eval = non[pn[: len(non) // 2]], non[pn[len(non) // 2:]]
    candidates = np.append(np.unique(np.concatenate([mem_sel, non_sel])), np.inf)
    fp, fn = _counts_at(candidates, mem_sel, non_sel)
    bounds = _bound_from_rates(clopper_pearson_upper(fp, len(non_sel), confidence=confidence),
                               clopper_pearson_upper(fn, len(mem_sel), confidence=confidence), delta)
    t = float(candidates[int(np.argmax(bounds))])
    fp_e, fn_e = _counts_at(np.array([t]), mem_eval, non_eval)
    eps = epsilon_lower_bound(int(fp_e[0]), len(non_eval), int(fn_e[0]), len(mem_eval), delta=delta,
                              confidence=confidence)
    return EpsilonAudit(eps, t, int(fp_e[0]), len(non_eval), int(fn_e[0]), len(mem_eval), delta, confidence)


@dataclass(frozen=True)
class AttackResult:
    """One membership attack's figures. AUC, advantage and TPR at 1% FPR are measured on all examples;
    ``epsilon_lower_bound`` comes from :func:`split_epsilon` (threshold chosen on half, bounded on the
    other half) at the given ``delta`` and ``confidence``. ``fpr``/``tpr`` are the ROC curve, kept out
    of the repr."""

    name: str
    auc: float
    advantage: float
    tpr_at_1pct_fpr: float
    epsilon_lower_bound: float
    threshold: float
    delta: float
    confidence: float
    members: int
    nonmembers: int
    fpr: FloatArray = field(repr=False, compare=False)
    tpr: FloatArray = field(repr=False, compare=False)

    def to_dict(self, *, roc: bool = False) -> dict[str, Any]:
        """JSON-ready figures; with ``roc=True`` also the curve as lists."""
        out: dict[str, Any] = {
            "name": self.name, "auc": self.auc, "advantage": self.advantage,
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr, "epsilon_lower_bound": self.epsilon_lower_bound,
            "threshold": self.threshold if math.isfinite(self.threshold) else None,
            "delta": self.delta, "confidence": self.confidence,
            "members": self.members, "nonmembers": self.nonmembers,
        }
        if roc:
            out["fpr"], out["tpr"] = self.fpr.tolist(), self.tpr.tolist()
        return out


def _sklearn_metrics() -> Any:
    try:
        from sklearn import metrics
    except ImportError as e:
        raise ImportError("veil.audit needs scikit-learn for ROC curves and the shadow attack: install the data "
                          "extra, pip install 'veil[data]'") from e
    return metrics


def attack_result(name: str, member_scores: npt.ArrayLike, nonmember_scores: npt.ArrayLike, *, delta: float = 0.0,
                  confidence: float = 0.95, rng: np.random.Generator | None = None) -> AttackResult:
    """Score an attack: ROC (sklearn ``roc_curve``), AUC (``roc_auc_score``), advantage
    max_t TPR - FPR, the highest TPR with FPR <= 1%, and the held-out epsilon bound of
    :func:`split_epsilon`. Scores: higher means "member"."""
    mem = np.asarray(member_scores, dtype=np.float64).ravel()
    non = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    audit = split_epsilon(mem, non, delta=delta, confidence=confidence, rng=rng)
    metrics = _sklearn_metrics()
    labels = np.concatenate([np.ones(len(mem)), np.zeros(len(non))])
    scores = np.concatenate([mem, non])
    fpr, tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
    low = tpr[fpr <= 0.01]
    return AttackResult(
        name=name, auc=float(metrics.roc_auc_score(labels, scores)), advantage=float(np.max(tpr - fpr)),
        tpr_at_1pct_fpr=float(low.max()) if len(low) else 0.0, epsilon_lower_bound=audit.epsilon_lower_bound,
        threshold=audit.threshold, delta=audit.delta, confidence=audit.confidence, members=len(mem),
        nonmembers=len(non), fpr=np.asarray(fpr, dtype=np.float64), tpr=np.asarray(tpr, dtype=np.float64))
