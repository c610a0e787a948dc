"""``veil semantic fit|translate|remote|compose|evaluate`` end to end on the 8x8 digits."""

import json
import stat

import numpy as np
import pytest

from veil.cli.main import main
from veil.semantic import load_translator


def _run(capsys, *argv):
    assert main(["semantic", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("semcli")
    code = main(["semantic", "fit", "--data", "digits", "--out", str(d / "t.pt"), "--epochs", "20",
                 "--batch-size", "32", "--lr", "1e-3", "--classifier-epochs", "10", "--no-progress"])
    assert code == 0
    return d


def test_the_owner_and_remote_steps_compose_a_classifier_of_the_secret_classes(fitted, capsys):
    d = fitted
    t = d / "t.pt"
    assert stat.S_IMODE(t.stat().st_mode) == 0o600
    assert (d / "t-samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    perm = load_translator(t).permutation
    out = _run(capsys, "translate", "--data", "digits", "--translator", str(t), "--out", str(d / "decoys.npz"),
               "--test-split", "test", "--grid", str(d / "grid.png"))
    assert out["train_images"] > 0 and (d / "grid.png").exists()
    with np.load(d / "decoys.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["x_test", "x_train", "y_test", "y_train"]  # nothing else goes remote
    remote = _run(capsys, "remote", "--decoys", str(d / "decoys.npz"), "--arch", "mlp", "--epochs", "30",
                  "--batch-size", "32", "--out", str(d / "remote.pt"), "--no-progress")
    assert remote["decoy_test_accuracy"] > 0.5
    assert bytes(perm.mapping) not in (d / "remote.pt").read_bytes()
    _run(capsys, "compose", "--translator", str(t), "--remote", str(d / "remote.pt"), "--out", str(d / "c.pt"))
    assert stat.S_IMODE((d / "c.pt").stat().st_mode) == 0o600
    result = _run(capsys, "evaluate", "--data", "digits", "--model", str(d / "c.pt"), "--audit",
                  "--judge-epochs", "10", "--json", str(d / "eval.json"))
    assert result["end_to_end_accuracy"] > 0.6, result  # chance: 0.1
    audit = result["audit"]
    assert audit["decoy_realism"] > 0.5 and 0 <= audit["cluster_attack_accuracy"] <= 1
    assert json.loads((d / "eval.json").read_text()) == result


def test_fit_resumes_with_the_permutation_of_its_checkpoint(fitted, capsys):
    d = fitted
    before = load_translator(d / "t.pt").permutation
    _run(capsys, "fit", "--data", "digits", "--out", str(d / "t2.pt"), "--checkpoint", str(d / "t.pt.ckpt"),
         "--resume", "--epochs", "21", "--batch-size", "32", "--lr", "1e-3", "--no-progress")
    assert load_translator(d / "t2.pt").permutation == before


@pytest.mark.parametrize(("argv", "message"), [
    (["compose", "--translator", "{d}/missing.pt", "--remote", "{d}/remote.pt", "--out", "{d}/x.pt"], "no such file"),
    (["remote", "--decoys", "{d}/t.pt", "--out", "{d}/r.pt"], "a decoy set needs x_train and y_train"),
    (["evaluate", "--model", "{d}/t.pt", "--data", "digits"], "not a Veil composed-classifier file"),
    (["fit", "--data", "{d}/plain.npy", "--out", "{d}/x.pt"], "has no labels"),
])
def test_bad_files_end_with_a_message_naming_the_problem(fitted, capsys, argv, message):
    d = fitted
    np.save(d / "plain.npy", np.zeros((70, 1, 8, 8), dtype=np.float32))
    assert main(["semantic", *[a.format(d=d) for a in argv]]) == 1
    assert message in capsys.readouterr().err


DECOYNET = '''
from torch import nn


class DecoyNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
'''


def test_the_remote_side_can_train_on_the_decoys_through_veils_parties(fitted, capsys):
    import sys

    d = fitted
    t = d / "t.pt"
    (d / "decoynet_for_semantic_tests.py").write_text(DECOYNET)
    sys.path.insert(0, str(d))  # the spawned parties inherit sys.path
    _run(capsys, "translate", "--data", "digits", "--translator", str(t), "--out", str(d / "remote_set.npz"))
    # the remote side: an ordinary labelled data set (Keras layout), secret-shared and trained on by 2 parties
    assert main(["share", "--name", "decoys", "--out", str(d / "shares"), "--data-alice", str(d / "remote_set.npz"),
                 "--flatten"]) == 0
    assert main(["train", "--arch", "decoynet_for_semantic_tests:DecoyNet", "--shares", str(d / "shares"),
                 "--name", "decoys", "--epochs", "8", "--lr", "0.1", "--momentum", "0.9", "--batch-size", "32",
                 "--weights-to", "alice", "--out", str(d / "mpc.pt"), "--no-progress", "--json"]) == 0
    capsys.readouterr()
    _run(capsys, "compose", "--translator", str(t), "--remote", str(d / "mpc.pt"), "--remote-arch",
         "decoynet_for_semantic_tests:DecoyNet", "--flatten", "--out", str(d / "mpc_composed.pt"))
    result = _run(capsys, "evaluate", "--data", "digits", "--model", str(d / "mpc_composed.pt"))
    assert result["end_to_end_accuracy"] > 0.6, result
