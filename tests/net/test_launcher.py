"""launch_local: one OS process per party over TLS (veil.net.launcher).

Targets are module-level functions: the 'spawn' children import this module to find them.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

import pytest

from veil.net.certs import generate_certificates
from veil.net.launcher import launch_local
from veil.net.transport import Transport


def exchange(t: Transport, *, scale: int) -> dict[str, object]:
    """Send our name (times ``scale``) to every peer; return what the peers sent and our traffic."""
    for q in t.peers:
        t.send(q, t.party.encode() * scale)
    got = {q: bytes(t.recv(q)) for q in t.peers}
    return {"pid": os.getpid(), "got": got, "sent": dict(t.stats.bytes_sent)}


def alice_then_wait(t: Transport) -> bytes:
    t.send("bob", b"go")
    return bytes(t.recv("bob"))  # blocks: bob never answers


def dealer_wait(t: Transport) -> bytes:
    return bytes(t.recv("bob"))  # blocks: bob never sends


def bob_dies(t: Transport) -> None:
    t.recv("alice")
    os.kill(os.getpid(), signal.SIGKILL)


def bob_raises(t: Transport) -> None:
    t.recv("alice")
    raise ValueError("boom")


def bob_has_a_bug(t: Transport) -> None:
    t.recv("alice")
    raise KeyError("a bug")


TARGETS = {"alice": alice_then_wait, "bob": bob_dies, "dealer": dealer_wait}


def test_parties_exchange_data_and_return_results() -> None:
    targets = {p: functools.partial(exchange, scale=1000) for p in ("alice", "bob", "dealer")}
    results = launch_local(targets, timeout=20.0)
    assert list(results) == ["alice", "bob", "dealer"]
    for p, r in results.items():
        assert r["got"] == {q: q.encode() * 1000 for q in results if q != p}
        assert r["sent"] == {q: 36 + len(p) * 1000 for q in results if q != p}
    pids = {r["pid"] for r in results.values()}
    assert len(pids) == 3 and os.getpid() not in pids  # one process per party


def test_a_party_killed_mid_protocol_is_named_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:  # PartyError is a RuntimeError
        launch_local(TARGETS, timeout=60.0)
    elapsed = time.monotonic() - start
    assert elapsed < 30.0  # the others' recv (60 s timeout) ended when bob's connections dropped
    assert type(info.value).__name__ == "PartyError"
    message = str(info.value)
    assert message.startswith("party 'bob' died") and "SIGKILL" in message, message


def test_a_party_that_raises_is_reported_with_its_error() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        launch_local(dict(TARGETS, bob=bob_raises), timeout=60.0)
    assert time.monotonic() - start < 30.0
    message = str(info.value)
    assert message.startswith("party 'bob' failed: ValueError: boom"), message
    assert "closed its connection" in message  # what alice and dealer saw, listed after the cause
    assert "Traceback" not in message  # a refusal of bad input: the message says it all


def test_a_party_with_a_bug_is_reported_with_its_traceback() -> None:
    with pytest.raises(RuntimeError) as info:
        launch_local(dict(TARGETS, bob=bob_has_a_bug), timeout=60.0)
    message = str(info.value)
    assert message.startswith("party 'bob' failed: KeyError: 'a bug'"), message
    assert "--- traceback in party 'bob' ---" in message and "in bob_has_a_bug" in message


def test_unpicklable_target_is_refused_before_start() -> None:
    with pytest.raises(TypeError, match="module-level function"):
        launch_local({"alice": lambda t: None, "bob": lambda t: None})


def test_missing_certificates_are_reported_before_start(tmp_path: Path) -> None:
    generate_certificates(["alice", "bob"], tmp_path)
    (tmp_path / "bob.key").unlink()
    with pytest.raises(FileNotFoundError, match=r"bob\.key.*veil keygen"):
        launch_local({"alice": alice_then_wait, "bob": bob_raises}, certs_dir=tmp_path)
