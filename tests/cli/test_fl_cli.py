"""``veil fl simulate``: a whole run on the digits, and bad settings refused before any client starts."""

import json

import pytest

from veil.cli.main import main

pytest.importorskip("flwr")


def test_simulate_writes_summary_plot_and_model(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["fl", "simulate", "--model", "digits-mlp", "--data", "digits", "--clients", "4",
                   "--partition", "dirichlet1.0", "--rounds", "3", "--lr", "0.1", "--secure", "--target", "0.5",
                   "--out", str(out), "--no-progress"])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["secure_aggregation"] is True and summary["partition"] == "dirichlet1.0"
    assert [h["round"] for h in summary["history"]] == [1, 2, 3]
    assert summary["final_accuracy"] > 0.6  # chance is 0.1; 4 clients, 3 short rounds on the 8x8 digits
    assert summary["rounds_to_target"] is not None
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model.pt").stat().st_size > 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert printed["final_accuracy"] == summary["final_accuracy"]


@pytest.mark.parametrize("argv, message", [
    (["--partition", "zipf"], "unknown partition 'zipf'"),
    (["--model", "nope"], "unknown architecture 'nope'"),
    (["--rounds", "0"], "rounds must be >= 1"),
    (["--fault", "3:explode"], "kind must be one of drop, nan, shape"),
    (["--data", "missing.npz"], "missing.npz: cannot read"),
])
def test_bad_settings_are_refused_with_the_reason(argv, message, capsys, tmp_path):
    status = main(["fl", "simulate", "--out", str(tmp_path / "x"), "--no-progress", *argv])
    assert status == 1
    assert message in capsys.readouterr().err


def test_dp_needs_a_budget(capsys, tmp_path):
    status = main(["fl", "simulate", "--dp", "record", "--out", str(tmp_path / "x"), "--no-progress"])
    assert status == 1
    assert "--dp needs --epsilon" in capsys.readouterr().err


def test_client_level_dp_run_reports_its_epsilon(tmp_path, capsys):
    out = tmp_path / "dp"
    status = main(["fl", "simulate", "--model", "digits-mlp", "--data", "digits", "--clients", "6",
                   "--clients-per-round", "3", "--rounds", "2", "--dp", "client", "--epsilon", "8",
                   "--accountant", "rdp", "--out", str(out), "--no-progress"])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dp_level"] == "client" and summary["dp_delta"] == 1e-5
    assert 7.5 < summary["dp_epsilon"] <= 8.0  # the whole budget spent by the last planned round
    assert [h["clients"] for h in summary["history"]] == [3, 3]
