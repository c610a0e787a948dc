"""The DP-SGD recipe table shared by `veil train --dp` and the benchmark."""

from __future__ import annotations

import pytest

from veil.dp.models import ARCHITECTURES
from veil.dp.recipes import GENERIC, SMALL_EPSILON, recipe_for
from veil.dp.train import DPSGDConfig


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "lenet"])
@pytest.mark.parametrize("epsilon", [0.5, 3.0, 8.0, None])
def test_every_recipe_makes_a_valid_config(arch, epsilon):
    recipe = recipe_for(arch, epsilon)
    views = recipe.pop("views")
    assert views in (0, 4, 8)
    config = DPSGDConfig(target_epsilon=epsilon if epsilon is not None else None,
                         noise_multiplier=None if epsilon is not None else 1.0, **recipe)
    assert config.epochs >= 1 and config.batch_size >= 1


def test_small_epsilon_takes_smaller_batches_for_the_scattering_linear_model():
    small, large = recipe_for("scatter-linear", SMALL_EPSILON / 2), recipe_for("scatter-linear", SMALL_EPSILON)
    assert small["batch_size"] < large["batch_size"]
    assert recipe_for("scatter-linear", None) == large  # a fixed noise multiplier: the large-epsilon recipe
    assert large["views"] == 4


def test_recipes_are_fresh_copies_and_unknown_models_get_the_generic_one():
    recipe_for("scatter-linear", 3.0)["batch_size"] = 1
    assert recipe_for("scatter-linear", 3.0)["batch_size"] > 1
    assert recipe_for("my-own-model", 1.0) == GENERIC
    assert recipe_for("my-own-model", 1.0) is not GENERIC
