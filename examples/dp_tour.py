"""A tour of veil.dp: the differencing attack, the Laplace mechanism that stops it, randomized response,
PATE on scikit-learn's digits, and a short DP-SGD run with its accounting.

    python examples/dp_tour.py
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from veil.data.digits import load_digits
from veil.dp import (
    DPSGDConfig,
    PrivacyAccountant,
    private_count,
    randomized_response,
    randomized_response_estimate,
    run_pate,
    train_dp,
)


def differencing_attack() -> None:
    # Salaries of a team; the analyst may only ask aggregate counts. "How many earn over 100k?" asked
    # with and without Bob (who just left) gives away Bob's salary bracket exactly.
    rng = np.random.default_rng()  # the demo's data, not a secret
    salaries = rng.normal(90, 20, size=200)
    bob = 130.0
    with_bob = np.append(salaries, bob)
    exact = int((with_bob > 100).sum()) - int((salaries > 100).sum())
    print(f"differencing attack, exact counts: Bob earns over 100k? {bool(exact)} (always right)")
    # With the Laplace mechanism (count sensitivity 1, epsilon 0.5 per query) the two answers differ by
    # noise of scale 2 per query: the attacker's guess is right only a little more often than chance.
    accountant = PrivacyAccountant()
    trials, right = 2000, 0
    for _ in range(trials):
        a = private_count(with_bob, 100, 1e6, 0.5)
        b = private_count(salaries, 100, 1e6, 0.5)
        right += (a - b > 0.5) == (bob > 100)
    private_count(with_bob, 100, 1e6, 0.5, accountant=accountant)
    private_count(salaries, 100, 1e6, 0.5, accountant=accountant)
    spent = accountant.spent()
    print(f"with Laplace noise (epsilon 0.5 per count): attacker right {right / trials:.0%} of the time "
          f"(at most e^1 / (1 + e^1) = 73% for the two queries' epsilon {spent.epsilon:g})")


def survey() -> None:
    truth = np.random.default_rng().random(10_000) < 0.3  # 30% answer "yes" to a sensitive question
    responses = randomized_response(truth, epsilon=1.0)
    est = randomized_response_estimate(responses, epsilon=1.0)
    print(f"randomized response (epsilon 1 per person): true 30.0%, estimated {100 * est.proportion:.1f}% "
          f"+- {100 * est.standard_error:.1f}%")


def pate() -> None:
    x, y = load_digits()
    x = x.flatten(1)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    result = run_pate(lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
                      (x[:1200], y[:1200]), x[1200:1500], (x[1500:], y[1500:]), num_teachers=10,
                      teacher_epochs=30, student_epochs=50, batch_size=32, lr=1e-2, num_classes=10,
                      aggregator="gnmax", sigma=2.0, progress=False)
    labels = result.labels
    print(f"PATE: 10 teachers ({100 * (result.teacher_accuracy_mean or 0):.1f}% each on average), "
          f"{labels.num_answered} noisy labels, student {100 * (result.student_accuracy or 0):.1f}%; "
          f"epsilon {labels.epsilon_data_independent:.1f} (data-independent, publishable), "
          f"{labels.epsilon_data_dependent:.1f} (data-dependent) at delta {labels.delta:g}")


def dp_sgd() -> None:
    x, y = load_digits()
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    config = DPSGDConfig(target_epsilon=3.0, delta=1e-4, epochs=15, batch_size=256, lr=2.0, max_grad_norm=1.0)
    result = train_dp(model, (x[:1400], y[:1400]), config=config, test=(x[1400:], y[1400:]), progress=False)
    print(f"DP-SGD: test accuracy {100 * (result.test_accuracy or 0):.1f}% at epsilon {result.epsilon:.2f} "
          f"(target 3, delta 1e-4; noise multiplier {result.noise_multiplier:.2f}, {result.steps} steps)")


if __name__ == "__main__":
    differencing_attack()
    survey()
    pate()
    dp_sgd()
