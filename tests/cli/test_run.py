"""`veil run`: all parties on this machine, and one party per process from a peers file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mpc_testing import free_ports

from veil.cli.main import main as veil_main
from veil.net.certs import generate_certificates
from veil.net.peers import write_peers

SCRIPT = '''
import torch

def main(session):
    a = session.share(torch.tensor([3.5, -1.0]) if session.party == "alice" else None, owner="alice")
    b = session.share(torch.tensor([2.0, 4.0]) if session.party == "bob" else None, owner="bob")
    out = (a * b + 1).reveal(to="alice")
    return None if out is None else [round(v, 3) for v in out.tolist()]
'''


def test_veil_run_starts_every_party_and_prints_their_results(tmp_path: Path, capsys) -> None:
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT)
    assert veil_main(["run", str(script)]) == 0
    out = capsys.readouterr().out
    assert "alice: [8.0, -3.0]" in out
    assert "bob: None" in out


def test_veil_run_refuses_a_script_without_main(tmp_path: Path) -> None:
    script = tmp_path / "nomain.py"
    script.write_text("x = 1\n")
    assert veil_main(["run", str(script)]) == 1


def test_one_party_per_process_from_a_peers_file(tmp_path: Path) -> None:
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT)
    generate_certificates(["alice", "bob", "dealer"], tmp_path / "certs")
    ports = free_ports(3)
    peers = tmp_path / "peers.json"
    write_peers(peers, {p: ("127.0.0.1", port) for p, port in zip(("alice", "bob", "dealer"), ports)},
                certs_dir=tmp_path / "certs")
    assert set(json.loads(peers.read_text())["parties"]) == {"alice", "bob", "dealer"}
    procs = {p: subprocess.Popen([sys.executable, "-m", "veil.cli.main", "run", str(script), "--party", p,
                                  "--peers", str(peers), "--timeout", "30"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in ("alice", "bob", "dealer")}
    outs = {p: proc.communicate(timeout=90) for p, proc in procs.items()}
    for p, proc in procs.items():
        assert proc.returncode == 0, (p, outs[p])
    assert "alice: [8.0, -3.0]" in outs["alice"][0]
    assert "bob: None" in outs["bob"][0]
    assert "dealer:" in outs["dealer"][0]


def test_a_failing_program_exits_1_with_the_party_and_the_cause(tmp_path: Path, capsys) -> None:
    script = tmp_path / "bad.py"
    script.write_text("def main(session):\n    raise ValueError('boom in the program')\n")
    assert veil_main(["run", str(script)]) == 1
    err = capsys.readouterr().err
    assert "the program failed" in err and "boom in the program" in err
    assert "party 'alice' failed" in err or "party 'bob' failed" in err


def test_veil_run_names_the_line_of_a_script_that_does_not_parse(tmp_path: Path, capsys) -> None:
    script = tmp_path / "broken.py"
    script.write_text("import torch\n\ndef main(session: raise\n")
    assert veil_main(["run", str(script)]) == 1
    err = capsys.readouterr().err
    assert "broken.py line 3: invalid syntax (the script does not parse)" in err and "Traceback" not in err
