"""Image datasets by name or by file, for the command line (``veil infer --data ...``).

``source`` is one of:

* ``mnist``: MNIST (``veil.data.load_mnist``; ``mnist_path`` or ``$VEIL_MNIST`` pick the files),
  normalised as in the usual MNIST pipelines;
* ``digits``: scikit-learn's bundled 8x8 digits as ``(N, 1, 8, 8)`` images (all 1,797; no split);
* a ``.npz`` file with arrays ``images`` (or ``x``) and optionally ``labels`` (or ``y``), or in
  the Keras layout (``x_train``, ``y_train``, ``x_test``, ``y_test``: ``split`` picks; uint8 pixels
  are scaled to [0, 1]), e.g. a decoy set of :mod:`veil.semantic`;
* a ``.npy`` file of images (no labels);
* a ``.pt`` file holding a tensor of images or a dict with ``images`` and optionally ``labels``
  (read with ``weights_only=True``: no code runs).

Images are returned as float32 ``(N, ...)`` tensors, labels as int64 ``(N,)`` or None.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from veil.files import torch_load_problem

NAMED = ("mnist", "digits")
DIGITS_TRAIN = 1400  # load_pixels' train/test split of the 1,797 digits


class DatasetError(ValueError):
    """A dataset file that is missing, unreadable or not shaped like images (and labels)."""


def load_images(source: str | Path, *, split: str = "test", limit: int | None = None,
                mnist_path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images and labels (None if the source has none) of ``source``; the first ``limit`` only."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    name = str(source)
    if name == "mnist":
        from veil.data.mnist import load_mnist

        x, labels = load_mnist(split, path=mnist_path)  # type: ignore[arg-type]
        y: torch.Tensor | None = labels
    elif name == "digits":
        from veil.data.digits import load_digits

        x, y = load_digits()  # one set of 1,797 images: no split
    else:
        x, y = _from_file(Path(name), split)
    if limit is not None:
        x, y = x[:limit], (y[:limit] if y is not None else None)
    return x, y


def load_pixels(source: str, split: str = "test", limit: int | None = None, *,
                mnist_path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like :func:`load_images` but with pixels in [0, 1], not normalised (what networks for decoys and
    for homomorphic encryption take), and ``digits`` split into a train part (the first 1,400) and a
    test part (the other 397). Files with 0..255 integer pixels are scaled."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be positive, got {limit}")
    if source == "mnist":
        from veil.data.mnist import load_mnist

        x, y = load_mnist(split, normalize=False, path=mnist_path)  # type: ignore[arg-type]
    elif source == "digits":
        from veil.data.digits import load_digits

        x, y = load_digits()
        x, y = (x[:DIGITS_TRAIN], y[:DIGITS_TRAIN]) if split == "train" else (x[DIGITS_TRAIN:], y[DIGITS_TRAIN:])
    else:
        x, y = load_images(source, split=split)
        if x.numel() and float(x.max()) > 1 and float(x.max()) <= 255 and torch.equal(x, x.round()):
            x = x / 255  # 0..255 integer pixels
    if limit is not None:
        x, y = x[:limit], (y[:limit] if y is not None else None)
    return x, y


def _from_file(path: Path, split: str = "test") -> tuple[torch.Tensor, torch.Tensor | None]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (use 'mnist', 'digits', or a .npz/.npy/.pt file)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                xk = next((k for k in ("images", "x") if k in z.files), None)
                yk = next((k for k in ("labels", "y") if k in z.files), None)
                keras = xk is None and f"x_{split}" in z.files  # Keras layout: x_train, y_train, x_test, ...
                if keras:
                    xk, yk = f"x_{split}", (f"y_{split}" if f"y_{split}" in z.files else None)
                if xk is None:
                    raise DatasetError(f"{path}: no 'images' (or 'x', or 'x_{split}') array; it has {z.files}")
                x, y = torch.from_numpy(np.asarray(z[xk])), (torch.from_numpy(np.asarray(z[yk])) if yk else None)
                if keras and x.dtype == torch.uint8:
                    x = x.float() / 255  # Keras-layout pixels (mnist.npz, decoy sets) are 0..255
        elif suffix == ".npy":
            x, y = torch.from_numpy(np.load(path, allow_pickle=False)), None
        elif suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, torch.Tensor):
                x, y = obj, None
            elif isinstance(obj, dict) and isinstance(obj.get("images"), torch.Tensor):
                x, y = obj["images"], obj.get("labels")
            else:
                raise DatasetError(f"{path}: expected a tensor or a dict with 'images' (and 'labels')")
        else:
            raise DatasetError(f"{path}: unknown dataset format {suffix!r} (use .npz, .npy or .pt)")
    except DatasetError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise DatasetError(f"{path}: cannot read the dataset: {torch_load_problem(e)}") from None
    if x.dim() < 2 or len(x) == 0:
        raise DatasetError(f"{path}: images need shape (N, ...) with N >= 1, got {tuple(x.shape)}")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.shape != (len(x),):
            raise DatasetError(f"{path}: labels must have shape ({len(x)},), got "
                               f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        y = y.long()
    return x.float(), y
