"""Certificate generation and credential lookup (veil.net.certs)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from veil.net.certs import generate_certificates, load_credentials

PARTIES = ["alice", "bob", "dealer"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_writes_ca_and_party_files_with_private_keys_0600(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    generate_certificates(PARTIES, out, days=30)
    expected = {"ca.pem", "ca.key"} | {f"{p}.{ext}" for p in PARTIES for ext in ("pem", "key")}
    assert {f.name for f in out.iterdir()} == expected  # no temporary files left behind
    for name in expected:
        assert _mode(out / name) == (0o600 if name.endswith(".key") else 0o644), name
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for party in PARTIES:
        cert = x509.load_pem_x509_certificate((out / f"{party}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == party
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [party]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        assert 30 <= days <= 31


def test_every_run_makes_fresh_keys(tmp_path: Path) -> None:
    generate_certificates(["alice", "bob"], tmp_path / "a")
    generate_certificates(["alice", "bob"], tmp_path / "b")
    for name in ("ca.key", "alice.key", "bob.key"):
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize(("parties", "match"), [
    ([], "at least one"),
    (["alice", "alice"], "distinct"),
    (["alice", "bo b"], "invalid party name"),
    (["alice", "../etc"], "invalid party name"),
    (["alice", ""], "invalid party name"),
    (["alice", "ca"], "reserved"),
    ("alice", "not the string"),
])
def test_party_names_are_validated(tmp_path: Path, parties: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_certificates(parties, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_days_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="days"):
        generate_certificates(["alice"], tmp_path, days=0)


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    generate_certificates(["alice"], tmp_path)
    before = (tmp_path / "ca.key").read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        generate_certificates(["alice"], tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["alice.key", "alice.pem", "ca.key", "ca.pem"]


def test_load_credentials_finds_files(tmp_path: Path) -> None:
    generate_certificates(PARTIES, tmp_path)
    creds = load_credentials(tmp_path, "bob")
    assert (creds.party, creds.ca, creds.cert, creds.key) == (
        "bob", tmp_path / "ca.pem", tmp_path / "bob.pem", tmp_path / "bob.key")


@pytest.mark.parametrize("missing", ["ca.pem", "bob.pem", "bob.key"])
def test_load_credentials_names_the_missing_file(tmp_path: Path, missing: str) -> None:
    generate_certificates(PARTIES, tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match="veil keygen") as info:
        load_credentials(tmp_path, "bob")
    assert missing in str(info.value) and "'bob'" in str(info.value)


def test_load_credentials_warns_about_a_readable_key(tmp_path: Path) -> None:
    generate_certificates(["alice"], tmp_path)
    (tmp_path / "alice.key").chmod(0o644)
    with pytest.warns(UserWarning, match="chmod 600"):
        load_credentials(tmp_path, "alice")
