"""Augmentation multiplicity: one clipped gradient per record, averaged over its views."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from veil.data.digits import load_digits
from veil.dp.train import DPSGDConfig, DPTrainingError, train_dp
from veil.dp.views import SHIFTS_4, ViewCrossEntropy, apply_fixed, shifted_views, split_for_views


def test_view_loss_is_the_mean_over_views_of_the_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    per_view = torch.stack([F.cross_entropy(logits[:, k], y, reduction="none") for k in range(3)], 1)
    assert torch.allclose(ViewCrossEntropy("none")(logits, y), per_view.mean(1), atol=1e-6)
    assert torch.allclose(ViewCrossEntropy()(logits, y), per_view.mean(), atol=1e-6)
    assert torch.allclose(ViewCrossEntropy("sum")(logits, y), per_view.mean(1).sum(), atol=1e-5)
    # one view: plain cross-entropy
    assert torch.allclose(ViewCrossEntropy()(logits[:, 0], y), F.cross_entropy(logits[:, 0], y), atol=1e-6)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_record_gradient_is_the_average_of_its_views_gradients():
    """Opacus's per-example gradient of a linear layer on (records, views, features) is one per record:
    the mean of the gradients of the record's views (the views are not separate records)."""
    from opacus import GradSampleModule

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 10, generator=g)  # 4 records, 3 views of 10 features
    y = torch.randint(0, 4, (4,), generator=g)
    layer = nn.Linear(10, 4)
    module = GradSampleModule(nn.Sequential(layer), batch_first=True, loss_reduction="sum")
    ViewCrossEntropy("sum")(module(x), y).backward()
    got = layer.weight.grad_sample
    assert got.shape == (4, 4, 10)
    for i in range(4):
        grads = []
        for k in range(3):
            w = layer.weight.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(F.linear(x[i, k][None], w, layer.bias.detach()), y[i:i + 1])
            grads.append(torch.autograd.grad(loss, w)[0])
        assert torch.allclose(got[i], torch.stack(grads).mean(0), atol=1e-5)


def test_split_keeps_fixed_layers_in_front_and_applies_them_to_every_view():
    model = nn.Sequential(nn.GroupNorm(1, 2, affine=False), nn.Flatten(), nn.Linear(10, 4), nn.Tanh(), nn.Linear(4, 3))
    fixed, trained = split_for_views(model)
    assert [type(m) for m in fixed] == [nn.GroupNorm, nn.Flatten]
    assert trained[0] is model[2] and len(trained) == 3
    x = torch.randn(5, 3, 2, 5)  # 5 records, 3 views of (2, 5)
    out = apply_fixed(fixed, x, views=True, batch_size=4)
    assert out.shape == (5, 3, 10)
    assert torch.allclose(out[2, 1], fixed(x[2, 1:2])[0])
    assert apply_fixed(fixed, x[:, 0], views=False).shape == (5, 10)


def test_split_refuses_what_cannot_take_a_view_axis():
    with pytest.raises(DPTrainingError, match=r"to be nn\.Linear.*found Conv2d"):
        split_for_views(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)))
    with pytest.raises(DPTrainingError, match=r"nn\.Sequential"):
        split_for_views(nn.Linear(3, 2))
    with pytest.raises(DPTrainingError, match="dropout"):
        split_for_views(nn.Sequential(nn.Dropout(0.5), nn.Linear(3, 2)))


def test_shifted_views_translate_each_image_with_zeros_shifted_in():
    images = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5) + 1
    views = shifted_views(images, SHIFTS_4)
    assert views.shape == (2, 5, 1, 4, 5)
    assert torch.equal(views[:, 0], images)
    down = views[:, 1]  # (dy, dx) = (1, 0): row r of the view is row r - 1 of the image
    assert torch.equal(down[..., 1:, :], images[..., :-1, :]) and bool((down[..., 0, :] == 0).all())
    left = views[:, 4]  # (0, -1): column c of the view is column c + 1 of the image
    assert torch.equal(left[..., :, :-1], images[..., :, 1:]) and bool((left[..., :, -1] == 0).all())
    # a transform is applied to each view
    summed = shifted_views(images, [(0, 2)], transform=lambda t: t.sum((-2, -1)))
    assert summed.shape == (2, 2, 1)
    assert torch.equal(summed[:, 1], images[..., :, :3].sum((-2, -1)))


def test_train_with_views_spends_its_target_learns_and_returns_the_plain_model():
    x, y = load_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    train_views = shifted_views(x[:1400], SHIFTS_4)  # (1400, 5, 1, 8, 8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    config = DPSGDConfig(target_epsilon=4.0, delta=1e-4, epochs=6, batch_size=200, lr=2.0, max_grad_norm=1.0)
    torch.manual_seed(2)
    result = train_dp(model, (train_views, y[:1400]), config=config, test=(x[1400:], y[1400:]),
                      progress=False, views=True)
    assert 3.9 < result.epsilon <= 4.0
    assert result.records == 1400  # records, not views: the accountant's unit
    # the model as given (same state_dict keys), taking one view
    assert set(result.model.state_dict()) == {"1.weight", "1.bias"}
    assert result.model(x[1400:1410]).shape == (10, 10)
    assert result.test_accuracy is not None and result.test_accuracy > 0.75


def test_views_with_mismatched_test_records_are_refused():
    x = torch.randn(20, 3, 1, 8, 8)
    y = torch.randint(0, 10, (20,))
    config = DPSGDConfig(target_epsilon=4.0, delta=1e-4, epochs=1, batch_size=10)
    with pytest.raises(DPTrainingError, match="test record has shape"):
        train_dp(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (x, y), config=config,
                 test=(torch.randn(5, 64), y[:5]), progress=False, views=True)


def test_views_through_a_frontend_return_frontend_and_model():
    """scatter-linear with views of shifted images: the scattering is applied to every view once, and
    the returned model is the frontend then the head, as without views."""
    from veil.dp.models import build

    x, y = load_digits()
    head, frontend = build("scatter-linear", image_shape=(1, 8, 8))
    config = DPSGDConfig(target_epsilon=8.0, delta=1e-4, epochs=8, batch_size=400, lr=4.0, max_grad_norm=0.1,
                         ema_decay=0.9)
    torch.manual_seed(3)
    result = train_dp(head, (shifted_views(x[:1400], SHIFTS_4), y[:1400]), config=config,
                      test=(x[1400:], y[1400:]), frontend=frontend, progress=False, views=True)
    assert result.epsilon <= 8.0
    assert isinstance(result.model[0], type(frontend))
    assert result.model(x[1400:1405]).shape == (5, 10)
    assert result.test_accuracy is not None and result.test_accuracy > 0.8


def test_apply_fixed_can_write_over_its_input():
    fixed = nn.Sequential(nn.GroupNorm(1, 2, affine=False), nn.Flatten())
    x = torch.randn(7, 3, 2, 5)
    expected = apply_fixed(fixed, x, views=True)
    out = apply_fixed(fixed, x, views=True, batch_size=3, overwrite=True)
    assert torch.allclose(out, expected) and out.data_ptr() == x.data_ptr()
