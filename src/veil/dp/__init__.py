"""Differential privacy: mechanisms (Laplace, Gaussian, randomized response, exponential), query
sensitivity on bounded data, private count/sum/mean, and privacy accounting (basic, advanced and
RDP composition). Noise always comes from an injected or ``secrets``-seeded numpy ``Generator``."""

from veil.dp.composition import (
    PrivacyAccountant,
    PrivacyEvent,
    PrivacySpent,
    advanced_composition,
    basic_composition,
    compose_gaussian,
)
from veil.dp.mechanisms import (
    ProportionEstimate,
    count_sensitivity,
    exponential_mechanism,
    exponential_mechanism_probabilities,
    gaussian_delta,
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

__all__ = [
    "PrivacyAccountant",
    "PrivacyEvent",
    "PrivacySpent",
    "ProportionEstimate",
    "advanced_composition",
    "basic_composition",
    "compose_gaussian",
    "count_sensitivity",
    "exponential_mechanism",
    "exponential_mechanism_probabilities",
    "gaussian_delta",
    "gaussian_mechanism",
    "gaussian_sigma_analytic",
    "gaussian_sigma_classic",
    "keep_probability",
    "laplace_mechanism",
    "mean_sensitivity",
    "private_count",
    "private_mean",
    "private_sum",
    "randomized_response",
    "randomized_response_estimate",
    "sum_sensitivity",
    "threshold_count_sensitivity",
]
