"""`veil train --dp`: DP-SGD on plaintext data from the command line; the privacy is printed and saved."""

from __future__ import annotations

import json

import pytest
import torch

from veil.cli.main import main as veil_main
from veil.dp.train import load_dp_model


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_dp_training_on_digits_saves_model_plot_and_privacy(tmp_path, capsys):
    out, plot, history = tmp_path / "m.pt", tmp_path / "eps.png", tmp_path / "h.json"
    code = veil_main(["train", "--dp", "--arch", "scatter-linear", "--data", "digits", "--epsilon", "5",
                      "--delta", "1e-4", "--epochs", "3", "--batch-size", "256", "--out", str(out),
                      "--plot", str(plot), "--history", str(history), "--json", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 4.5 < summary["epsilon"] <= 5.0 and summary["delta"] == 1e-4 and summary["accountant"] == "prv"
    assert summary["epochs"] == 3 and summary["steps"] == 3 * 7
    assert summary["views"] == 5  # the recipe's augmentation multiplicity: the image and 4 shifted copies
    payload = load_dp_model(out)
    assert payload["arch"] == "scatter-linear"
    assert payload["privacy"]["epsilon"] == pytest.approx(summary["epsilon"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads(history.read_text())["history"]) == 3


def test_dp_training_needs_a_target_and_data(capsys):
    assert veil_main(["train", "--dp", "--arch", "scatter-linear", "--data", "digits"]) == 1
    assert "--dp needs --epsilon" in capsys.readouterr().err
    assert veil_main(["train", "--dp", "--arch", "scatter-linear", "--epsilon", "1"]) == 1
    assert "--dp needs --data" in capsys.readouterr().err


def test_training_on_shares_still_needs_its_files(capsys):
    assert veil_main(["train", "--arch", "mlp"]) == 1
    assert "--shares DIR and --name NAME" in capsys.readouterr().err


def test_existing_checkpoint_needs_resume(tmp_path, capsys):
    (tmp_path / "dp-sgd.ckpt").write_bytes(b"x")
    assert veil_main(["train", "--dp", "--arch", "scatter-linear", "--data", "digits", "--epsilon", "2",
                      "--checkpoint-dir", str(tmp_path), "--no-progress"]) == 1
    assert "add --resume" in capsys.readouterr().err


def test_views_need_a_model_whose_first_trained_layer_is_linear(capsys):
    assert veil_main(["train", "--dp", "--arch", "scatter-cnn", "--data", "digits", "--epsilon", "2",
                      "--views", "4", "--epochs", "1", "--no-progress"]) == 1
    assert "first layer with parameters to be nn.Linear" in capsys.readouterr().err
