"""Tests for veil.dp.composition: the accountant's ledger, basic and advanced composition against
their formulas, and the RDP composition of Gaussian mechanisms against Opacus."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.dp import PrivacyAccountant, advanced_composition, compose_gaussian
from veil.dp.composition import PrivacyEvent


def test_basic_composition_sums():
    acc = PrivacyAccountant()
    acc.record("a", 0.5)
    acc.record("b", 0.25, 1e-6)
    acc.record("c", 1.0, 2e-6)
    spent = acc.basic()
    assert (spent.epsilon, spent.method) == (1.75, "basic")
    assert spent.delta == pytest.approx(3e-6, rel=1e-12)
    assert acc.spent() == spent
    assert len(acc.events) == 3 and acc.events[1] == PrivacyEvent("b", 0.25, 1e-6)


def test_advanced_composition_formula_and_below_basic():
    acc = PrivacyAccountant()
    k, eps, dprime = 100, 0.01, 1e-6
    for _ in range(k):
        acc.record("laplace", eps)
    adv = acc.advanced(dprime)
    expected = math.sqrt(2 * k * math.log(1 / dprime)) * eps + k * eps * (math.exp(eps) - 1)
    assert adv.epsilon == pytest.approx(expected, rel=1e-12)  # 0.5357...
    assert adv.delta == dprime
    assert adv.epsilon < acc.basic().epsilon == pytest.approx(1.0)
    assert acc.spent(dprime) == adv


def test_spent_falls_back_to_basic_when_advanced_is_worse():
    acc = PrivacyAccountant()
    acc.record("one", 1.0)
    assert acc.spent(1e-6).method == "basic"
    assert acc.advanced(1e-6).epsilon > 1.0


@settings(max_examples=50, deadline=None)
@given(eps=st.lists(st.floats(1e-3, 2.0), min_size=1, max_size=30), log_dprime=st.floats(-12, -1))
def test_advanced_heterogeneous_reduces_to_homogeneous(eps, log_dprime):
    dprime = 10.0 ** log_dprime
    hetero = advanced_composition([PrivacyEvent("m", e, 0.0) for e in eps], dprime)
    k, e0 = len(eps), eps[0]
    homo = advanced_composition([PrivacyEvent("m", e0, 0.0)] * k, dprime)
    assert homo.epsilon == pytest.approx(math.sqrt(2 * k * math.log(1 / dprime)) * e0 + k * e0 * math.expm1(e0),
                                         rel=1e-12)
    assert hetero.epsilon >= math.sqrt(2 * math.log(1 / dprime) * sum(e * e for e in eps)) * (1 - 1e-12)


@pytest.mark.parametrize(("eps", "delta"), [(0.0, 0.0), (-1.0, 0.0), (float("nan"), 0.0), (float("inf"), 0.0),
                                            (1.0, 1.0), (1.0, -1e-9)])
def test_record_validates_before_adding(eps, delta):
    acc = PrivacyAccountant()
    with pytest.raises(ValueError, match=r"epsilon must be a finite number > 0|delta must satisfy 0 <= delta < 1"):
        acc.record("bad", eps, delta)
    assert len(acc) == 0


def test_advanced_needs_positive_delta_prime():
    with pytest.raises(ValueError, match=r"delta_prime must satisfy 0 < delta_prime < 1, got 0"):
        PrivacyAccountant().advanced(0)


def test_compose_gaussian_classic_closed_form_is_the_minimum():
    z, k, delta = 2.0, 10, 1e-5
    rho = k / (2 * z * z)
    eps = compose_gaussian([z] * k, delta, conversion="classic")
    assert eps == pytest.approx(rho + 2 * math.sqrt(rho * math.log(1 / delta)), rel=1e-12)
    alphas = np.linspace(1.001, 200, 200_000)
    assert eps == pytest.approx(np.min(alphas * rho + math.log(1 / delta) / (alphas - 1)), rel=1e-6)
    assert compose_gaussian([z] * k, delta) < eps


@pytest.mark.parametrize(("z", "steps"), [(1.0, 1), (1.0, 100), (4.0, 1000), (0.7, 3)])
def test_compose_gaussian_matches_opacus(z, steps):
    from opacus.accountants.analysis import rdp
    delta = 1e-5
    orders = np.concatenate([np.linspace(1.01, 10, 3000), np.linspace(10, 1000, 3000)])
    opacus_eps, _ = rdp.get_privacy_spent(
        orders=orders, rdp=rdp.compute_rdp(q=1.0, noise_multiplier=z, steps=steps, orders=list(orders)), delta=delta)
    ours = compose_gaussian([z] * steps, delta)
    assert ours <= opacus_eps * (1 + 1e-9)  # the continuous minimum is at most the grid's
    assert ours == pytest.approx(opacus_eps, rel=0.01)


def test_compose_gaussian_validates():
    with pytest.raises(ValueError, match=r"noise multiplier .* must be finite and > 0"):
        compose_gaussian([1.0, 0.0], 1e-5)
    with pytest.raises(ValueError, match=r"at least one"):
        compose_gaussian([], 1e-5)
    with pytest.raises(ValueError, match=r"delta must satisfy 0 < delta < 1"):
        compose_gaussian([1.0], 0.0)
