"""PNG plots of DP training (veil.dp.plots)."""

import pytest

from veil.dp.plots import plot_accuracy_vs_epsilon, plot_privacy_curve, plot_privacy_curves
from veil.dp.train import EpochRecord

PNG = b"\x89PNG\r\n\x1a\n"


def _history(n: int) -> list[EpochRecord]:
    return [EpochRecord(epoch=i + 1, steps=10 * (i + 1), loss=1.0 / (i + 1), epsilon=0.5 * (i + 1),
                        epsilon_prv=0.5 * (i + 1), epsilon_rdp=0.6 * (i + 1), test_accuracy=0.8 + 0.01 * i,
                        seconds=1.0) for i in range(n)]


def test_plots_are_written_atomically_as_png(tmp_path):
    runs = [{"epsilon": 1.0, "test_accuracy": 0.97}, {"epsilon": 3.0, "test_accuracy": 0.987}]
    refs = [{"epsilon": 1.19, "test_accuracy": 0.946, "label": "Opacus"}, {"epsilon": 3.01, "test_accuracy": 0.968,
                                                                          "label": "Opacus"}]
    paths = [plot_accuracy_vs_epsilon(runs, tmp_path / "acc.png", references=refs, non_private=0.99),
             plot_privacy_curve(_history(5), tmp_path / "eps.png", delta=1e-5, target_epsilon=3.0),
             plot_privacy_curves({"a": _history(3), "b": _history(4)}, tmp_path / "all.png", delta=1e-5)]
    for p in paths:
        assert p.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.png", "all.png", "eps.png"]


def test_plots_refuse_empty_input(tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        plot_accuracy_vs_epsilon([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one epoch"):
        plot_privacy_curve([], tmp_path / "x.png", delta=1e-5)
