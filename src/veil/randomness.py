"""Generators for noise and sampling outside the MPC engine: seeded from ``secrets``, never fixed.

Library code takes an injected generator (tests pass a seeded one) and falls back to these.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch


def numpy_rng(rng: np.random.Generator | None = None) -> np.random.Generator:
    """``rng`` itself, or a numpy generator seeded with 128 bits from ``secrets``."""
    return rng if rng is not None else np.random.default_rng(secrets.randbits(128))


def torch_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with 63 bits from ``secrets``."""
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63))
    return g
