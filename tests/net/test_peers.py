"""Peers files (veil.net.peers): round trip and errors that name the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veil.net.peers import load_peers, parse_address, write_peers

ADDRESSES = {"alice": ("10.0.0.1", 9000), "bob": ("::1", 9001), "dealer": ("dealer.example.org", 9002)}
GOOD = {"session": "00112233445566778899aabbccddeeff", "certs": "certs",
        "parties": {"alice": "10.0.0.1:9000", "bob": "[::1]:9001"}}


def test_round_trip_keeps_order_session_and_relative_certs(tmp_path: Path) -> None:
    path = tmp_path / "run" / "peers.json"
    path.parent.mkdir()
    written = write_peers(path, ADDRESSES, certs_dir=tmp_path / "certs")
    raw = json.loads(path.read_text())
    assert raw["certs"] == "../certs"
    assert list(raw["parties"]) == ["alice", "bob", "dealer"]
    assert raw["parties"]["bob"] == "[::1]:9001"
    loaded = load_peers(path)
    assert loaded == written
    assert loaded.parties == ("alice", "bob", "dealer")
    assert loaded.addresses == ADDRESSES
    assert loaded.certs_dir == (tmp_path / "certs").resolve()
    assert len(loaded.session_id) == 16 and raw["session"] == loaded.session_id.hex()


def test_each_write_draws_a_fresh_session(tmp_path: Path) -> None:
    a = write_peers(tmp_path / "a.json", ADDRESSES, certs_dir=tmp_path)
    b = write_peers(tmp_path / "b.json", ADDRESSES, certs_dir=tmp_path)
    assert a.session_id != b.session_id
    c = write_peers(tmp_path / "c.json", ADDRESSES, certs_dir=tmp_path, session_id=bytes(16))
    assert load_peers(tmp_path / "c.json").session_id == bytes(16) == c.session_id


def _with(**changes: object) -> dict[str, object]:
    doc = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    return doc


@pytest.mark.parametrize(("doc", "match"), [
    (_with(session=None), r"missing key\(s\) \['session'\]"),
    (_with(parties=None), r"missing key\(s\) \['parties'\]"),
    (_with(extra=1), r"unknown key\(s\) \['extra'\]"),
    (_with(session="zz" * 16), "key 'session' must be 32 hex"),
    (_with(session="0011"), "key 'session' must be 32 hex"),
    (_with(certs=3), "key 'certs'"),
    (_with(parties=["alice", "bob"]), "key 'parties'"),
    (_with(parties={"alice": "h:1"}), "at least two"),
    (_with(parties={"alice": "h:1", "b b": "h:2"}), "key 'parties': invalid party name"),
    (_with(parties={"alice": "h:1", "bob": "nohost"}), r"key 'parties\.bob'.*host:port"),
    (_with(parties={"alice": "h:1", "bob": "h:70000"}), r"key 'parties\.bob'.*1\.\.65535"),
    (_with(parties={"alice": "h:1", "bob": "h:x"}), r"key 'parties\.bob'"),
    (_with(parties={"alice": "h:1", "bob": "::1:5"}), r"key 'parties\.bob'.*IPv6"),
    (_with(parties={"alice": "h:1", "bob": 5}), r"key 'parties\.bob'"),
    ([1, 2], "JSON object"),
])
def test_malformed_files_name_the_file_and_key(tmp_path: Path, doc: object, match: str) -> None:
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match) as info:
        load_peers(path)
    assert str(path) in str(info.value)


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    path.write_text("{session: 1")
    with pytest.raises(ValueError, match="not a JSON peers file"):
        load_peers(path)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_peers(tmp_path / "nope.json")


def test_parse_address() -> None:
    assert parse_address("localhost:80") == ("localhost", 80)
    assert parse_address("[fe80::1]:443") == ("fe80::1", 443)
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        parse_address("localhost:0")


def test_write_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        write_peers(tmp_path / "p.json", ADDRESSES, certs_dir=tmp_path, session_id=b"short")
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        write_peers(tmp_path / "p.json", {"alice": ("h", 1), "bob": ("h", 0)}, certs_dir=tmp_path)
    assert not (tmp_path / "p.json").exists()
