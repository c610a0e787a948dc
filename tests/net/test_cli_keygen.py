"""`veil keygen` (veil.cli.keygen through veil.cli.main)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from veil.cli.main import main


def test_keygen_writes_files_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert main(["keygen", "--parties", "alice, bob,dealer", "--out", str(out), "--days", "7"]) == 0
    names = {"ca.pem", "ca.key", "alice.pem", "alice.key", "bob.pem", "bob.key", "dealer.pem", "dealer.key"}
    assert {f.name for f in out.iterdir()} == names
    assert stat.S_IMODE((out / "dealer.key").stat().st_mode) == 0o600
    printed = capsys.readouterr().out
    assert str(out) in printed and "dealer.pem, dealer.key" in printed


def test_keygen_bad_names_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--parties", "alice,alice", "--out", str(tmp_path / "c")]) == 1
    assert "distinct" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_keygen_requires_its_options() -> None:
    with pytest.raises(SystemExit) as info:
        main(["keygen", "--parties", "alice,bob"])
    assert info.value.code == 2


def test_module_entry_point(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "veil.cli.main", "keygen", "--parties", "alice,bob",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bob.key").is_file() and "wrote to" in done.stdout


def test_keygen_san_certifies_host_names_and_addresses(tmp_path: Path) -> None:
    import ipaddress

    from cryptography import x509

    out = tmp_path / "certs"
    assert main(["keygen", "--parties", "server,client0", "--out", str(out), "--san",
                 "server=localhost,127.0.0.1,::1", "--san", "server=fl.example.org"]) == 0
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server", "localhost", "fl.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    client = x509.load_pem_x509_certificate((out / "client0.pem").read_bytes())
    assert client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["client0"]


@pytest.mark.parametrize(("san", "message"), [
    ("server", "expected NAME=HOST"),
    ("carol=localhost", "not among the parties"),
    ("server=bad host!", "neither an IP address nor a host name"),
])
def test_keygen_bad_san_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], san: str, message: str) -> None:
    assert main(["keygen", "--parties", "server", "--out", str(tmp_path / "c"), "--san", san]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
