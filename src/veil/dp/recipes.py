"""DP-SGD hyperparameters per architecture and privacy budget: what reached the README's MNIST figures.

One table for ``veil train --dp`` and ``benchmarks/dp_mnist.py``. A recipe is a starting point for
other data, not a promise. Choosing hyperparameters by test accuracy is not accounted for (as in the
literature); on new private data, tune them on public or synthetic data of the same kind.

- ``scatter-linear`` (a linear layer on scattering features, 4 shifted copies per image): large
  Poisson batches (16,384 expected) and 200 epochs, so that each step's noise is small against the
  summed gradient (De et al. 2022). Below epsilon 2 the sampling rate of such batches (0.27 of
  60,000) gives little amplification: batches of 8,192 and 100 epochs did better there (97.9%
  against 96.9% at epsilon 1, one view).
- ``scatter-cnn``, ``tanh-cnn``: the small CNN on scattering features, and the end-to-end tanh CNN
  of Papernot et al. 2020.
- ``GENERIC``: any other model (e.g. one of the MPC zoo's).
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "scatter-linear": {"batch_size": 16384, "lr": 16.0, "max_grad_norm": 0.1, "epochs": 200,
                       "ema_decay": 0.99, "views": 4},
    "scatter-cnn": {"batch_size": 2048, "lr": 2.0, "max_grad_norm": 0.1, "epochs": 40, "ema_decay": 0.99,
                    "views": 0},
    "tanh-cnn": {"batch_size": 512, "lr": 0.5, "max_grad_norm": 1.0, "epochs": 40, "ema_decay": None, "views": 0},
}
SMALL_EPSILON = 2.0  # below this target, SMALL_EPSILON_RECIPES overrides
SMALL_EPSILON_RECIPES: dict[str, dict[str, Any]] = {
    "scatter-linear": {"batch_size": 8192, "lr": 8.0, "epochs": 100},
}
GENERIC: dict[str, Any] = {"batch_size": 512, "lr": 0.5, "max_grad_norm": 1.0, "epochs": 20, "ema_decay": None,
                           "views": 0}


def recipe_for(arch: str, epsilon: float | None = None) -> dict[str, Any]:
    """A fresh copy of the recipe of ``arch`` at target ``epsilon`` (``None``: a fixed noise
    multiplier, the large-epsilon recipe); an architecture without one gets ``GENERIC``. Keys:
    ``batch_size``, ``lr``, ``max_grad_norm``, ``epochs``, ``ema_decay`` (DPSGDConfig fields) and
    ``views`` (shifted copies per image, 0 for none)."""
    recipe = dict(RECIPES.get(arch, GENERIC))
    if epsilon is not None and epsilon < SMALL_EPSILON:
        recipe.update(SMALL_EPSILON_RECIPES.get(arch, {}))
    return recipe
