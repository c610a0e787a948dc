"""Networks that train well under DP-SGD, and the fixed scattering front end (Tramer & Boneh 2021).

DP-SGD adds noise of the same norm to every coordinate of the gradient, so fewer trainable
parameters and good *fixed* features help. The scattering transform (Mallat 2012; Oyallon &
Mallat 2015; computed with kymatio) is such a feature extractor: wavelet modulus coefficients up to
order 2 with J = 2 scales and L = 8 angles, i.e. 1 + J L + L^2 J (J - 1) / 2 = 81 channels at 1/4 of
the image side (28x28 -> 81x7x7). It is fixed in advance and applied to each image alone, so it
costs no privacy; DP-SGD then trains only a small head on it. Tramer & Boneh report 98.7% on MNIST
at epsilon = 3 with a linear head, against 98.1% for the best end-to-end CNN.

Heads normalise the scattering channels per example with GroupNorm (no learned affine, no batch
statistics: nothing to account), or by per-channel statistics estimated with DP
(:mod:`veil.dp.standardize`, accounted), then:

- ``scatter_linear``: one linear layer (39,690 parameters for 10 classes);
- ``scatter_cnn``: conv 3x3 stride 2 -> tanh -> conv 3x3 -> tanh -> linear -> tanh -> linear;
- ``tanh_cnn``: the end-to-end CNN of Papernot et al. 2020 / the Opacus MNIST example, with tanh
  ("tempered sigmoid") activations, on raw images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ScatterFeatures(nn.Module):
    """Scattering coefficients of images ``(N, C, H, W)`` -> ``(N, C * K, H / 2^J, W / 2^J)``; no parameters.

    ``J`` scales, ``L`` angles, ``K = 1 + J L + L^2 J (J - 1) / 2`` channels per input channel. Images are
    taken as given (e.g. pixels in [0, 1]).
    """

    def __init__(self, shape: tuple[int, int] = (28, 28), *, J: int = 2, L: int = 8) -> None:
        super().__init__()
        try:
            # kymatio.torch also imports its 3-D transform, which needs a SciPy function removed in
            # SciPy 1.15 (sph_harm); the 2-D front end does not, so it is imported directly.
            from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
        except ImportError as e:
            raise ImportError("the scattering front end needs kymatio: pip install 'veil[dp]'") from e
        if shape[0] % (2 ** J) or shape[1] % (2 ** J):
            raise ValueError(f"image side {shape} must be divisible by 2^J = {2 ** J}")
        self.shape = tuple(shape)
        self.J, self.L = J, L
        self.channels = 1 + J * L + L * L * J * (J - 1) // 2
        self.scattering = ScatteringTorch2D(J=J, shape=self.shape, L=L)

    def output_shape(self, in_channels: int = 1) -> tuple[int, int, int]:
        return (in_channels * self.channels, self.shape[0] // 2 ** self.J, self.shape[1] // 2 ** self.J)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.shape:
            raise ValueError(f"ScatterFeatures expects images (N, C, {self.shape[0]}, {self.shape[1]}), "
                             f"got {tuple(x.shape)}")
        s = self.scattering(x.contiguous())  # (N, C, K, H', W')
        return s.reshape(s.shape[0], -1, *s.shape[-2:])


def _groups(channels: int) -> int:
    for g in (27, 9, 3, 1):
        if channels % g == 0:
            return g
    return 1


def scatter_linear(in_shape: tuple[int, int, int] = (81, 7, 7), num_classes: int = 10, *,
                   norm: nn.Module | None = None) -> nn.Module:
    """Normalisation, then one linear layer, on scattering features. ``norm`` None: GroupNorm (per
    example, no affine, no privacy cost); or e.g. a :class:`veil.dp.standardize.Standardize` from
    private statistics."""
    c, h, w = in_shape
    first = norm if norm is not None else nn.GroupNorm(_groups(c), c, affine=False)
    return nn.Sequential(first, nn.Flatten(), nn.Linear(c * h * w, num_classes))


def scatter_cnn(in_shape: tuple[int, int, int] = (81, 7, 7), num_classes: int = 10, *,
                channels: tuple[int, int] = (16, 32), hidden: int = 32) -> nn.Module:
    """GroupNorm, then a small tanh CNN on scattering features (Tramer & Boneh's ScatterNet+CNN shape)."""
    c, h, w = in_shape
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    return nn.Sequential(
        nn.GroupNorm(_groups(c), c, affine=False),
        nn.Conv2d(c, channels[0], 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(channels[1] * h2 * w2, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))


def tanh_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """The end-to-end 28x28 CNN of Papernot et al. 2020 (tempered sigmoids) and Opacus's MNIST example."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, num_classes))


HEADS: dict[str, Callable[..., nn.Module]] = {"scatter-linear": scatter_linear, "scatter-cnn": scatter_cnn}
ARCHITECTURES = ("scatter-linear", "scatter-cnn", "tanh-cnn")


def build(arch: str, *, image_shape: tuple[int, int, int] = (1, 28, 28),
          num_classes: int = 10) -> tuple[nn.Module, ScatterFeatures | None]:
    """(head, frontend) of a DP architecture by name; frontend is None for end-to-end models."""
    if arch == "tanh-cnn":
        if tuple(image_shape[1:]) != (28, 28):
            raise ValueError(f"tanh-cnn is built for 28x28 images, got {image_shape}")
        return tanh_cnn(image_shape[0], num_classes), None
    if arch not in HEADS:
        raise ValueError(f"unknown DP architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    frontend = ScatterFeatures((image_shape[1], image_shape[2]))
    return HEADS[arch](frontend.output_shape(image_shape[0]), num_classes), frontend
