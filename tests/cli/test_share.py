"""`veil share`: all parties on this machine, one party per process from a peers file, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mpc_testing import ULP, free_ports, run_local

from veil.cli import main as cli_main
from veil.cli import share
from veil.data.shares import load_shares, verify_file
from veil.mpc.session import Session
from veil.net.certs import generate_certificates
from veil.net.peers import write_peers

# Until `share` is registered in veil.cli.main, the tests (and the party processes) register it themselves.
REGISTER = ("import sys; from veil.cli import main, share; "
            "main.COMMANDS += () if share in main.COMMANDS else (share,); sys.exit(main.main(sys.argv[1:]))")


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    if share not in cli_main.COMMANDS:
        monkeypatch.setattr(cli_main, "COMMANDS", (*cli_main.COMMANDS, share))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("share-cli")
    g = torch.Generator().manual_seed(5)
    x = torch.rand(20, 1, 2, 3, generator=g)
    y = torch.randint(0, 10, (20,), generator=g)
    np.savez(d / "all.npz", x=x.numpy(), y=y.numpy())
    np.savez(d / "bob.npz", images=x[:4].numpy() * 100, labels=y[:4].numpy())
    return {"dir": d, "all": d / "all.npz", "bob": d / "bob.npz"}


def reveal(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    def program(session: Session) -> dict[str, torch.Tensor]:
        ds = load_shares(session, paths[session.party])
        return {k: v.reveal(to="alice") for k, v in ds.get(slice(None)).items()}

    return run_local(program)["alice"]


def test_local_run_writes_both_files_with_each_owners_rows(data: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main.main(["share", "--name", "toy", "--out", str(tmp_path), "--data-alice", str(data["all"]),
                          "--rows-alice", "5:15", "--data-bob", str(data["bob"]), "--flatten", "--json"])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [s["party"] for s in lines] == ["alice", "bob"]
    assert all(s["rows"] == 14 and s["fields"] == {"x": [14, 6], "y": [14]} for s in lines)
    assert lines[0]["dataset_id"] == lines[1]["dataset_id"]
    paths = {s["party"]: Path(s["path"]) for s in lines}
    assert paths == {p: tmp_path / f"toy.{p}.veilshares" for p in ("alice", "bob")}
    with np.load(data["all"]) as z:
        x, y = torch.from_numpy(z["x"]).reshape(20, 6), torch.from_numpy(z["y"])
    got = reveal(paths)
    assert (got["x"].double() - torch.cat([x[5:15], x[:4] * 100]).double()).abs().max() <= ULP
    assert torch.equal(got["y"].long(), torch.cat([y[5:15], y[:4]]))


def test_vertical_split_by_columns_with_one_label_owner(data: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main.main(["share", "--name", "v", "--out", str(tmp_path), "--split", "vertical", "--flatten",
                          "--data-alice", str(data["all"]), "--columns-alice", ":4", "--data-bob", str(data["all"]),
                          "--columns-bob", "4:", "--label-owner", "bob", "--limit", "8"])
    assert code == 0, capsys.readouterr().err
    assert "alice: wrote" in capsys.readouterr().out
    header, _ = verify_file(tmp_path / "v.alice.veilshares")
    assert {(c.owner, c.field, c.columns) for c in header.contributions} == {
        ("alice", "x", (0, 4)), ("bob", "x", (4, 6)), ("bob", "y", None)}


def test_data_files_that_are_not_numeric_archives_are_named(tmp_path: Path) -> None:
    from veil.data.images import DatasetError

    np.savez(tmp_path / "words.npz", x=np.array(["a", "b"]), y=np.array([0, 1]))
    (tmp_path / "pem.npz").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n")
    with pytest.raises(DatasetError, match=r"words\.npz: cannot read the dataset"):
        share._load_npz(tmp_path / "words.npz")
    with pytest.raises(DatasetError, match=r"pem.npz: not a .npz archive"):
        share._load_npz(tmp_path / "pem.npz")
    with pytest.raises(DatasetError, match="is a directory, not a file"):
        share._load_npz(tmp_path)


@pytest.mark.parametrize(("argv", "message"), [
    ([], "needs the data of at least one owner"),
    (["--data", "DATA"], "--data is for one party of a multi-host run"),
    (["--data-alice", "/no/such.npz"], "--data-alice /no/such.npz: no such file"),
    (["--data-alice", "DATA", "--rows-alice", "9-3"], "--rows-alice '9-3': expected START:STOP"),
    (["--data-alice", "DATA", "--rows", "8:2"], "START must be below STOP"),
    (["--data-alice", "DATA", "--label-owner", "alice"], "--label-owner is for a vertical split"),
    (["--data-alice", "DATA", "--party", "alice"], "--party and --peers go together"),
    (["--data-alice", "DATA", "--party", "alice", "--peers", "p.json"], "--data-alice are for a local run"),
    (["--data-alice", "DATA", "--rows", "30:"], "rows 30: select nothing of its 20 rows"),
    (["--data-alice", "DATA", "--rows", "10:40"], "rows 10:40 reach past its 20 rows"),
    (["--split", "vertical", "--flatten", "--data-alice", "DATA", "--columns-alice", "2:9", "--data-bob", "DATA",
      "--columns-bob", ":2", "--label-owner", "bob"], "columns 2:9 reach past its 6 columns"),
    (["--data-alice", "DATA", "--name", "a/b"], "--name 'a/b': 1 to 100 letters"),
])
def test_bad_arguments_exit_1_with_the_cause(data: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    argv = [str(data["all"]) if a == "DATA" else a for a in argv]
    name = [] if "--name" in argv else ["--name", "toy"]
    assert cli_main.main(["share", *name, "--out", str(tmp_path), *argv, "--timeout", "20"]) == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.veilshares"))


def test_one_party_per_process_each_with_only_its_own_data(data: dict[str, Path], tmp_path: Path) -> None:
    generate_certificates(["alice", "bob", "dealer"], tmp_path / "certs")
    peers = tmp_path / "peers.json"
    write_peers(peers, dict(zip(("alice", "bob", "dealer"), (("127.0.0.1", p) for p in free_ports(3)))),
                certs_dir=tmp_path / "certs")
    own = {"alice": ["--data", str(data["all"]), "--rows", ":12"], "bob": ["--data", str(data["all"]),
                                                                          "--rows", "12:"], "dealer": []}
    procs = {p: subprocess.Popen([sys.executable, "-c", REGISTER, "share", "--party", p, "--peers", str(peers),
                                  "--name", "mh", "--out", str(tmp_path / p), "--json", "--timeout", "60", *own[p]],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in own}
    outs = {p: proc.communicate(timeout=120) for p, proc in procs.items()}
    for p, proc in procs.items():
        assert proc.returncode == 0, (p, outs[p])
    paths = {p: Path(json.loads(outs[p][0].strip().splitlines()[-1])["path"]) for p in ("alice", "bob")}
    assert paths == {p: tmp_path / p / f"mh.{p}.veilshares" for p in ("alice", "bob")}
    with np.load(data["all"]) as z:
        x = torch.from_numpy(z["x"])
    assert (reveal(paths)["x"].double() - x.double()).abs().max() <= ULP
