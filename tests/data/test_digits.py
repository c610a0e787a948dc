"""The 8x8 digits (veil.data.digits): scikit-learn's bundled set when installed, a clear error otherwise."""

from __future__ import annotations

import sys

import pytest
import torch

from veil.data import load_digits


def test_digits_shapes_and_ranges() -> None:
    pytest.importorskip("sklearn", reason="the data extra (scikit-learn) is not installed")
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert torch.equal(torch.unique(y), torch.arange(10))


def test_missing_scikit_learn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'veil\[data\]'"):
        load_digits()
