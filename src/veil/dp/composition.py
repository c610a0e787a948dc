"""Privacy accounting: a ledger of mechanism calls and the composition theorems that total it.

Bookkeeping (``PrivacyAccountant``: frozen ``PrivacyEvent`` records, validated before they are
added) is kept apart from the math (``basic_composition``, ``advanced_composition``,
``compose_gaussian``: pure functions of numbers).

Theorems used (k mechanisms, the i-th (eps_i, delta_i)-DP, run adaptively on the same data):

1. Basic composition (Dwork & Roth 2014, Thm 3.16): (sum eps_i, sum delta_i)-DP.
2. Advanced composition (Dwork, Rothblum & Vadhan 2010; Dwork & Roth Thm 3.20), for any
   delta' in (0, 1): (eps', delta' + sum delta_i)-DP with

       eps' = sqrt(2 ln(1/delta') * sum eps_i^2) + sum eps_i (e^eps_i - 1),

   which for k identical (eps, delta) calls is sqrt(2 k ln(1/delta')) eps + k eps (e^eps - 1).
   The heterogeneous form is the same proof (Azuma's inequality with per-step ranges eps_i).
3. Gaussian mechanisms through Renyi DP (Mironov 2017): a Gaussian mechanism with noise
   multiplier z = sigma / sensitivity is (alpha, alpha / (2 z^2))-RDP for every alpha > 1; RDP
   adds up, so k of them are (alpha, alpha * rho)-RDP with rho = sum 1 / (2 z_i^2) (rho-zCDP).
   Conversion to (eps, delta)-DP, minimised over alpha > 1:

   - ``"classic"`` (Mironov 2017, Prop. 3): eps = rdp(alpha) + ln(1/delta) / (alpha - 1); the
     minimum is in closed form, eps = rho + 2 sqrt(rho ln(1/delta)).
   - ``"improved"`` (Balle et al. 2020, Thm 21; what Opacus's ``get_privacy_spent`` uses):
     eps = rdp(alpha) + ln((alpha - 1) / alpha) - (ln delta + ln alpha) / (alpha - 1), never larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from scipy.optimize import minimize_scalar

__all__ = [
    "PrivacyAccountant",
    "PrivacyEvent",
    "PrivacySpent",
    "advanced_composition",
    "basic_composition",
    "compose_gaussian",
    "validate_delta",
    "validate_epsilon",
]


def validate_epsilon(epsilon: float, name: str = "epsilon") -> float:
    """Return ``epsilon`` as a float; ValueError unless it is a finite number > 0."""
    try:
        value = float(epsilon)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0, got {epsilon!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {epsilon!r}")
    return value


def validate_delta(delta: float, name: str = "delta", *, allow_zero: bool = True) -> float:
    """Return ``delta`` as a float; ValueError unless 0 <= delta < 1 (0 < delta < 1 without ``allow_zero``)."""
    interval = "0 <= {0} < 1" if allow_zero else "0 < {0} < 1"
    try:
        value = float(delta)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must satisfy {interval.format(name)}, got {delta!r}") from None
    if not (0.0 <= value < 1.0) or (value == 0.0 and not allow_zero):
        raise ValueError(f"{name} must satisfy {interval.format(name)}, got {delta!r}")
    return value


@dataclass(frozen=True)
class PrivacyEvent:
    """One mechanism call: its name and its (epsilon, delta)-DP guarantee."""

    name: str
    epsilon: float
    delta: float


@dataclass(frozen=True)
class PrivacySpent:
    """A total guarantee: the composition is (epsilon, delta)-DP by the theorem named in ``method``."""

    epsilon: float
    delta: float
    method: Literal["basic", "advanced"]


def basic_composition(events: tuple[PrivacyEvent, ...] | list[PrivacyEvent]) -> PrivacySpent:
    """Basic composition: (sum eps_i, sum delta_i)-DP (Dwork & Roth 2014, Thm 3.16)."""
    return PrivacySpent(epsilon=math.fsum(e.epsilon for e in events),
                        delta=min(1.0, math.fsum(e.delta for e in events)), method="basic")


def advanced_composition(events: tuple[PrivacyEvent, ...] | list[PrivacyEvent],
                         delta_prime: float) -> PrivacySpent:
    """Advanced composition (Dwork, Rothblum & Vadhan 2010), heterogeneous form:

    eps' = sqrt(2 ln(1/delta') sum eps_i^2) + sum eps_i (e^eps_i - 1), delta = delta' + sum delta_i.
    With k identical calls this is sqrt(2 k ln(1/delta')) eps + k eps (e^eps - 1).
    """
    delta_prime = validate_delta(delta_prime, "delta_prime", allow_zero=False)
    squares = math.fsum(e.epsilon ** 2 for e in events)
    drift = math.fsum(e.epsilon * math.expm1(e.epsilon) for e in events)
    epsilon = math.sqrt(2.0 * math.log(1.0 / delta_prime) * squares) + drift
    delta = min(1.0, delta_prime + math.fsum(e.delta for e in events))
    return PrivacySpent(epsilon=epsilon, delta=delta, method="advanced")


class PrivacyAccountant:
    """A ledger of mechanism calls on one data set. Mechanisms given ``accountant=`` record themselves.

    Each event is validated before it is added; the ledger only grows. The totals are computed
    on demand from the events by the pure functions of this module.
    """

    def __init__(self) -> None:
        self._events: list[PrivacyEvent] = []

    def record(self, name: str, epsilon: float, delta: float = 0.0) -> PrivacyEvent:
        """Add one (epsilon, delta)-DP mechanism call named ``name``; returns the event recorded."""
        event = PrivacyEvent(name=str(name), epsilon=validate_epsilon(epsilon), delta=validate_delta(delta))
        self._events.append(event)
        return event

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """The calls recorded so far, oldest first."""
        return tuple(self._events)

    def __len__(self) -> int:
        return len(self._events)

    def __repr__(self) -> str:
        total = self.basic()
        return f"PrivacyAccountant({len(self)} events, basic eps={total.epsilon:.4g}, delta={total.delta:.3g})"

    def basic(self) -> PrivacySpent:
        """(sum eps_i, sum delta_i): basic composition of every recorded call."""
        return basic_composition(self._events)

    def advanced(self, delta_prime: float) -> PrivacySpent:
        """Advanced composition with slack ``delta_prime`` (0 < delta_prime < 1); see ``advanced_composition``."""
        return advanced_composition(self._events, delta_prime)

    def spent(self, delta_prime: float | None = None) -> PrivacySpent:
        """The guarantee with the smaller epsilon of basic and advanced composition.

        Without ``delta_prime`` only basic composition applies. Advanced composition pays for its
        smaller epsilon with ``delta_prime`` more delta: the result says which theorem it used.
        """
        basic = self.basic()
        if delta_prime is None:
            return basic
        advanced = self.advanced(delta_prime)
        return advanced if advanced.epsilon < basic.epsilon else basic


def _gaussian_rho(noise_multipliers: list[float] | tuple[float, ...]) -> float:
    if len(noise_multipliers) == 0:
        raise ValueError("noise_multipliers must hold at least one sigma/sensitivity ratio, got none")
    for z in noise_multipliers:
        if not (math.isfinite(float(z)) and float(z) > 0):
            raise ValueError(f"each noise multiplier (sigma / sensitivity) must be finite and > 0, got {z!r}")
    return math.fsum(1.0 / (2.0 * float(z) ** 2) for z in noise_multipliers)


def compose_gaussian(noise_multipliers: list[float] | tuple[float, ...], delta: float, *,
                     conversion: Literal["improved", "classic"] = "improved") -> float:
    """Epsilon of the composition of Gaussian mechanisms with the given sigma/sensitivity ratios at ``delta``.

    RDP: rdp(alpha) = alpha * rho, rho = sum 1 / (2 z_i^2). ``"classic"`` returns the exact minimum
    over alpha > 1 of rdp(alpha) + ln(1/delta)/(alpha - 1), i.e. rho + 2 sqrt(rho ln(1/delta));
    ``"improved"`` minimises rdp(alpha) + ln((alpha-1)/alpha) - (ln delta + ln alpha)/(alpha-1)
    numerically over alpha > 1 (never above ``"classic"``: the extra terms are <= 0).
    Both are valid upper bounds; Opacus's RDP accountant at sample rate 1 evaluates the improved
    one on a grid of alphas, so it is never below this value.
    """
    delta = validate_delta(delta, allow_zero=False)
    rho = _gaussian_rho(noise_multipliers)
    log_inv_delta = math.log(1.0 / delta)
    classic = rho + 2.0 * math.sqrt(rho * log_inv_delta)
    if conversion == "classic":
        return classic
    if conversion != "improved":
        raise ValueError(f"conversion must be 'improved' or 'classic', got {conversion!r}")

    def eps_of(log_alpha_minus_1: float) -> float:
        a1 = math.exp(log_alpha_minus_1)  # alpha - 1 > 0
        alpha = 1.0 + a1
        return alpha * rho + math.log(a1 / alpha) + (log_inv_delta - math.log(alpha)) / a1

    start = math.log(math.sqrt(log_inv_delta / rho))  # the classic optimum of alpha - 1
    result = minimize_scalar(eps_of, bracket=(start - 0.5, start + 0.5), method="brent",
                             options={"xtol": 1e-12})
    return float(min(classic, result.fun))
