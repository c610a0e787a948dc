"""Every layer veil.nn supports, on shares, against plaintext PyTorch on random inputs.

Bob owns the model (weights secret-shared), alice the input; both open the result (tests only).
Bounds: layers made of Beaver products and local truncations are off by a few units of 2^-16 per
accumulated product (atol 2e-3 covers fan-ins up to ~400 with weights of PyTorch's default init);
sigmoid/tanh/softmax carry their documented approximation error (veil.mpc.approx).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from nn_testing import randomize_batch_norm, secure_forward
from torch import nn

from veil.nn import from_torch

LINEAR_ATOL = 2e-3


def _inputs(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _module(seed: int, *layers: nn.Module) -> nn.Module:
    torch.manual_seed(seed)  # PyTorch's default init draws from the global generator
    return nn.Sequential(*layers).eval()


def check(module: nn.Module, x: torch.Tensor, atol: float = LINEAR_ATOL) -> None:
    module.eval()
    with torch.no_grad():
        want = module(x).double()
    got = secure_forward(module, x)
    assert got.shape == want.shape
    err = float((got - want).abs().max())
    assert err <= atol, f"max abs error {err:.2e} > {atol:.0e}"


LAYERS = {
    "linear": (lambda: _module(1, nn.Linear(20, 7)), (3, 20)),
    "linear_no_bias_3d": (lambda: _module(2, nn.Linear(6, 4, bias=False)), (2, 5, 6)),
    "conv2d": (lambda: _module(3, nn.Conv2d(3, 4, 3)), (2, 3, 9, 9)),
    "conv2d_stride_padding": (lambda: _module(4, nn.Conv2d(2, 4, 3, stride=2, padding=1)), (2, 2, 9, 9)),
    "conv2d_groups_dilation": (lambda: _module(5, nn.Conv2d(4, 4, 3, groups=2, dilation=2)), (1, 4, 10, 10)),
    "conv2d_rect": (lambda: _module(6, nn.Conv2d(1, 2, (3, 5), stride=(1, 2), padding=(1, 0))), (2, 1, 8, 11)),
    "relu": (lambda: _module(7, nn.ReLU()), (4, 33)),
    "maxpool2d": (lambda: _module(8, nn.MaxPool2d(2)), (2, 3, 8, 8)),
    "maxpool2d_3_s2_p1": (lambda: _module(9, nn.MaxPool2d(3, stride=2, padding=1)), (1, 2, 9, 9)),
    "avgpool2d": (lambda: _module(10, nn.AvgPool2d(2)), (2, 3, 8, 8)),
    "avgpool2d_3_s1_p1": (lambda: _module(11, nn.AvgPool2d(3, stride=1, padding=1)), (1, 2, 6, 6)),
    "adaptive_avgpool_1": (lambda: _module(12, nn.AdaptiveAvgPool2d(1)), (2, 3, 6, 6)),
    "adaptive_avgpool_uneven": (lambda: _module(13, nn.AdaptiveAvgPool2d((3, 2))), (2, 2, 7, 5)),
    "flatten": (lambda: _module(14, nn.Flatten(), nn.Linear(18, 3)), (2, 2, 3, 3)),
    "dropout_identity": (lambda: _module(15, nn.Dropout(0.5), nn.Identity(), nn.Linear(4, 2)), (3, 4)),
    "dropout2d": (lambda: _module(32, nn.Conv2d(1, 2, 3), nn.Dropout2d(0.3)), (2, 1, 5, 5)),
    "sigmoid": (lambda: _module(16, nn.Sigmoid()), (3, 50)),
    "tanh": (lambda: _module(17, nn.Tanh()), (3, 50)),
    "softmax": (lambda: _module(18, nn.Softmax(dim=1)), (4, 10)),
    "log_softmax": (lambda: _module(19, nn.LogSoftmax(dim=-1)), (4, 10)),
}
ATOL = {"sigmoid": 1e-3 + LINEAR_ATOL, "tanh": 2e-3 + LINEAR_ATOL, "softmax": 2e-3, "log_softmax": 2e-2}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_matches_pytorch(name: str) -> None:
    make, shape = LAYERS[name]
    check(make(), _inputs(zlib.crc32(name.encode()), *shape, scale=2.0), ATOL.get(name, LINEAR_ATOL))


def test_batch_norm_folded_into_conv_and_linear() -> None:
    model = _module(20, nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4),
                    nn.BatchNorm1d(4))
    randomize_batch_norm(model, 1)
    assert "batch_norm" not in from_torch(model).graph.ops()  # both folded
    check(model, _inputs(21, 3, 2, 5, 5))


def test_batch_norm_alone_is_an_affine_map() -> None:
    model = _module(22, nn.BatchNorm2d(3), nn.ReLU())  # nothing to fold into
    randomize_batch_norm(model, 2)
    assert "batch_norm" in from_torch(model).graph.ops()
    check(model, _inputs(23, 2, 3, 4, 4))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        y = x + self.conv2(y)  # residual add
        z = torch.cat([y, F.max_pool2d(x, 1)], dim=1)  # cat
        z = F.avg_pool2d(z, 2)
        return F.softmax(self.fc(z.view(z.size(0), -1)), dim=1)


def test_residual_cat_view_functional_forms() -> None:
    torch.manual_seed(24)
    check(Residual().eval(), _inputs(25, 2, 3, 4, 4), atol=2e-3)


class Arithmetic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) * 0.5 - x / 4  # public scalars
        y = y * x  # secret * secret
        y = torch.sigmoid(y) + torch.tanh(x)
        return y.transpose(0, 1).reshape(-1).mean(0, keepdim=True) + y.sum()


def test_arithmetic_and_shape_methods() -> None:
    torch.manual_seed(26)
    check(Arithmetic().eval(), _inputs(27, 4, 6), atol=1e-2)


def test_relu_then_maxpool_runs_the_pool_first() -> None:
    """The rewrite keeps the result and compares 4x fewer elements (fewer bytes on the wire)."""
    model = _module(28, nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))
    ops = from_torch(model).graph.ops()
    assert ops.index("max_pool2d") < ops.index("relu")
    check(model, _inputs(29, 2, 1, 10, 10))


def test_lenet_shaped_network() -> None:
    from veil.nn.zoo import LeNet

    torch.manual_seed(30)
    check(LeNet().eval(), _inputs(31, 2, 1, 28, 28), atol=5e-3)
