"""`veil share` then `veil train`: all parties on this machine, checkpoints and --resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from veil.cli.main import main as veil_main

ARCH_MODULE = '''
from torch import nn


class DigitNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("train")
    (d / "digitnet_for_tests.py").write_text(ARCH_MODULE)
    sys.path.insert(0, str(d))  # the spawned parties inherit sys.path
    shares = str(d / "shares")
    assert veil_main(["share", "--name", "digits", "--out", shares, "--data-alice", "digits", "--rows-alice", "0:600",
                      "--data-bob", "digits", "--rows-bob", "600:1200", "--flatten"]) == 0
    assert veil_main(["share", "--name", "test", "--out", shares, "--data-alice", "digits", "--rows-alice",
                      "1200:1500", "--flatten"]) == 0
    return d


def _train(d: Path, *extra: str) -> int:
    return veil_main(["train", "--arch", "digitnet_for_tests:DigitNet", "--shares", str(d / "shares"), "--name",
                      "digits", "--test-name", "test", "--lr", "0.1", "--momentum", "0.9", "--reveal-to", "alice",
                      "--checkpoint-dir", str(d / "ckpt"), "--json", "--no-progress", *extra])


def test_train_then_resume_reveals_to_the_chosen_parties_and_saves_weights(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(workdir, "--epochs", "2") == 0
    first = {s["party"]: s for s in map(json.loads, capsys.readouterr().out.splitlines())}
    assert [e["epoch"] for e in first["alice"]["epochs"]] == [1, 2]
    assert first["alice"]["epochs"][-1]["test_accuracy"] > 0.6
    assert all(e["test_accuracy"] is None and e["loss"] is None for e in first["bob"]["epochs"])
    out = workdir / "w.pt"
    assert _train(workdir, "--epochs", "3", "--resume", "--weights-to", "alice", "--out", str(out),
                  "--plot", str(workdir / "c.png"), "--history", str(workdir / "h.json")) == 0
    second = {s["party"]: s for s in map(json.loads, capsys.readouterr().out.splitlines())}
    assert second["alice"]["resumed_from"] == 2
    assert [e["epoch"] for e in second["alice"]["epochs"]] == [1, 2, 3]
    state = torch.load(out, weights_only=True)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert (workdir / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((workdir / "h.json").read_text())) == 3
    assert "weights" not in second["bob"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--out", "w.pt"], "--out needs --weights-to"),
    (["--arch", "resnet"], "unknown architecture 'resnet'"),
    (["--name", "nosuch"], "no such share file"),
    (["--epochs", "0"], "--epochs must be positive, got 0"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--checkpoint-dir", "digitnet_for_tests.py"], "is a file, not a directory"),
    (["--out", "shares", "--weights-to", "alice"], "--out"),
    (["--init", "shares"], "is a directory, not a weights file"),
    (["--init", "nosuch.pt"], "--init nosuch.pt: no such weights file"),
])
def test_bad_arguments_exit_1_with_the_cause(workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                             message: str) -> None:
    base = ["train", "--arch", "digitnet_for_tests:DigitNet", "--shares", str(workdir / "shares"), "--name", "digits",
            "--no-progress", "--timeout", "20"]
    argv = [str(workdir / v) if v in ("digitnet_for_tests.py", "shares") else v for v in argv]
    for flag, value in zip(argv[::2], argv[1::2]):
        if flag in base:
            base[base.index(flag) + 1] = value
        else:
            base += [flag, value]
    assert veil_main(base) == 1
    assert message in capsys.readouterr().err


def _train_process(d: Path, ckpt: str, *extra: str) -> subprocess.Popen[str]:
    code = ("import sys; from veil.cli.main import main; sys.path.insert(0, sys.argv[1]); "
            "sys.exit(main(sys.argv[2:]))")
    argv = [sys.executable, "-c", code, str(d), "train", "--arch", "digitnet_for_tests:DigitNet", "--shares",
            str(d / "shares"), "--name", "digits", "--lr", "0.02", "--momentum", "0.5", "--reveal-to", "",
            "--checkpoint-dir", str(d / ckpt), "--seed", SEED, "--epochs", "3", "--weights-to", "alice",
            "--batch-size", "16", "--init", str(d / "init.pt"), "--no-progress", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


SEED = "00112233445566778899aabbccddeeff"


def test_a_killed_training_resumes_to_the_weights_of_an_uninterrupted_run(workdir: Path) -> None:
    import digitnet_for_tests  # written by the fixture

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(digitnet_for_tests.DigitNet().state_dict(), workdir / "init.pt")  # both runs start here
    whole = _train_process(workdir, "ck-whole", "--out", str(workdir / "whole.pt"))
    assert whole.wait(timeout=300) == 0, whole.communicate()
    killed = _train_process(workdir, "ck-killed", "--out", str(workdir / "killed.pt"))
    deadline = time.monotonic() + 240
    while not list((workdir / "ck-killed").glob("checkpoint-0001.bob.*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # well into epoch 2
    os.killpg(killed.pid, signal.SIGKILL)  # every process of the run: parties and dealer
    killed.wait(timeout=30)
    assert not (workdir / "killed.pt").exists()
    assert "checkpoint-0003.alice.veilckpt" not in {p.name for p in (workdir / "ck-killed").iterdir()}
    resumed = _train_process(workdir, "ck-killed", "--out", str(workdir / "killed.pt"), "--resume", "--json")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    summaries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(summaries) == 2 and summaries[0]["resumed_from"] == summaries[1]["resumed_from"] in (1, 2)
    a, b = torch.load(workdir / "whole.pt", weights_only=True), torch.load(workdir / "killed.pt", weights_only=True)
    for k in a:  # the same batches from the same state: only the +-1 ulp truncations differ (a few ulps
        # after 225 steps; a lost or repeated epoch, or a wrong state, moves weights by 0.1 and more)
        assert float((a[k] - b[k]).abs().max()) < 5e-3, k


def test_resuming_with_another_optimizer_or_bad_labels_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]
                                                                   ) -> None:
    ckpt = str(workdir / "ckpt-opt")
    base = ["train", "--arch", "digitnet_for_tests:DigitNet", "--shares", str(workdir / "shares"), "--name", "test",
            "--no-progress", "--checkpoint-dir", ckpt]
    assert veil_main([*base, "--epochs", "1"]) == 0
    assert veil_main([*base, "--epochs", "2", "--resume", "--optimizer", "adam"]) == 1
    assert "saved with optimizer SGD, this run uses Adam" in capsys.readouterr().err
    # labels that are not class indices of the model's 10 classes: refused before training, on shares
    import numpy as np

    x = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
    y = np.arange(40) % 10
    y[[3, 17]] = [12, -1]
    np.savez(workdir / "badlabels.npz", x=x, y=y)
    assert veil_main(["share", "--name", "bad", "--out", str(workdir / "shares"), "--data-alice",
                      str(workdir / "badlabels.npz")]) == 0
    assert veil_main([*base[:5], "--name", "bad", "--no-progress", "--epochs", "1"]) == 1
    assert "2 of the 40 training labels are not class indices in [0, 10)" in capsys.readouterr().err
