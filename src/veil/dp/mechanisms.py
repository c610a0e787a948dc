"""Differential-privacy mechanisms (Laplace, Gaussian, randomized response, exponential), query
sensitivities on bounded data, and private count/sum/mean.

A mechanism M is (epsilon, delta)-DP when for neighbouring data sets D, D' (one record apart)
and every set S of outputs, P[M(D) in S] <= e^epsilon P[M(D') in S] + delta. The sensitivity of a
query f is the most f can change between neighbours, Delta = max |f(D) - f(D')|; noise is scaled
to Delta / epsilon. Neighbours are "add or remove one record" unless a function says otherwise
(the mean with a public n uses "replace one record").

Why sensitivity stops the differencing attack: the count of patients with a disease, asked once
of everyone and once of everyone but Bob, differs by Bob's bit. Answered exactly, the difference
*is* Bob's bit. Answered by the Laplace mechanism, each answer carries noise of scale
Delta / epsilon = 1 / epsilon, and the two data sets are neighbours, so any outcome of the second
query is at most e^epsilon times likelier with Bob's bit 1 than 0: the difference tells almost
nothing. Asking again to average the noise away spends epsilon each time (see
``veil.dp.composition``), which is what an accountant limits. Clipping records to [lo, hi] is what
makes Delta finite for sums and means: without a bound one outlier could move the answer anywhere.

Randomness: every mechanism takes ``rng: np.random.Generator | None``; None draws a generator
seeded with 128 bits from ``secrets``. Never the ``random`` module, never a fixed default seed.
Floating-point noise has known side channels (Mironov 2012): this module claims no defence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy.optimize import brentq
from scipy.special import softmax
from scipy.stats import norm

from veil.dp.composition import PrivacyAccountant, validate_delta, validate_epsilon
from veil.randomness import numpy_rng

Noisy = float | npt.NDArray[np.float64]  # a float for a scalar value, else an array of the value's shape


def _finite_array(value: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return arr


def _bounds(lo: float, hi: float) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"bounds must be finite with lo < hi, got lo={lo!r}, hi={hi!r}")
    return lo, hi


def _bits(values: npt.ArrayLike, name: str) -> npt.NDArray[np.bool_]:
    arr = np.asarray(values)
    if arr.dtype != np.bool_ and not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must be booleans or 0/1 values")
    return arr.astype(np.bool_)


def _record(accountant: PrivacyAccountant | None, name: str, epsilon: float, delta: float = 0.0) -> None:
    if accountant is not None:
        accountant.record(name, epsilon, delta)


def _add_noise(arr: npt.NDArray[np.float64], noise: npt.NDArray[np.float64]) -> Noisy:
    out = arr + noise
    return float(out) if out.ndim == 0 else out


# --- Laplace ---------------------------------------------------------------------------------

def laplace_mechanism(value: npt.ArrayLike, sensitivity: float, epsilon: float,
                      rng: np.random.Generator | None = None, *,
                      accountant: PrivacyAccountant | None = None) -> Noisy:
    """value + Lap(b) noise per entry, b = sensitivity / epsilon: epsilon-DP (delta = 0) when
    ``sensitivity`` bounds the L1 change of ``value`` (the whole array) between neighbours."""
    epsilon = validate_epsilon(epsilon)
    scale = validate_epsilon(sensitivity, "sensitivity") / epsilon
    arr = _finite_array(value, "value")
    noise = numpy_rng(rng).laplace(0.0, scale, size=arr.shape)
    _record(accountant, "laplace", epsilon)
    return _add_noise(arr, noise)


# --- Gaussian --------------------------------------------------------------------------------

def gaussian_sigma_classic(sensitivity: float, epsilon: float, delta: float) -> float:
    """sigma = sqrt(2 ln(1.25/delta)) * sensitivity / epsilon (Dwork & Roth 2014, Thm A.1);
    (epsilon, delta)-DP only for epsilon < 1."""
    epsilon = validate_epsilon(epsilon)
    delta = validate_delta(delta, allow_zero=False)
    sensitivity = validate_epsilon(sensitivity, "sensitivity")
    if epsilon >= 1:
        raise ValueError(f"the classic Gaussian calibration needs epsilon < 1, got {epsilon!r}; "
                         "use gaussian_sigma_analytic (calibration='analytic'), valid for every epsilon > 0")
    return math.sqrt(2.0 * math.log(1.25 / delta)) * sensitivity / epsilon


def gaussian_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
    """The exact delta of the Gaussian mechanism N(0, sigma^2) at epsilon (Balle & Wang 2018, Thm 8):

    delta(sigma) = Phi(s/(2 sigma) - eps sigma/s) - e^eps Phi(-s/(2 sigma) - eps sigma/s).
    """
    a, b = sensitivity / (2.0 * sigma), epsilon * sigma / sensitivity
    return float(norm.cdf(a - b) - math.exp(epsilon + float(norm.logcdf(-a - b))))


def gaussian_sigma_analytic(sensitivity: float, epsilon: float, delta: float) -> float:
    """The smallest sigma for which N(0, sigma^2) noise is (epsilon, delta)-DP: the analytic Gaussian
    mechanism of Balle & Wang (2018), the root of ``gaussian_delta(sigma) = delta`` (decreasing in
    sigma), found by Brent's method on log sigma to ~1e-15 relative. Valid for every epsilon > 0."""
    epsilon = validate_epsilon(epsilon)
    delta = validate_delta(delta, allow_zero=False)
    sensitivity = validate_epsilon(sensitivity, "sensitivity")

    def excess(log_sigma: float) -> float:
        return gaussian_delta(math.exp(log_sigma), sensitivity, epsilon) - delta

    lo = hi = math.log(math.sqrt(2.0 * math.log(1.25 / delta)) * sensitivity / epsilon)
    while excess(lo) <= 0:
        lo -= 1.0
    while excess(hi) > 0:
        hi += 1.0
    return math.exp(brentq(excess, lo, hi, xtol=1e-15, rtol=1e-15))


def gaussian_mechanism(value: npt.ArrayLike, sensitivity: float, epsilon: float, delta: float,
                       rng: np.random.Generator | None = None, *,
                       calibration: Literal["analytic", "classic"] = "analytic",
                       accountant: PrivacyAccountant | None = None) -> Noisy:
    """value + N(0, sigma^2) noise per entry: (epsilon, delta)-DP when ``sensitivity`` bounds the L2
    change of ``value`` between neighbours. sigma from ``gaussian_sigma_analytic`` (default, tight,
    any epsilon) or ``gaussian_sigma_classic`` (epsilon < 1)."""
    if calibration == "analytic":
        sigma = gaussian_sigma_analytic(sensitivity, epsilon, delta)
    elif calibration == "classic":
        sigma = gaussian_sigma_classic(sensitivity, epsilon, delta)
    else:
        raise ValueError(f"calibration must be 'analytic' or 'classic', got {calibration!r}")
    arr = _finite_array(value, "value")
    noise = numpy_rng(rng).normal(0.0, sigma, size=arr.shape)
    _record(accountant, "gaussian", epsilon, delta)
    return _add_noise(arr, noise)


# --- Randomized response ---------------------------------------------------------------------

def keep_probability(epsilon: float) -> float:
    """p = e^eps / (1 + e^eps): the probability that randomized response reports the true bit."""
    return 1.0 / (1.0 + math.exp(-validate_epsilon(epsilon)))


def randomized_response(bits: npt.ArrayLike, epsilon: float, rng: np.random.Generator | None = None, *,
                        accountant: PrivacyAccountant | None = None) -> npt.NDArray[np.bool_]:
    """Report each bit truthfully with probability p = e^eps/(1+e^eps), flipped otherwise:
    epsilon-DP for each person's bit (p / (1 - p) = e^eps), local model (no trusted curator)."""
    p = keep_probability(epsilon)
    arr = _bits(bits, "bits")
    flip = numpy_rng(rng).random(arr.shape) >= p
    _record(accountant, "randomized_response", epsilon)
    return np.logical_xor(arr, flip)


@dataclass(frozen=True)
class ProportionEstimate:
    """An estimated proportion of ones and its (estimated) standard error."""

    proportion: float
    standard_error: float


def randomized_response_estimate(responses: npt.ArrayLike, epsilon: float) -> ProportionEstimate:
    """Unbiased estimate of the true proportion pi of ones from randomized responses.

    E[mean] = q + pi (p - q) with p = e^eps/(1+e^eps), q = 1 - p, so pi_hat = (mean - q) / (p - q);
    SE = sqrt(mean (1 - mean) / n) / (p - q): Warner's (1965) standard error for n respondents drawn
    from a population with proportion pi (it counts the sampling variance too; for a fixed set of
    respondents the variance is p q / (n (p - q)^2), a little smaller). pi_hat may fall outside
    [0, 1]: clipping would bias it.
    """
    p = keep_probability(epsilon)
    arr = _bits(responses, "responses")
    if arr.size == 0:
        raise ValueError("responses must hold at least one response")
    mean = float(np.mean(arr))
    gap = 2.0 * p - 1.0
    return ProportionEstimate(proportion=(mean - (1.0 - p)) / gap,
                              standard_error=math.sqrt(mean * (1.0 - mean) / arr.size) / gap)


# --- Exponential mechanism -------------------------------------------------------------------

def exponential_mechanism_probabilities(scores: npt.ArrayLike, sensitivity: float,
                                        epsilon: float) -> npt.NDArray[np.float64]:
    """P[i] proportional to exp(eps * score_i / (2 * sensitivity)), computed as a softmax (stable)."""
    epsilon = validate_epsilon(epsilon)
    sensitivity = validate_epsilon(sensitivity, "sensitivity")
    arr = _finite_array(scores, "scores")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {arr.shape}")
    return np.asarray(softmax(epsilon * arr / (2.0 * sensitivity)), dtype=np.float64)


def exponential_mechanism(scores: npt.ArrayLike, sensitivity: float, epsilon: float,
                          rng: np.random.Generator | None = None, *,
                          accountant: PrivacyAccountant | None = None) -> int:
    """Index i drawn with P[i] proportional to exp(eps * score_i / (2 * sensitivity)): epsilon-DP
    when ``sensitivity`` bounds each score's change between neighbours (McSherry & Talwar 2007)."""
    probs = exponential_mechanism_probabilities(scores, sensitivity, epsilon)
    index = int(numpy_rng(rng).choice(probs.size, p=probs))
    _record(accountant, "exponential", float(epsilon))
    return index


# --- Sensitivity of queries on bounded data ---------------------------------------------------

def count_sensitivity() -> float:
    """Number of records: 1 (adding or removing a record changes it by 1)."""
    return 1.0


def threshold_count_sensitivity() -> float:
    """Number of records meeting a condition (x > t, lo <= x <= hi, ...): 1, for add/remove and
    for replace-one neighbours alike."""
    return 1.0


def sum_sensitivity(lo: float, hi: float, *,
                    neighbors: Literal["add_remove", "replace_one"] = "add_remove") -> float:
    """Sum of records clipped to [lo, hi]: max(|lo|, |hi|) for add/remove neighbours, hi - lo for
    replace-one neighbours."""
    lo, hi = _bounds(lo, hi)
    if neighbors == "add_remove":
        return max(abs(lo), abs(hi))
    if neighbors == "replace_one":
        return hi - lo
    raise ValueError(f"neighbors must be 'add_remove' or 'replace_one', got {neighbors!r}")


def mean_sensitivity(lo: float, hi: float, n: int) -> float:
    """Mean of n records clipped to [lo, hi], n public (replace-one neighbours): (hi - lo) / n."""
    lo, hi = _bounds(lo, hi)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return (hi - lo) / int(n)


def _data(data: npt.ArrayLike) -> npt.NDArray[np.float64]:
    arr = np.asarray(data, dtype=np.float64).ravel()
    if np.isnan(arr).any():
        raise ValueError("data contains NaN: clipping cannot bound it; drop or impute those records first")
    return arr


def private_count(data: npt.ArrayLike, lo: float, hi: float, epsilon: float,
                  rng: np.random.Generator | None = None, *,
                  accountant: PrivacyAccountant | None = None) -> float:
    """Number of records in [lo, hi] + Lap(1 / epsilon): epsilon-DP."""
    lo, hi = _bounds(lo, hi)
    arr = _data(data)
    count = float(np.count_nonzero((arr >= lo) & (arr <= hi)))
    noisy = laplace_mechanism(count, threshold_count_sensitivity(), epsilon, rng)
    _record(accountant, "private_count", epsilon)
    return float(noisy)


def private_sum(data: npt.ArrayLike, lo: float, hi: float, epsilon: float,
                rng: np.random.Generator | None = None, *,
                accountant: PrivacyAccountant | None = None) -> float:
    """Sum of the records clipped to [lo, hi] + Lap(max(|lo|, |hi|) / epsilon): epsilon-DP
    (add/remove neighbours)."""
    arr = np.clip(_data(data), *_bounds(lo, hi))
    noisy = laplace_mechanism(float(arr.sum()), sum_sensitivity(lo, hi), epsilon, rng)
    _record(accountant, "private_sum", epsilon)
    return float(noisy)


def private_mean(data: npt.ArrayLike, lo: float, hi: float, epsilon: float,
                 rng: np.random.Generator | None = None, *,
                 accountant: PrivacyAccountant | None = None) -> float:
    """Mean of the n records clipped to [lo, hi] + Lap((hi - lo) / (n epsilon)): epsilon-DP for
    replace-one neighbours, n = len(data) being public. Unbiased for the clipped mean, so it may
    fall outside [lo, hi]."""
    arr = np.clip(_data(data), *_bounds(lo, hi))
    if arr.size == 0:
        raise ValueError("data must hold at least one record for a mean")
    noisy = laplace_mechanism(float(arr.mean()), mean_sensitivity(lo, hi, arr.size), epsilon, rng)
    _record(accountant, "private_mean", epsilon)
    return float(noisy)
