"""Feature standardisation with DP statistics (veil.dp.standardize) and its composition with DP-SGD."""

import math

import pytest
import torch
from torch import nn

from veil.dp.standardize import Standardize, clip_norms_for, private_standardizer
from veil.dp.train import DPSGDConfig, calibrate_noise, spent_epsilon, train_dp


def test_estimates_match_the_data_up_to_the_calibrated_noise():
    g = torch.Generator().manual_seed(0)
    n, c = 20_000, 3
    x = torch.rand(n, c, 4, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5]).reshape(1, c, 1, 1)
    true_mean = x.mean(dim=(0, 2, 3))
    true_std = x.permute(1, 0, 2, 3).reshape(c, -1).std(dim=1)
    b1, b2 = clip_norms_for(math.sqrt(16 * c * 4.0), 16)  # every row is within the bounds: nothing clipped
    sigma = 2.0
    means = []
    for seed in range(200):
        module, history = private_standardizer(x, noise_multiplier=sigma, clip_norms=(b1, b2),
                                               generator=torch.Generator().manual_seed(seed))
        means.append(module.mean.flatten())
    assert history == [(2.0, 1.0, 2)]
    means_t = torch.stack(means).double()
    # unbiased, and the spread is the Gaussian mechanism's: sigma * B1 / (n * 16) per channel
    expected_sd = sigma * b1 / (n * 16)
    assert torch.allclose(means_t.mean(0), true_mean.double(), atol=4 * expected_sd / math.sqrt(200))
    assert means_t.std(0).div(expected_sd).sub(1).abs().max() < 0.2
    assert torch.allclose(module.std.flatten(), true_std, rtol=0.1)  # one draw; noisier (second moments)


def test_rows_beyond_the_clip_norm_are_clipped():
    x = torch.ones(1000, 2, 2, 2)  # a_i = (4, 4), norm 5.66; clipped to 1 -> each entry 1/sqrt(2)
    module, _ = private_standardizer(x, noise_multiplier=1e-9, clip_norms=(1.0, 100.0))
    assert torch.allclose(module.mean.flatten(), torch.full((2,), 1 / math.sqrt(2) / 4), rtol=1e-6)


def test_standardize_module_and_errors():
    m = Standardize(torch.tensor([[1.0]]), torch.tensor([[2.0]]))
    assert torch.equal(m(torch.tensor([[[3.0]]])), torch.tensor([[[1.0]]]))
    with pytest.raises(ValueError, match="std must be positive"):
        Standardize(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="noise_multiplier"):
        private_standardizer(torch.ones(4, 2, 2, 2), noise_multiplier=0.0, clip_norms=(1.0, 1.0))
    with pytest.raises(ValueError, match="dims must be axes after the channel axis"):
        private_standardizer(torch.ones(4, 2, 2, 2), noise_multiplier=1.0, clip_norms=(1.0, 1.0), dims=(1, 2))
    with pytest.raises(ValueError, match="positive input norm bound"):
        clip_norms_for(-1.0, 4)


def test_prior_spending_is_composed_and_left_room_for():
    torch.manual_seed(0)
    x, y = torch.randn(600, 2, 3, 3), torch.randint(0, 3, (600,))
    norm, prior = private_standardizer(x, noise_multiplier=4.0, clip_norms=clip_norms_for(10.0, 9))
    model = nn.Sequential(norm, nn.Flatten(), nn.Linear(18, 3))
    config = DPSGDConfig(target_epsilon=2.0, delta=1e-4, epochs=3, batch_size=100, lr=1.0)
    result = train_dp(model, (x, y), config=config, progress=False, prior_privacy=prior)
    q = 100 / 600
    assert 1.98 <= result.epsilon <= 2.0
    assert result.epsilon == pytest.approx(
        spent_epsilon([*prior, (result.noise_multiplier, q, result.steps)], 1e-4, "prv"), rel=1e-9)
    without = calibrate_noise(target_epsilon=2.0, delta=1e-4, sample_rate=q, steps=result.steps)
    assert result.noise_multiplier > without  # the statistics' share of the budget costs extra noise
    assert result.privacy()["prior_spending"] == [[4.0, 1.0, 2]]
