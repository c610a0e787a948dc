"""Tests for veil.dp.pate: vote counting, the noisy-max aggregators, and the RDP analysis against
hand formulas (Papernot et al. 2017, 2018)."""

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import erfc

from veil.dp.pate import (
    confident_gnmax,
    gnmax_aggregate,
    gnmax_q_bound,
    gnmax_rdp_data_dependent,
    gnmax_rdp_data_independent,
    lnmax_aggregate,
    lnmax_epsilon,
    pate_epsilon,
    rdp_to_dp,
    vote_histograms,
)


def test_vote_histograms_counts_exactly():
    preds = np.array([[0, 1, 2, 2],
                      [0, 1, 1, 2],
                      [1, 1, 0, 2]])
    hist = vote_histograms(preds, num_classes=3)
    expected = np.array([[2, 1, 0], [0, 3, 0], [1, 1, 1], [0, 0, 3]])
    np.testing.assert_array_equal(hist, expected)
    assert hist.dtype == np.int64
    np.testing.assert_array_equal(hist.sum(axis=1), np.full(4, 3))


def test_vote_histograms_unused_class_is_zero():
    hist = vote_histograms(np.zeros((5, 2), dtype=int), num_classes=4)
    np.testing.assert_array_equal(hist, [[5, 0, 0, 0], [5, 0, 0, 0]])


def _consensus(num_queries=200, num_classes=10, votes=250, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=num_queries)
    hist = np.zeros((num_queries, num_classes), dtype=np.int64)
    hist[np.arange(num_queries), labels] = votes
    return hist, labels


def test_gnmax_with_consensus_and_small_sigma_returns_plurality():
    hist, labels = _consensus()
    np.testing.assert_array_equal(gnmax_aggregate(hist, 1.0, np.random.default_rng(1)), labels)


def test_lnmax_with_consensus_returns_plurality():
    hist, labels = _consensus()
    np.testing.assert_array_equal(lnmax_aggregate(hist, 10.0, np.random.default_rng(2)), labels)


def test_confident_gnmax_answers_consensus_and_rejects_split_votes():
    hist, labels = _consensus(num_queries=50)
    split = np.full((50, 10), 25)
    out = confident_gnmax(np.vstack([hist, split]), threshold=150, sigma1=5.0, sigma2=1.0,
                          rng=np.random.default_rng(3))
    np.testing.assert_array_equal(out[:50], labels)
    np.testing.assert_array_equal(out[50:], -1)


@pytest.mark.parametrize("aggregate, noise", [(gnmax_aggregate, 1e6), (lnmax_aggregate, 1e-6)])
def test_huge_noise_gives_near_uniform_labels(aggregate, noise):
    hist, _ = _consensus(num_queries=20000, num_classes=5, votes=100, seed=4)
    hist[:, 0] += 50  # a bias towards class 0 that the noise must drown out
    out = aggregate(hist, noise, np.random.default_rng(5))
    counts = np.bincount(out, minlength=5)
    assert stats.chisquare(counts).pvalue > 1e-4
    assert np.all(np.abs(counts / out.size - 0.2) < 0.02)


def test_aggregators_default_rng_draws_fresh_noise():
    hist = np.full((2000, 4), 10)
    assert not np.array_equal(gnmax_aggregate(hist, 5.0), gnmax_aggregate(hist, 5.0))


def test_q_bound_matches_hand_formula():
    sigma = 40.0
    expected = 0.5 * erfc(90 / (2 * sigma)) + 0.5 * erfc(95 / (2 * sigma))
    assert gnmax_q_bound([100, 10, 5], sigma) == pytest.approx(expected, rel=1e-12)


def test_q_bound_is_capped_at_one_minus_one_over_classes():
    assert gnmax_q_bound([5, 5, 5, 5], 10.0) == pytest.approx(0.75)


def test_data_independent_epsilon_matches_fine_grid():
    sigma, delta = 40.0, 1e-5
    alphas = np.linspace(1.001, 2000.0, 2_000_000)
    expected = float(np.min(alphas / sigma**2 + math.log(1 / delta) / (alphas - 1)))
    got = pate_epsilon([[100, 10, 5]], sigma, delta, data_dependent=False)
    assert got == pytest.approx(expected, abs=1e-3)
    # closed form of the minimum, as a second check: rho + 2 sqrt(rho ln(1/delta)) with rho = 1/sigma^2
    rho = 1 / sigma**2
    assert got == pytest.approx(rho + 2 * math.sqrt(rho * math.log(1 / delta)), abs=1e-3)


def test_data_independent_rdp_is_alpha_over_sigma_squared():
    np.testing.assert_allclose(gnmax_rdp_data_independent(4.0, [2, 10, 33]), [2 / 16, 10 / 16, 33 / 16])


def test_data_dependent_epsilon_smaller_for_strong_consensus():
    hist, _ = _consensus(num_queries=100, votes=250)
    dep = pate_epsilon(hist, 40.0, 1e-5)
    indep = pate_epsilon(hist, 40.0, 1e-5, data_dependent=False)
    assert dep < 0.5 * indep


def test_data_dependent_rdp_never_exceeds_and_falls_back_to_data_independent():
    orders = np.array([2.0, 5.0, 20.0, 100.0, 1000.0])
    indep = gnmax_rdp_data_independent(40.0, orders)
    strong = gnmax_rdp_data_dependent([250, 0, 0], 40.0, orders)
    assert np.all(strong <= indep) and np.all(strong >= 0) and strong[0] < indep[0]
    np.testing.assert_allclose(gnmax_rdp_data_dependent([10, 10, 10], 40.0, orders), indep)


def test_data_dependent_rdp_matches_theorem_6_by_hand():
    sigma, lam = 40.0, 5.0
    q = gnmax_q_bound([250, 0, 0], sigma)
    mu2 = sigma * math.sqrt(math.log(1 / q))
    mu1 = mu2 + 1
    e1, e2 = mu1 / sigma**2, mu2 / sigma**2
    a = (1 - q) / (1 - (q * math.exp(e2)) ** ((mu2 - 1) / mu2))
    b = math.exp(e1) / q ** (1 / (mu1 - 1))
    expected = math.log((1 - q) * a ** (lam - 1) + q * b ** (lam - 1)) / (lam - 1)
    assert gnmax_rdp_data_dependent([250, 0, 0], sigma, [lam])[0] == pytest.approx(expected, rel=1e-9)


def test_rdp_to_dp_and_lnmax_epsilon():
    assert rdp_to_dp([1.0, 0.5], [2.0, 3.0], math.exp(-2)) == pytest.approx(min(1 + 2, 0.5 + 1))
    assert lnmax_epsilon(0.05, 10) == pytest.approx(1.0)


@pytest.mark.parametrize("call, message", [
    (lambda: gnmax_aggregate([[1, 2]], 0.0), "sigma must be a finite number > 0"),
    (lambda: gnmax_aggregate([[1, 2]], -1.0), "sigma must be a finite number > 0"),
    (lambda: gnmax_rdp_data_independent(0.0, [2]), "sigma must be a finite number > 0"),
    (lambda: confident_gnmax([[1, 2]], 1.0, 1.0, 0.0), "sigma2 must be a finite number > 0"),
    (lambda: lnmax_aggregate([[1, 2]], 0.0), "epsilon_per_query must be a finite number > 0"),
    (lambda: gnmax_aggregate([[1, -2]], 1.0), "non-negative counts"),
    (lambda: gnmax_q_bound([3, -1], 1.0), "non-negative counts"),
    (lambda: gnmax_aggregate([1, 2], 1.0), r"shape \(num_queries, num_classes\)"),
    (lambda: gnmax_q_bound([[1, 2]], 1.0), r"shape \(num_classes,\)"),
    (lambda: vote_histograms([0, 1, 2], 3), "shape \\(num_teachers, num_queries\\)"),
    (lambda: vote_histograms([[0, 3]], 3), r"must lie in \[0, 3\)"),
    (lambda: vote_histograms([[0, -1]], 3), r"must lie in \[0, 3\)"),
    (lambda: vote_histograms([[0.5, 1]], 3), "integer class labels"),
    (lambda: vote_histograms([[0, 1]], 0), "num_classes must be an integer >= 1"),
    (lambda: rdp_to_dp([1.0], [1.0], 1e-5), "orders must be"),
    (lambda: rdp_to_dp([1.0, 2.0], [2.0], 1e-5), "same shape"),
    (lambda: pate_epsilon([[1, 2]], 1.0, 0.0), "delta must satisfy 0 < delta < 1"),
    (lambda: confident_gnmax([[1, 2]], math.inf, 1.0, 1.0), "threshold must be finite"),
])
def test_invalid_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
