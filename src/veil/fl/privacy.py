"""Differential privacy for federated learning, at two levels, with the accountants of :mod:`veil.dp`.

* **Record level** (:class:`RecordDP`): each client trains with DP-SGD (Opacus: Poisson batches,
  per-example clipping, Gaussian noise) on its own records. A client's guarantee covers each of its
  records against everyone who sees its updates (the server, and with it the global models). The
  noise is calibrated per client, from its number of records, so that ``target_epsilon`` is spent
  after the planned ``rounds`` (every round one client takes ``local_epochs`` epochs of steps);
  clients report the epsilon spent so far with their update.
* **Client level** (:class:`ClientDP`, DP-FedAvg of McMahan et al. 2018): each client clips its
  whole update (new weights minus the global ones) to L2 norm ``clipping_norm`` and reports a
  weight of 1; the server averages the m updates it received and adds N(0, (z C / m)^2) to every
  coordinate, from an OS-seeded generator. Adding or removing one client moves the mean by at most
  C / m, so each round is a Gaussian mechanism of noise multiplier z, subsampled at rate
  q = clients per round / clients; ``z`` is calibrated so that ``target_epsilon`` is spent after
  the planned rounds. The guarantee covers everything a client holds, against whoever sees the
  global models; the server itself sees the un-noised sum (only the sum, under SecAgg+).

Accounting: the PRV accountant (RDP as a cross-check) for the Poisson-subsampled Gaussian
mechanism. Flower samples a fixed number of clients per round rather than each with probability
q; as in the DP-FedAvg literature this is accounted as Poisson sampling at the same q.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from veil.dp.composition import validate_delta, validate_epsilon
from veil.fl.task import FLError


def _check(target_epsilon: float, delta: float, norm: float, rounds: int, what: str) -> None:
    try:
        validate_epsilon(target_epsilon)
        validate_delta(delta)
    except ValueError as e:
        raise FLError(f"{what}: {e}") from None
    if delta == 0:
        raise FLError(f"{what}: delta must be > 0 for the Gaussian mechanism (e.g. 1e-5)")
    if not (math.isfinite(norm) and norm > 0):
        raise FLError(f"{what}: the clipping norm must be a positive number, got {norm}")
    if rounds < 1:
        raise FLError(f"{what}: rounds must be >= 1, got {rounds}")


@dataclass(frozen=True)
class RecordDP:
    """DP-SGD on every client; the budget is planned for ``rounds`` rounds."""

    target_epsilon: float
    rounds: int
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"

    def __post_init__(self) -> None:
        _check(self.target_epsilon, self.delta, self.max_grad_norm, self.rounds, "record-level DP")

    def plan(self, records: int, batch_size: int, local_epochs: int) -> tuple[float, float, int]:
        """(noise multiplier, sample rate, steps per round) of a client with ``records`` records."""
        return _record_plan(self, records, batch_size, local_epochs)

    def epsilon_after(self, rounds_done: int, records: int, batch_size: int, local_epochs: int) -> float:
        from veil.dp.sgd_accounting import spent_epsilon

        sigma, q, steps = self.plan(records, batch_size, local_epochs)
        return spent_epsilon([(sigma, q, steps * rounds_done)], self.delta, self.accountant)


@functools.lru_cache(maxsize=64)
def _record_plan(dp: RecordDP, records: int, batch_size: int, local_epochs: int) -> tuple[float, float, int]:
    from veil.dp.sgd_accounting import calibrate_noise

    if records < 1:
        raise FLError("record-level DP: a client has no records")
    q = min(1.0, batch_size / records)
    steps = max(1, round(local_epochs / q))
    sigma = calibrate_noise(target_epsilon=dp.target_epsilon, delta=dp.delta, sample_rate=q,
                            steps=steps * dp.rounds, accountant=dp.accountant)
    return sigma, q, steps


@dataclass(frozen=True)
class ClientDP:
    """Clip each client's update, noise the average on the server; planned for ``rounds`` rounds."""

    target_epsilon: float
    rounds: int
    delta: float = 1e-5
    clipping_norm: float = 1.0
    accountant: str = "prv"

    def __post_init__(self) -> None:
        _check(self.target_epsilon, self.delta, self.clipping_norm, self.rounds, "client-level DP")

    def noise_multiplier(self, sample_rate: float) -> float:
        return _client_sigma(self, sample_rate)

    def epsilon_after(self, rounds_done: int, sample_rate: float) -> float:
        from veil.dp.sgd_accounting import spent_epsilon

        return spent_epsilon([(self.noise_multiplier(sample_rate), sample_rate, rounds_done)], self.delta,
                             self.accountant)


@functools.lru_cache(maxsize=16)
def _client_sigma(dp: ClientDP, sample_rate: float) -> float:
    from veil.dp.sgd_accounting import calibrate_noise

    return calibrate_noise(target_epsilon=dp.target_epsilon, delta=dp.delta, sample_rate=sample_rate,
                           steps=dp.rounds, accountant=dp.accountant)


def clip_update(new: list[np.ndarray], old: list[np.ndarray], norm: float) -> tuple[list[np.ndarray], float]:
    """``old + (new - old) * min(1, norm / ||new - old||)`` over all arrays together; and the update's
    norm before clipping."""
    deltas = [np.asarray(n, dtype=np.float64) - np.asarray(o, dtype=np.float64) for n, o in zip(new, old)]
    total = math.sqrt(sum(float((d * d).sum()) for d in deltas))
    scale = min(1.0, norm / total) if total > 0 else 1.0
    return [(np.asarray(o) + d * scale).astype(np.asarray(o).dtype) for o, d in zip(old, deltas)], total


def add_noise(arrays: list[np.ndarray], std: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Each array plus i.i.d. N(0, std^2) noise (floating arrays only)."""
    out = []
    for a in arrays:
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating):
            a = (a + rng.normal(0.0, std, a.shape)).astype(a.dtype)
        out.append(a)
    return out


def dp_local_train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, dp: RecordDP, batch_size: int,
                   local_epochs: int, lr: float, momentum: float, rounds_done: int) -> tuple[float, float]:
    """One round of a client's DP-SGD (Opacus, per-example clipping by hooks, Poisson batches of
    expected size ``batch_size``); returns (mean training loss, epsilon spent after ``rounds_done``
    rounds including this one)."""
    from veil.dp.opacus_step import DPStepper
    from veil.dp.train import DPSGDConfig

    sigma, q, steps = dp.plan(len(x), batch_size, local_epochs)
    config = DPSGDConfig(target_epsilon=None, noise_multiplier=sigma, delta=dp.delta, epochs=local_epochs,
                         batch_size=batch_size, max_grad_norm=dp.max_grad_norm, lr=lr, momentum=momentum,
                         clipping="hooks")
    stepper = DPStepper(model, config=config, noise_multiplier=sigma, sample_rate=q, records=len(x))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with warnings.catch_warnings():  # Opacus's hooks on a first layer whose input needs no gradient
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss = stepper.run_epoch(x, y, steps=steps, device=device, progress=False, desc="DP-SGD")
    stepper.module.remove_hooks()  # leave the caller's model as it was given, without Opacus's hooks
    return loss, dp.epsilon_after(rounds_done, len(x), batch_size, local_epochs)
