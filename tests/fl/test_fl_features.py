"""FLTask(features="scatter"): clients and server see fixed ScatterNet features of the images."""

import numpy as np
import pytest
import torch
from torch import nn

from veil.fl import FLError, FLTask
from veil.fl.apps import VeilClient
from veil.fl.privacy import RecordDP
from veil.fl.task import build_model, client_indices, feature_map, get_weights, load_task_data, task_data


def head() -> nn.Module:
    """A linear model on the digits' scattering features (81 x 2 x 2)."""
    return nn.Sequential(nn.GroupNorm(27, 81, affine=False), nn.Flatten(), nn.Linear(81 * 2 * 2, 10))


def test_scatter_features_replace_the_images_for_clients_and_server():
    task = FLTask(model="test_fl_features:head", data="digits", num_clients=3, features="scatter")
    x, y, xt, yt = task_data(task)
    raw = load_task_data("digits")
    assert x.shape == (len(raw[0]), 81, 2, 2) and xt.shape == (len(raw[2]), 81, 2, 2)
    assert torch.equal(y, raw[1]) and torch.equal(yt, raw[3]) and torch.isfinite(x).all()
    assert torch.allclose(x[:5], feature_map(raw[0][:5], "scatter"))  # the same map, image by image


def test_a_record_dp_client_trains_on_the_features():
    pytest.importorskip("opacus")
    task = FLTask(model="test_fl_features:head", data="digits", num_clients=3, features="scatter", batch_size=100,
                  lr=1.0, record_dp=RecordDP(3.0, rounds=5, max_grad_norm=0.1))
    start = get_weights(build_model(task.model))
    update, weight, metrics = VeilClient(task, 0).fit(start, {"round": 1})
    assert weight == len(client_indices(task, 0))
    assert 0 < metrics["epsilon"] <= 3.0
    assert max(float(np.abs(u - s).max()) for u, s in zip(update, start)) > 0


def test_unknown_features_are_refused():
    with pytest.raises(FLError, match="features must be one of"):
        FLTask(features="wavelets")
