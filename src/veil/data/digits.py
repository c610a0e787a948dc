"""The 8x8 handwritten digits bundled with scikit-learn (1,797 images, 10 classes): a small, fast dataset.

scikit-learn is an optional dependency, installed by the ``data`` extra (``pip install 'veil[data]'``).
"""

from __future__ import annotations

import numpy as np
import torch

DIGITS_SIDE = 8
DIGITS_MAX = 16  # pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images as ``(N, 1, 8, 8)`` float32 in [0, 1] (the counts 0..16 divided by 16), and
    their labels ``(N,)`` int64 in 0..9."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as e:
        raise ImportError("load_digits needs scikit-learn, which ships the 8x8 digits: install the data "
                          "extra with `pip install 'veil[data]'` (or `pip install scikit-learn`)") from e
    bunch = sklearn_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    if images.ndim != 3 or images.shape[1:] != (DIGITS_SIDE, DIGITS_SIDE) or labels.shape != images.shape[:1]:
        raise ValueError(f"scikit-learn's digits have an unexpected layout: images {images.shape}, "
                         f"labels {labels.shape}")
    x = torch.from_numpy(images / DIGITS_MAX).unsqueeze(1)
    return x, torch.from_numpy(labels)
