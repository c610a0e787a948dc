"""The translator's networks (images ``(N, C, H, W)`` in [0, 1], H and W multiples of 4): the
frozen local classifier, the style encoder, the class-conditional generator and the projection
discriminator. :mod:`veil.semantic.translator` wires and trains them."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def local_classifier(channels: int = 1, side: tuple[int, int] = (28, 28), num_classes: int = 10) -> nn.Module:
    """The frozen judge of class consistency: conv32-pool-conv64-pool-fc128 (on [0, 1] pixels)."""
    h, w = side[0] // 4, side[1] // 4
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * h * w, 128), nn.ReLU(), nn.Linear(128, num_classes))


class StyleEncoder(nn.Module):
    """``x -> (mean, log-variance)`` of a ``style_dim``-number code (a variational bottleneck)."""

    def __init__(self, channels: int, side: tuple[int, int], style_dim: int) -> None:
        super().__init__()
        h, w = side[0] // 4, side[1] // 4
        self.style_dim = style_dim
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(64 * h * w, 2 * style_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.net(x * 2 - 1).chunk(2, dim=1)
        return mean, logvar.clamp(-10, 10)


class Generator(nn.Module):
    """``(style code, class) -> image``: upsampling and convolutions (no transposed-convolution
    checkerboard), the class fed in at the start and again at half resolution."""

    def __init__(self, channels: int, side: tuple[int, int], style_dim: int, num_classes: int) -> None:
        super().__init__()
        self.h, self.w = side[0] // 4, side[1] // 4
        self.num_classes = num_classes
        # no batch normalisation: a decoy must not depend on the other images of its batch, and
        # training and inference must draw alike
        self.fc = nn.Sequential(nn.Linear(style_dim + num_classes, 128 * self.h * self.w), nn.LeakyReLU(0.2))
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(128, 64, 3, padding=1), nn.LeakyReLU(0.2))
        self.up2 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(64 + num_classes, 32, 3, padding=1),
                                 nn.LeakyReLU(0.2), nn.Conv2d(32, channels, 3, padding=1), nn.Sigmoid())

    def forward(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(classes, self.num_classes).to(z.dtype)
        h = self.fc(torch.cat([z, onehot], dim=1)).view(-1, 128, self.h, self.w)
        h = self.up1(h)
        planes = onehot[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
        return self.up2(torch.cat([h, planes], dim=1))


class Discriminator(nn.Module):
    """Projection discriminator (Miyato & Koyama 2018) with spectral normalisation."""

    def __init__(self, channels: int, side: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        h, w = side[0] // 4, side[1] // 4
        self.body = nn.Sequential(
            sn(nn.Conv2d(channels, 64, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(64, 128, 4, 2, 1)), nn.LeakyReLU(0.2), nn.Flatten())
        self.out = sn(nn.Linear(128 * h * w, 1))
        self.embed = sn(nn.Embedding(num_classes, 128 * h * w))

    def forward(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        h = self.body(x * 2 - 1)
        return self.out(h).squeeze(1) + (self.embed(classes) * h).sum(dim=1)
