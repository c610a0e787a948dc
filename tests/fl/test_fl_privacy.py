"""DP in federated learning: update clipping, the server's noise, and the epsilon each level reports."""

import itertools
import math

import numpy as np
import pytest
import torch

from veil.fl.privacy import ClientDP, RecordDP, add_noise, clip_update
from veil.fl.task import FLError


def test_clip_update_bounds_the_change_and_keeps_its_direction():
    rng = np.random.default_rng(0)
    old = [rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=7).astype(np.float32)]
    new = [o + 3 * rng.normal(size=o.shape).astype(np.float32) for o in old]
    clipped, norm = clip_update(new, old, 1.0)
    delta = np.concatenate([(c - o).ravel() for c, o in zip(clipped, old)])
    full = np.concatenate([(n - o).ravel() for n, o in zip(new, old)])
    assert norm == pytest.approx(np.linalg.norm(full), rel=1e-6)
    assert np.linalg.norm(delta) == pytest.approx(1.0, rel=1e-5)
    assert np.allclose(delta / np.linalg.norm(delta), full / np.linalg.norm(full), atol=1e-5)
    small, _ = clip_update([o + 1e-3 for o in old], old, 1.0)  # under the bound: unchanged
    assert all(np.allclose(s, o + 1e-3) for s, o in zip(small, old))
    assert all(c.dtype == o.dtype for c, o in zip(clipped, old))


def test_noise_has_the_requested_spread():
    arrays = [np.zeros((200, 100), np.float32), np.zeros(3, np.int64)]
    noised = add_noise(arrays, 0.05, np.random.default_rng(1))
    assert float(noised[0].std()) == pytest.approx(0.05, rel=0.03)
    assert abs(float(noised[0].mean())) < 0.002
    assert (noised[1] == 0).all()  # integer buffers (counters) are left alone


def test_record_level_budget_is_spent_by_the_last_planned_round():
    dp = RecordDP(3.0, rounds=5, accountant="rdp")
    sigma, q, steps = dp.plan(600, 32, 1)
    assert q == pytest.approx(32 / 600) and steps == round(600 / 32)
    eps = [dp.epsilon_after(r, 600, 32, 1) for r in range(1, 6)]
    assert all(a < b for a, b in itertools.pairwise(eps))
    assert 2.9 < eps[-1] <= 3.0
    assert dp.plan(6000, 32, 1)[0] < sigma  # more records, more amplification: less noise needed


def test_client_level_budget_matches_the_subsampled_gaussian():
    dp = ClientDP(8.0, rounds=30, accountant="rdp")
    z = dp.noise_multiplier(0.1)
    assert 7.9 < dp.epsilon_after(30, 0.1) <= 8.0
    # the same mechanism accounted directly by Opacus
    from opacus.accountants import RDPAccountant
    acc = RDPAccountant()
    acc.history = [(z, 0.1, 30)]
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(dp.epsilon_after(30, 0.1), rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_epsilon=0.0, rounds=3), "epsilon"),
    (dict(target_epsilon=3.0, rounds=0), "rounds must be >= 1"),
    (dict(target_epsilon=3.0, rounds=3, delta=0.0), "delta must be > 0"),
])
def test_bad_budgets_are_refused(kwargs, message):
    with pytest.raises(FLError, match=message):
        RecordDP(**kwargs)


def test_planned_rounds_must_cover_the_run():
    from veil.fl.apps import ServerSettings
    with pytest.raises(FLError, match="planned for 5 rounds, fewer than the 10"):
        ServerSettings(rounds=10, client_dp=ClientDP(8.0, rounds=5))


flwr = pytest.importorskip("flwr")


def _gd_setup():
    from veil.fl import FLTask
    from veil.fl.task import build_model, get_weights
    torch.manual_seed(0)
    init = get_weights(build_model("digits-mlp"))
    parts = [range(100 * i, 100 * (i + 1)) for i in range(4)]
    task = FLTask(model="digits-mlp", data="digits", batch_size=10_000, lr=0.5, momentum=0.0).with_partitions(parts)
    return task, init


def test_client_level_dp_adds_noise_of_the_calibrated_size_to_the_average():
    from veil.fl import ServerSettings, simulate
    task, init = _gd_setup()
    plain = simulate(task, ServerSettings(rounds=1), initial_weights=init, progress=False)
    dp = ClientDP(8.0, rounds=1, clipping_norm=100.0, accountant="rdp")  # a bound no update reaches
    noised = simulate(task, ServerSettings(rounds=1, client_dp=dp), initial_weights=init, progress=False)
    diff = np.concatenate([(a - b).ravel() for a, b in zip(noised.weights, plain.weights)])
    expected = dp.noise_multiplier(1.0) * dp.clipping_norm / 4
    assert float(diff.std()) == pytest.approx(expected, rel=0.1)
    assert noised.rounds[0].epsilon == pytest.approx(dp.epsilon_after(1, 1.0))
    assert noised.rounds[0].epsilon <= 8.0


def test_record_level_dp_reports_epsilon_within_the_budget_under_secure_aggregation():
    from veil.fl import FLTask, ServerSettings, simulate
    task = FLTask(model="digits-mlp", data="digits", num_clients=3, lr=0.1,
                  record_dp=RecordDP(3.0, rounds=2, accountant="rdp"))
    result = simulate(task, ServerSettings(rounds=2, secure=True), progress=False)
    eps = [r.epsilon for r in result.rounds]
    assert eps[0] is not None and eps[0] < eps[1] <= 3.0
    assert math.isfinite(result.final_accuracy) and result.final_accuracy > 0.2  # it learns through the noise
