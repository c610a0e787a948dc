"""Tests for veil.dp.mechanisms: noise scales against their formulas, the analytic Gaussian
against the Balle-Wang condition, estimators against the truth, and parameter validation."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from veil.dp import (
    PrivacyAccountant,
    count_sensitivity,
    exponential_mechanism,
    exponential_mechanism_probabilities,
    gaussian_mechanism,
    gaussian_sigma_analytic,
    gaussian_sigma_classic,
    keep_probability,
    laplace_mechanism,
    mean_sensitivity,
    private_count,
    private_mean,
    private_sum,
    randomized_response,
    randomized_response_estimate,
    sum_sensitivity,
    threshold_count_sensitivity,
)

N = 200_000


def balle_wang_delta(sigma: float, s: float, eps: float) -> float:
    """Written here independently of the module: Phi(s/2sigma - eps sigma/s) - e^eps Phi(-s/2sigma - eps sigma/s)."""
    return stats.norm.cdf(s / (2 * sigma) - eps * sigma / s) - math.exp(eps) * stats.norm.cdf(
        -s / (2 * sigma) - eps * sigma / s)


@pytest.mark.parametrize(("s", "eps"), [(1.0, 1.0), (2.0, 0.5), (0.1, 3.0)])
def test_laplace_noise_scale(s, eps):
    b = s / eps
    noise = laplace_mechanism(np.zeros(N), s, eps, rng=np.random.default_rng(1))
    assert noise.shape == (N,)
    assert abs(noise.mean()) < 0.02 * b  # ~6 standard errors
    assert noise.var() == pytest.approx(2 * b * b, rel=0.03)
    assert stats.kstest(noise, stats.laplace(scale=b).cdf).pvalue > 1e-3


def test_laplace_scalar_and_wrong_scale_is_detected():
    assert isinstance(laplace_mechanism(3.0, 1.0, 1.0, rng=np.random.default_rng(0)), float)
    noise = laplace_mechanism(np.zeros(N), 1.0, 1.0, rng=np.random.default_rng(2))
    assert stats.kstest(noise, stats.laplace(scale=1.1).cdf).pvalue < 1e-3  # the KS test has power


def test_default_rng_is_not_fixed():
    a = laplace_mechanism(np.zeros(4), 1.0, 1.0)
    b = laplace_mechanism(np.zeros(4), 1.0, 1.0)
    assert not np.array_equal(a, b)


def test_gaussian_classic_formula():
    assert gaussian_sigma_classic(2.0, 0.5, 1e-5) == pytest.approx(math.sqrt(2 * math.log(1.25e5)) * 2.0 / 0.5,
                                                                   rel=1e-15)
    with pytest.raises(ValueError, match=r"epsilon < 1.*gaussian_sigma_analytic"):
        gaussian_sigma_classic(1.0, 1.0, 1e-5)


def test_gaussian_analytic_known_value():
    sigma = gaussian_sigma_analytic(1.0, 1.0, 1e-5)
    # 3.7306316348159347 here; 3.73063163481594181... by a 40-digit mpmath root of the same condition
    assert sigma == pytest.approx(3.7306316348159418, rel=1e-12)
    assert balle_wang_delta(sigma, 1.0, 1.0) == pytest.approx(1e-5, rel=1e-9)
    assert balle_wang_delta(sigma * 0.999, 1.0, 1.0) > 1e-5  # smallest such sigma


@settings(max_examples=40, deadline=None)
@given(s=st.floats(0.01, 100), eps=st.floats(0.01, 0.99), log_delta=st.floats(-12, -1))
def test_gaussian_analytic_tight_and_below_classic(s, eps, log_delta):
    delta = 10.0 ** log_delta
    sigma = gaussian_sigma_analytic(s, eps, delta)
    assert sigma < gaussian_sigma_classic(s, eps, delta)
    assert balle_wang_delta(sigma, s, eps) == pytest.approx(delta, rel=1e-9)


@pytest.mark.parametrize("calibration", ["analytic", "classic"])
def test_gaussian_sample_variance(calibration):
    s, eps, delta = 1.5, 0.8, 1e-6
    sigma = (gaussian_sigma_analytic if calibration == "analytic" else gaussian_sigma_classic)(s, eps, delta)
    noise = gaussian_mechanism(np.zeros(N), s, eps, delta, rng=np.random.default_rng(3), calibration=calibration)
    assert abs(noise.mean()) < 0.02 * sigma
    assert noise.var() == pytest.approx(sigma ** 2, rel=0.03)


@pytest.mark.parametrize("eps", [0.1, 1.0, 3.0])
def test_randomized_response_keep_probability(eps):
    p = math.exp(eps) / (1 + math.exp(eps))
    assert keep_probability(eps) == pytest.approx(p, rel=1e-15)
    kept = randomized_response(np.ones(N, dtype=bool), eps, rng=np.random.default_rng(4)).mean()
    assert abs(kept - p) < 4 * math.sqrt(p * (1 - p) / N)


@pytest.mark.parametrize("truth", [0.05, 0.3, 0.5, 0.8])
def test_randomized_response_estimator_unbiased(truth):
    rng = np.random.default_rng(5)
    eps, n, trials = 0.5, 1000, 1000
    # each trial surveys n people drawn from a population with proportion `truth` (Warner's setting)
    results = [randomized_response_estimate(randomized_response(rng.random(n) < truth, eps, rng=rng), eps)
               for _ in range(trials)]
    estimates = np.array([r.proportion for r in results])
    se_of_mean = estimates.std(ddof=1) / math.sqrt(trials)
    assert abs(estimates.mean() - truth) < 3 * se_of_mean
    assert np.mean([r.standard_error for r in results]) == pytest.approx(estimates.std(ddof=1), rel=0.1)


def test_exponential_mechanism_frequencies():
    scores = np.array([0.0, 1.0, 2.0, 5.0, 5.0])
    eps, sens, draws = 1.0, 1.0, 20_000
    probs = exponential_mechanism_probabilities(scores, sens, eps)
    softmax = np.exp(eps * scores / 2) / np.exp(eps * scores / 2).sum()
    np.testing.assert_allclose(probs, softmax, rtol=1e-12)
    rng = np.random.default_rng(6)
    counts = np.bincount([exponential_mechanism(scores, sens, eps, rng=rng) for _ in range(draws)], minlength=5)
    assert stats.chisquare(counts, probs * draws).pvalue > 1e-3


def test_exponential_mechanism_is_stable_for_huge_scores():
    probs = exponential_mechanism_probabilities([1e6, 1e6 - 2.0, -1e6], 1.0, 1.0)
    np.testing.assert_allclose(probs, [1 / (1 + math.e ** -1), 1 / (1 + math.e), 0.0], atol=1e-12)


def test_sensitivities():
    assert count_sensitivity() == threshold_count_sensitivity() == 1.0
    assert sum_sensitivity(-3.0, 2.0) == 3.0
    assert sum_sensitivity(-3.0, 2.0, neighbors="replace_one") == 5.0
    assert mean_sensitivity(0.0, 10.0, 100) == pytest.approx(0.1)


def test_private_queries_clip_and_add_laplace_noise():
    data = np.array([-100.0, 0.5, 1.0, 2.0, 100.0])
    rng = np.random.default_rng(7)
    sums = np.array([private_sum(data, -3.0, 2.0, 1.0, rng=rng) for _ in range(4000)])
    assert abs(sums.mean() - 2.5) < 0.3  # clipped: -3 + 0.5 + 1 + 2 + 2; Lap(3): se 0.067
    assert sums.var() == pytest.approx(2 * 3.0 ** 2, rel=0.1)  # scale max(|lo|, |hi|) / eps
    means = np.array([private_mean(data, 0.0, 1.0, 1.0, rng=rng) for _ in range(4000)])
    assert means.var() == pytest.approx(2 * (1 / 5) ** 2, rel=0.1)
    counts = np.array([private_count(data, 0.0, 1.5, 0.5, rng=rng) for _ in range(4000)])
    assert abs(counts.mean() - 2.0) < 0.2 and counts.var() == pytest.approx(8.0, rel=0.1)


def test_mechanisms_record_into_accountant():
    acc = PrivacyAccountant()
    rng = np.random.default_rng(8)
    laplace_mechanism(1.0, 1.0, 0.1, rng=rng, accountant=acc)
    gaussian_mechanism(1.0, 1.0, 0.2, 1e-6, rng=rng, accountant=acc)
    randomized_response([1, 0], 0.3, rng=rng, accountant=acc)
    exponential_mechanism([1.0, 2.0], 1.0, 0.4, rng=rng, accountant=acc)
    private_mean([1.0, 2.0], 0.0, 3.0, 0.5, rng=rng, accountant=acc)
    assert [(e.name, e.epsilon, e.delta) for e in acc.events] == [
        ("laplace", 0.1, 0.0), ("gaussian", 0.2, 1e-6), ("randomized_response", 0.3, 0.0),
        ("exponential", 0.4, 0.0), ("private_mean", 0.5, 0.0)]


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_epsilon(eps):
    acc = PrivacyAccountant()
    with pytest.raises(ValueError, match=r"epsilon must be a finite number > 0"):
        laplace_mechanism(1.0, 1.0, eps, accountant=acc)
    with pytest.raises(ValueError, match=r"epsilon must be a finite number > 0"):
        gaussian_mechanism(1.0, 1.0, eps, 1e-5)
    with pytest.raises(ValueError, match=r"epsilon must be a finite number > 0"):
        randomized_response([1], eps)
    with pytest.raises(ValueError, match=r"epsilon must be a finite number > 0"):
        exponential_mechanism([1.0], 1.0, eps)
    assert len(acc) == 0


@pytest.mark.parametrize("delta", [1.0, 0.0, -0.1, 1.5, float("nan")])
def test_invalid_delta(delta):
    with pytest.raises(ValueError, match=r"delta must satisfy 0 < delta < 1"):
        gaussian_sigma_analytic(1.0, 1.0, delta)
    with pytest.raises(ValueError, match=r"delta must satisfy 0 < delta < 1"):
        gaussian_mechanism(1.0, 1.0, 0.5, delta, calibration="classic")


def test_invalid_other_parameters():
    with pytest.raises(ValueError, match=r"sensitivity must be a finite number > 0"):
        laplace_mechanism(1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"lo < hi, got lo=1.0, hi=1.0"):
        private_sum([1.0], 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"lo < hi, got lo=2.0, hi=1.0"):
        sum_sensitivity(2.0, 1.0)
    with pytest.raises(ValueError, match=r"data contains NaN"):
        private_mean([1.0, float("nan")], 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"value must be finite"):
        laplace_mechanism([1.0, float("nan")], 1.0, 1.0)
    with pytest.raises(ValueError, match=r"bits must be booleans or 0/1"):
        randomized_response([0, 2], 1.0)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1"):
        mean_sensitivity(0.0, 1.0, 0)
    with pytest.raises(ValueError, match=r"calibration must be 'analytic' or 'classic'"):
        gaussian_mechanism(1.0, 1.0, 0.5, 1e-5, calibration="fast")  # type: ignore[arg-type]
