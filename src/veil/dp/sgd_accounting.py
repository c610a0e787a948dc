"""DP-SGD's accounting: the epsilon of a history of subsampled Gaussian steps, and the noise that meets a target.

A history is Opacus's: a list of (noise_multiplier, sample_rate, steps), one entry per run of equal
steps. ``spent_epsilon`` replays it in a fresh Opacus accountant ("prv": Gopi et al. 2021, numerical
composition of privacy random variables; "rdp": Mironov 2017, subsampled Gaussian RDP), so a
checkpointed history gives the same epsilon after a resume.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from veil.dp.composition import validate_delta, validate_epsilon

ACCOUNTANTS = ("prv", "rdp")


class DPTrainingError(ValueError):
    """A DP-SGD run that cannot start or go on: bad data, settings, model or checkpoint."""


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv", prior: list[tuple[float, float, int]] | None = None) -> float:
    """Smallest noise multiplier sigma whose epsilon after ``steps`` steps at ``sample_rate`` is <= target.

    ``prior``: privacy already spent on the same data (accountant history, e.g. private feature
    statistics), composed before the steps. Without it Opacus's ``get_noise_multiplier`` bisects;
    with it the same bisection runs here on the composed history (tolerance 0.01 in epsilon)."""
    from opacus.accountants.utils import get_noise_multiplier

    validate_epsilon(target_epsilon)
    validate_delta(delta, allow_zero=False)  # epsilon is infinite at delta = 0 for Gaussian noise
    if not 0 < sample_rate <= 1:
        raise DPTrainingError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if accountant not in ACCOUNTANTS:
        raise DPTrainingError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if steps < 1:
        raise DPTrainingError(f"steps must be >= 1, got {steps}")
    if not prior:
        with quiet_opacus():
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=accountant))
    if spent_epsilon(list(prior), delta, accountant) >= target_epsilon:
        raise DPTrainingError(f"the prior spending alone already exceeds the target epsilon {target_epsilon}")

    def eps(sigma: float) -> float:
        return spent_epsilon([*prior, (sigma, sample_rate, steps)], delta, accountant)

    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise DPTrainingError("no noise multiplier reaches the target epsilon")
    while True:  # eps(high) <= target always; stop when it is within 0.01 of it
        mid = (low + high) / 2
        e = eps(mid)
        if e <= target_epsilon:
            high = mid
            if target_epsilon - e < 0.01:
                return high
        else:
            low = mid


def spent_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon of a list of (noise_multiplier, sample_rate, steps) under ``accountant``."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = list(history)
    if not history:
        return 0.0
    with quiet_opacus():
        return float(acc.get_epsilon(delta=delta))


@contextlib.contextmanager
def quiet_opacus() -> Iterator[None]:
    """Silence Opacus's repeated warnings (secure_mode, accountant internals) inside a block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="opacus")
        warnings.filterwarnings("ignore", message=".*secure_mode.*")
        warnings.filterwarnings("ignore", message=".*Optimal order.*")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield
