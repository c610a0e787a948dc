"""PATE aggregation (Papernot et al. 2017, 2018) and its privacy analysis: numpy only, no training.

Teachers are trained on disjoint partitions of the private data, so one private record changes at
most one teacher's vote. Neighbouring vote histograms therefore differ by **one vote moved**: one
count goes down by 1 and another goes up by 1 (L1 sensitivity 2, L2 sensitivity sqrt(2)).

Aggregators (each query is one row of an (N, C) histogram array; labels are argmax of noisy counts):

- LNMax (Papernot et al. 2017): add Lap(1/gamma) to every count. Because a moved vote changes two
  counts, each query is (2 gamma, 0)-DP. ``lnmax_aggregate`` takes the per-query guarantee
  ``epsilon_per_query`` and uses gamma = epsilon_per_query / 2, i.e. Laplace scale
  2 / epsilon_per_query; ``lnmax_epsilon(gamma, k)`` = 2 gamma k is basic composition of k queries.
- GNMax (Papernot et al. 2018): add N(0, sigma^2) to every count.
- Confident GNMax (2018, Alg. 1): answer only if max count + N(0, sigma1^2) >= threshold, then
  GNMax with sigma2; rejected queries get label -1. (The threshold check's privacy cost is added by
  ``veil.dp.pate_labels.label_public_data``.)

Privacy (Renyi DP, Papernot et al. 2018):

- Data-independent (Prop. 8): GNMax is (alpha, alpha / sigma^2)-RDP for every alpha > 1 (Gaussian
  mechanism with L2 sensitivity sqrt(2): alpha * 2 / (2 sigma^2)).
- Data-dependent (Prop. 7 + Thm 6): q = P[answer != plurality] is bounded by the union bound
  q <= sum_{j != argmax} 0.5 erfc((n_max - n_j) / (2 sigma)), capped at 1 - 1/C. With the two
  auxiliary orders mu2 = sigma sqrt(ln(1/q)), mu1 = mu2 + 1 (Prop. 10), and when
  q <= e^{(mu2-1) eps2} / (mu1/(mu1-1) * mu2/(mu2-1))^{mu2} and q e^{eps2} < 1 (eps_i = mu_i/sigma^2),
  for every lambda < mu1:
      RDP(lambda) <= log((1-q) A^{lambda-1} + q B^{lambda-1}) / (lambda - 1),
      A = (1-q) / (1 - (q e^{eps2})^{(mu2-1)/mu2}),  B = e^{eps1} / q^{1/(mu1-1)}.
  The result is the minimum of this and the data-independent bound, order by order.
- Composition: RDP adds over queries; ``rdp_to_dp``: eps = min_alpha rdp(alpha) + ln(1/delta)/(alpha-1)
  (Mironov 2017, Prop. 3).

Caveat: the data-dependent epsilon is a function of the private votes; releasing it is not itself
private without the smooth-sensitivity step of Papernot et al. 2018 (Sec. 4.3), not done here.

Randomness: ``rng`` None draws a generator seeded with 128 bits from ``secrets``.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy.special import logsumexp
from scipy.stats import norm

from veil.dp.composition import validate_delta, validate_epsilon
from veil.randomness import numpy_rng

__all__ = [
    "DEFAULT_ORDERS",
    "confident_gnmax",
    "gnmax_aggregate",
    "gnmax_log_q_bound",
    "gnmax_q_bound",
    "gnmax_rdp_data_dependent",
    "gnmax_rdp_data_independent",
    "lnmax_aggregate",
    "lnmax_epsilon",
    "pate_epsilon",
    "rdp_to_dp",
    "vote_histograms",
]

#: Renyi orders used when none are given: fine near small orders, log-spaced up to 1e4.
DEFAULT_ORDERS: npt.NDArray[np.float64] = np.unique(np.concatenate((
    np.arange(1.25, 10.0, 0.25), np.arange(10.0, 100.0, 1.0), np.geomspace(100.0, 1e4, 400))))


def _histograms(histograms: npt.ArrayLike, ndim: int = 2) -> npt.NDArray[np.float64]:
    arr = np.asarray(histograms, dtype=np.float64)
    shape = "(num_queries, num_classes)" if ndim == 2 else "(num_classes,)"
    if arr.ndim != ndim or arr.shape[-1] < 1 or arr.size == 0:
        raise ValueError(f"histograms must have shape {shape} with num_classes >= 1, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("histograms must hold finite, non-negative counts")
    return arr


def _orders(orders: npt.ArrayLike | None) -> npt.NDArray[np.float64]:
    arr = DEFAULT_ORDERS if orders is None else np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 1):
        raise ValueError("orders must be a non-empty 1-D array of finite Renyi orders > 1")
    return arr


# --- aggregation -----------------------------------------------------------------------------

def vote_histograms(teacher_predictions: npt.ArrayLike, num_classes: int) -> npt.NDArray[np.int64]:
    """(T teachers, N queries) integer labels in [0, num_classes) -> (N, num_classes) vote counts."""
    preds = np.asarray(teacher_predictions)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if preds.ndim != 2 or preds.shape[0] < 1:
        raise ValueError(f"teacher_predictions must have shape (num_teachers, num_queries), got shape {preds.shape}")
    if preds.size and (not np.issubdtype(preds.dtype, np.integer)):
        if not (np.all(np.isfinite(preds)) and np.all(preds == np.round(preds))):
            raise ValueError("teacher_predictions must be integer class labels")
        preds = preds.astype(np.int64)
    if preds.size and (preds.min() < 0 or preds.max() >= num_classes):
        raise ValueError(f"teacher_predictions must lie in [0, {num_classes}), got values outside it")
    num_queries = preds.shape[1]
    flat = (np.arange(num_queries)[None, :] * num_classes + preds).ravel()
    return np.bincount(flat, minlength=num_queries * num_classes).reshape(num_queries, num_classes).astype(np.int64)


def lnmax_aggregate(histograms: npt.ArrayLike, epsilon_per_query: float,
                    rng: np.random.Generator | None = None) -> npt.NDArray[np.int64]:
    """LNMax: argmax of counts + Lap(1/gamma), gamma = epsilon_per_query / 2, so that each query is
    (epsilon_per_query, 0)-DP (a moved vote changes two counts by 1)."""
    gamma = validate_epsilon(epsilon_per_query, "epsilon_per_query") / 2.0
    hist = _histograms(histograms)
    noisy = hist + numpy_rng(rng).laplace(0.0, 1.0 / gamma, size=hist.shape)
    return np.argmax(noisy, axis=1).astype(np.int64)


def lnmax_epsilon(gamma: float, num_queries: int = 1) -> float:
    """Data-independent epsilon (delta = 0) of ``num_queries`` LNMax answers with Lap(1/gamma) noise:
    2 gamma per query (L1 sensitivity 2), added up by basic composition."""
    gamma = validate_epsilon(gamma, "gamma")
    if isinstance(num_queries, bool) or not isinstance(num_queries, int | np.integer) or num_queries < 0:
        raise ValueError(f"num_queries must be an integer >= 0, got {num_queries!r}")
    return 2.0 * gamma * int(num_queries)


def gnmax_aggregate(histograms: npt.ArrayLike, sigma: float,
                    rng: np.random.Generator | None = None) -> npt.NDArray[np.int64]:
    """GNMax: argmax of counts + N(0, sigma^2) per count, one label per row."""
    sigma = validate_epsilon(sigma, "sigma")
    hist = _histograms(histograms)
    noisy = hist + numpy_rng(rng).normal(0.0, sigma, size=hist.shape)
    return np.argmax(noisy, axis=1).astype(np.int64)


def confident_gnmax(histograms: npt.ArrayLike, threshold: float, sigma1: float, sigma2: float,
                    rng: np.random.Generator | None = None) -> npt.NDArray[np.int64]:
    """Confident GNMax: a query is answered iff max count + N(0, sigma1^2) >= threshold, then by GNMax
    with sigma2; rejected queries get -1."""
    sigma1 = validate_epsilon(sigma1, "sigma1")
    sigma2 = validate_epsilon(sigma2, "sigma2")
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    hist = _histograms(histograms)
    gen = numpy_rng(rng)
    answered = hist.max(axis=1) + gen.normal(0.0, sigma1, size=hist.shape[0]) >= threshold
    labels = gnmax_aggregate(hist, sigma2, gen)
    return np.where(answered, labels, -1).astype(np.int64)


# --- privacy analysis ------------------------------------------------------------------------

def gnmax_log_q_bound(histogram: npt.ArrayLike, sigma: float) -> float:
    """ln of the bound on q = P[GNMax answer != plurality] (Papernot et al. 2018, Prop. 7):
    q <= sum_{j != argmax} 0.5 erfc((n_max - n_j) / (2 sigma)), capped at 1 - 1/C."""
    sigma = validate_epsilon(sigma, "sigma")
    hist = _histograms(histogram, ndim=1)
    if hist.size == 1:
        return -math.inf
    top = int(np.argmax(hist))
    gaps = hist[top] - np.delete(hist, top)
    # 0.5 erfc(x / (2 sigma)) = P[N(0, 2 sigma^2) > x]
    logq = float(logsumexp(norm.logsf(gaps, scale=math.sqrt(2.0) * sigma)))
    return min(logq, math.log1p(-1.0 / hist.size))


def gnmax_q_bound(histogram: npt.ArrayLike, sigma: float) -> float:
    """The bound on q of ``gnmax_log_q_bound``, as a probability."""
    return math.exp(gnmax_log_q_bound(histogram, sigma))


def gnmax_rdp_data_independent(sigma: float, orders: npt.ArrayLike | None = None) -> npt.NDArray[np.float64]:
    """RDP of one GNMax query at each order: alpha / sigma^2 (Papernot et al. 2018, Prop. 8)."""
    sigma = validate_epsilon(sigma, "sigma")
    return _orders(orders) / sigma**2


def _log1mexp(x: float) -> float:
    """ln(1 - e^x) for x < 0, stable."""
    return math.log(-math.expm1(x)) if x > -math.log(2.0) else math.log1p(-math.exp(x))


def gnmax_rdp_data_dependent(histogram: npt.ArrayLike, sigma: float,
                             orders: npt.ArrayLike | None = None) -> npt.NDArray[np.float64]:
    """RDP of one GNMax query on this histogram at each order: Theorem 6 of Papernot et al. 2018 with
    the Prop. 7 bound on q where its conditions hold, else the data-independent alpha / sigma^2."""
    sigma = validate_epsilon(sigma, "sigma")
    lam = _orders(orders)
    logq = gnmax_log_q_bound(histogram, sigma)
    baseline = lam / sigma**2
    if logq == -math.inf:  # a single class: the output is fixed
        return np.zeros_like(baseline)
    var = sigma**2
    mu2 = math.sqrt(var * -logq)
    mu1 = mu2 + 1.0
    if mu2 <= 1.0:
        return baseline
    eps1, eps2 = mu1 / var, mu2 / var
    log_cap = (mu2 - 1.0) * eps2 - mu2 * (math.log1p(1.0 / (mu1 - 1.0)) + math.log1p(1.0 / (mu2 - 1.0)))
    if not (logq <= log_cap and -logq > eps2):
        return baseline
    log1q = _log1mexp(logq)
    log_a = log1q - _log1mexp((logq + eps2) * (1.0 - 1.0 / mu2))
    log_b = eps1 - logq / (mu1 - 1.0)
    log_s = np.logaddexp(log1q + (lam - 1.0) * log_a, logq + (lam - 1.0) * log_b)
    bound = np.minimum(baseline, log_s / (lam - 1.0))
    return np.where(lam < mu1, bound, baseline)


def rdp_to_dp(rdp: npt.ArrayLike, orders: npt.ArrayLike, delta: float) -> float:
    """(eps, delta)-DP from an RDP curve: eps = min_alpha rdp(alpha) + ln(1/delta)/(alpha - 1)
    (Mironov 2017, Prop. 3)."""
    delta = validate_delta(delta, allow_zero=False)
    lam = _orders(orders)
    curve = np.atleast_1d(np.asarray(rdp, dtype=np.float64))
    if curve.shape != lam.shape:
        raise ValueError(f"rdp and orders must have the same shape, got {curve.shape} and {lam.shape}")
    if np.any(np.isnan(curve)) or np.any(curve < 0):
        raise ValueError("rdp must be non-negative and not NaN")
    return float(np.min(curve + math.log(1.0 / delta) / (lam - 1.0)))


def pate_epsilon(histograms: npt.ArrayLike, sigma: float, delta: float,
                 orders: npt.ArrayLike | None = None, data_dependent: bool = True) -> float:
    """Epsilon at ``delta`` of GNMax answering every row of ``histograms`` (N, C): per-query RDP
    (data-dependent by default, see the module caveat) summed over queries, then ``rdp_to_dp``."""
    sigma = validate_epsilon(sigma, "sigma")
    delta = validate_delta(delta, allow_zero=False)
    hist = _histograms(histograms)
    lam = _orders(orders)
    if data_dependent:
        total = np.sum([gnmax_rdp_data_dependent(row, sigma, lam) for row in hist], axis=0)
    else:
        total = hist.shape[0] * gnmax_rdp_data_independent(sigma, lam)
    return rdp_to_dp(total, lam, delta)
