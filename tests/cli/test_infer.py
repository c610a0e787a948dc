"""`veil infer`: all parties on this machine, one party per process from a peers file, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mpc_testing import free_ports

from veil.cli.main import main as veil_main
from veil.net.certs import generate_certificates
from veil.net.peers import write_peers
from veil.nn import save_state_dict
from veil.nn.zoo import LeNet


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("infer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = LeNet().eval()
    images = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        labels = model(images).argmax(1)
    labels[:3] = (labels[:3] + 1) % 10  # 9 of 12 right
    np.savez(d / "data.npz", images=images.numpy(), labels=labels.numpy())
    save_state_dict(model, d / "lenet.pt")
    with torch.no_grad():
        np.save(d / "want.npy", model(images).argmax(1).numpy())
    return {"dir": d, "model": d / "lenet.pt", "data": d / "data.npz", "want": d / "want.npy"}


def test_local_run_prints_accuracy_and_traffic_and_saves_the_data_owners_predictions(
        files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = files["dir"] / "pred.npy"
    code = veil_main(["infer", "--model", str(files["model"]), "--arch", "lenet", "--data", str(files["data"]),
                      "--batch-size", "5", "--out", str(out), "--json", "--no-progress"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    alice, bob = lines
    assert alice["party"] == "alice" and alice["accuracy"] == pytest.approx(9 / 12)
    assert "accuracy" not in bob
    assert alice["images"] == bob["images"] == 12
    assert alice["rounds"] == bob["rounds"] == 3 * 40  # 3 batches (5, 5, 2) of 40 rounds
    assert alice["bytes_with_peer"] > 0 and alice["bytes_with_dealer"] > 0
    assert np.array_equal(np.load(out), np.load(files["want"]))


def test_a_whole_pickled_module_is_refused_without_trust_pickle(files: dict[str, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    whole = files["dir"] / "whole.pt"
    torch.save(LeNet(), whole)
    code = veil_main(["infer", "--model", str(whole), "--data", str(files["data"]), "--no-progress"])
    assert code == 1
    assert "trust_pickle" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--data", "mnist"], "needs both --model and --data"),
    (["--model", "/no/such/model.pt", "--data", "mnist"], "--model /no/such/model.pt: no such model file"),
    (["--model", "/", "--data", "mnist"], "--model /: is a directory, not a model file"),
    (["--model", "MODEL", "--arch", "resnet", "--data", "DATA", "--limit", "2"], "unknown architecture 'resnet'"),
    (["--model", "MODEL", "--arch", "lenet", "--data", "/no/such.npz"], "no such file"),
    (["--model", "MODEL", "--party", "alice"], "--party and --peers go together"),
])
def test_bad_arguments_exit_1_with_the_cause(files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                             argv: list[str], message: str) -> None:
    argv = [str(files["model"]) if a == "MODEL" else str(files["data"]) if a == "DATA" else a for a in argv]
    assert veil_main(["infer", *argv, "--no-progress", "--timeout", "20"]) == 1
    assert message in capsys.readouterr().err


def test_one_party_per_process_each_with_only_its_own_file(files: dict[str, Path], tmp_path: Path) -> None:
    generate_certificates(["alice", "bob", "dealer"], tmp_path / "certs")
    peers = tmp_path / "peers.json"
    write_peers(peers, dict(zip(("alice", "bob", "dealer"), (("127.0.0.1", p) for p in free_ports(3)))),
                certs_dir=tmp_path / "certs")
    own = {"alice": ["--data", str(files["data"])], "bob": ["--model", str(files["model"]), "--arch", "lenet"],
           "dealer": []}
    procs = {p: subprocess.Popen([sys.executable, "-m", "veil.cli.main", "infer", "--party", p, "--peers", str(peers),
                                  "--batch-size", "6", "--json", "--no-progress", "--timeout", "60", *own[p]],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in own}
    outs = {p: proc.communicate(timeout=120) for p, proc in procs.items()}
    for p, proc in procs.items():
        assert proc.returncode == 0, (p, outs[p])
    alice = json.loads(outs["alice"][0].strip().splitlines()[-1])
    bob = json.loads(outs["bob"][0].strip().splitlines()[-1])
    assert alice["accuracy"] == pytest.approx(9 / 12) and "accuracy" not in bob
