"""TLSTransport over 127.0.0.1, parties as threads of this process (veil.net.tls)."""

from __future__ import annotations

import functools
import math
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from veil.net.certs import generate_certificates
from veil.net.tls import TLSTransport
from veil.net.transport import HEADER, PartyError, pack_header

BIG = 20_000_000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An honest deployment, plus a forger's CA that issued certificates for the same names."""
    root = tmp_path_factory.mktemp("pki")
    generate_certificates(["alice", "bob", "dealer", "mallory"], root / "honest")
    generate_certificates(["alice", "bob"], root / "evil")
    return {"honest": root / "honest", "evil": root / "evil", "root": root}


def _certs_dir(pki: dict[str, Path], name: str, party: str, source: tuple[str, str]) -> Path:
    """A certs dir for ``party``: the honest ca.pem, with ``party``'s files taken from ``source``."""
    d = pki["root"] / name
    d.mkdir(exist_ok=True)
    shutil.copy(pki["honest"] / "ca.pem", d / "ca.pem")
    src_dir, src_party = pki[source[0]], source[1]
    for ext in ("pem", "key"):
        shutil.copy(src_dir / f"{src_party}.{ext}", d / f"{party}.{ext}")
    return d


def _listeners(parties: list[str]) -> tuple[dict[str, socket.socket], dict[str, tuple[str, int]]]:
    socks = {p: socket.create_server(("127.0.0.1", 0)) for p in parties}
    return socks, {p: ("127.0.0.1", s.getsockname()[1]) for p, s in socks.items()}


def _run(bodies: dict[str, Callable[[], Any]], limit: float = 20.0) -> dict[str, Any]:
    """Run each body in a thread; return its result or exception; fail the test if one hangs."""
    out: dict[str, Any] = {}

    def wrap(name: str) -> None:
        try:
            out[name] = bodies[name]()
        except BaseException as e:
            out[name] = e

    threads = [threading.Thread(target=wrap, args=(n,), daemon=True) for n in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=limit)
    assert not any(t.is_alive() for t in threads), "a party hung"
    return out


def _session(parties: list[str], certs: dict[str, Path], sessions: dict[str, bytes] | None = None,
             body: Callable[[TLSTransport], Any] | None = None, **kw: Any) -> dict[str, Any]:
    socks, addrs = _listeners(parties)
    sid = secrets.token_bytes(16)

    def party(p: str) -> Any:
        t = TLSTransport.connect(p, addrs, certs[p], (sessions or {}).get(p, sid), listen_socket=socks[p],
                                 connect_timeout=5.0, **kw)
        with t:
            return body(t) if body else "connected"

    return _run({p: functools.partial(party, p) for p in parties})


def test_three_parties_exchange_both_ways_with_big_simultaneous_payloads(pki: dict[str, Path]) -> None:
    payloads = {p: secrets.token_bytes(BIG) for p in ("alice", "bob")}
    dealer_done = threading.Event()

    def body(t: TLSTransport) -> dict[str, Any]:
        for q in t.peers:
            t.send(q, f"{t.party}->{q}".encode())
        got = {q: bytes(t.recv(q)) for q in t.peers}
        if t.party == "dealer":
            t.close()  # done early: the others must not fail while they do not expect its messages
            dealer_done.set()
            return {"got": got, "stats": t.stats.copy()}
        assert dealer_done.wait(10)
        other = "bob" if t.party == "alice" else "alice"
        t.send(other, memoryview(payloads[t.party]))  # both send 20 MB before either receives
        big = t.recv(other)
        t.send(other, b"after the dealer left")
        last = bytes(t.recv(other))
        start = time.monotonic()
        with pytest.raises(PartyError, match="'dealer' closed its connection"):
            t.recv("dealer")
        return {"got": got, "big_ok": big == payloads[other], "last": last, "stats": t.stats.copy(),
                "closed_error_s": time.monotonic() - start}

    certs = {p: pki["honest"] for p in ("alice", "bob", "dealer")}
    res = _session(["alice", "bob", "dealer"], certs, body=body, timeout=30.0)
    for p, r in res.items():
        assert not isinstance(r, BaseException), f"{p}: {r!r}"
        assert r["got"] == {q: f"{q}->{p}".encode() for q in ("alice", "bob", "dealer") if q != p}
    for p, other in (("alice", "bob"), ("bob", "alice")):
        r = res[p]
        assert r["big_ok"] and r["last"] == b"after the dealer left"
        assert r["closed_error_s"] < 2.0  # a closed peer is reported at once, not after the timeout
        small = HEADER.size + len(f"{p}->{other}")
        assert r["stats"].bytes_sent[other] == small + HEADER.size + BIG + HEADER.size + 21
        assert r["stats"].messages_sent == {"bob" if p == "alice" else "alice": 3, "dealer": 1}
        assert r["stats"].bytes_received["dealer"] == HEADER.size + len(f"dealer->{p}")
    assert res["dealer"]["stats"].bytes_sent == {"alice": HEADER.size + 13, "bob": HEADER.size + 11}


def test_a_peer_with_another_session_id_is_refused(pki: dict[str, Path]) -> None:
    certs = {"alice": pki["honest"], "bob": pki["honest"]}
    res = _session(["alice", "bob"], certs, sessions={"alice": b"A" * 16, "bob": b"B" * 16})
    for p in ("alice", "bob"):
        assert isinstance(res[p], PartyError), res[p]
        assert "session id" in str(res[p])
    assert (b"A" * 16).hex() in str(res["alice"]) and (b"B" * 16).hex() in str(res["alice"])


@pytest.mark.parametrize("forger", ["alice", "bob"])  # alice accepts, bob connects
def test_a_certificate_from_another_ca_is_refused(pki: dict[str, Path], forger: str) -> None:
    honest = "bob" if forger == "alice" else "alice"
    forged = _certs_dir(pki, f"forged-{forger}", forger, ("evil", forger))
    res = _session(["alice", "bob"], {honest: pki["honest"], forger: forged})
    assert isinstance(res[honest], PartyError), res[honest]
    assert "certificate" in str(res[honest]) and "CA" in str(res[honest])
    assert isinstance(res[forger], PartyError), res[forger]


@pytest.mark.parametrize("impostor", ["alice", "bob"])
def test_a_certificate_for_another_party_is_refused(pki: dict[str, Path], impostor: str) -> None:
    honest = "bob" if impostor == "alice" else "alice"
    fake = _certs_dir(pki, f"mallory-as-{impostor}", impostor, ("honest", "mallory"))
    res = _session(["alice", "bob"], {honest: pki["honest"], impostor: fake})
    assert isinstance(res[honest], PartyError), res[honest]
    assert "'mallory'" in str(res[honest]) and f"'{impostor}'" in str(res[honest])
    assert isinstance(res[impostor], PartyError), res[impostor]


@pytest.mark.parametrize(("operation", "message"), [
    ("recv", r"no message from 'bob' within 0.5 s \(the party died"),
    # bob never reads: alice's 20 MB cannot all fit in the socket buffers
    ("send", r"'bob' did not take a message within 0.5 s \(the party died"),
])
def test_a_silent_peer_fails_recv_and_send_after_the_timeout_with_a_clear_error(
        pki: dict[str, Path], operation: str, message: str) -> None:
    release = threading.Event()

    def body(t: TLSTransport) -> float:
        if t.party == "bob":
            release.wait(10)
            return 0.0
        start = time.monotonic()
        try:
            with pytest.raises(PartyError, match=message):
                t.recv("bob") if operation == "recv" else t.send("bob", bytes(BIG))
        finally:
            release.set()
        return time.monotonic() - start

    res = _session(["alice", "bob"], {"alice": pki["honest"], "bob": pki["honest"]}, body=body,
                   timeout=0.5)
    assert 0.4 < res["alice"] < 5.0, res


def test_a_send_to_a_slow_reader_fails_only_after_a_stall(pki: dict[str, Path]) -> None:
    """bob takes alice's 60 MB in bursts 0.3 s apart (what the socket buffers hold each time): over
    1 s in all, more than twice the 0.5 s timeout, but never 0.5 s without progress, so alice's send
    goes through (the timeout counts stalls, not the whole transfer)."""
    payload = secrets.token_bytes(3 * BIG)

    def body(t: TLSTransport) -> Any:
        # Small socket buffers (a few MB), so that the transfer needs many bursts whatever the
        # kernel's autotuning would allow.
        if t.party == "bob":
            t._in["alice"].sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            time.sleep(0.3)
            while not t.poll("alice"):  # takes what has arrived, without waiting
                time.sleep(0.3)
            return bytes(t.recv("alice")) == payload
        t._out["bob"].sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        start = time.monotonic()
        t.send("bob", payload)
        return time.monotonic() - start

    res = _session(["alice", "bob"], {"alice": pki["honest"], "bob": pki["honest"]}, body=body,
                   timeout=0.5)
    assert res["bob"] is True and res["alice"] > 1.0, res


def test_out_of_order_frame_is_refused(pki: dict[str, Path]) -> None:
    def body(t: TLSTransport) -> Any:
        if t.party == "bob":  # write a raw frame with sequence number 5 instead of 0
            t._out["alice"].seal(pack_header(t.session_id, 5, 3), 5, memoryview(b"abc"))
            assert t._out["alice"].flush()
            return t.recv("alice")
        with pytest.raises(PartyError, match="sequence number 5, expected 0"):
            t.recv("bob")
        t.send("bob", b"ok")
        return "refused"

    res = _session(["alice", "bob"], {"alice": pki["honest"], "bob": pki["honest"]}, body=body)
    assert res == {"alice": "refused", "bob": b"ok"}


def test_unreachable_peer_fails_after_connect_timeout(pki: dict[str, Path]) -> None:
    socks, addrs = _listeners(["alice", "bob"])
    socks["alice"].close()  # nobody listens for alice any more
    start = time.monotonic()
    with pytest.raises(PartyError, match="could not connect to 'alice'"):
        TLSTransport.connect("bob", addrs, pki["honest"], bytes(16), listen_socket=socks["bob"],
                             connect_timeout=0.5)
    assert time.monotonic() - start < 5.0


def test_send_and_recv_check_the_peer_name(pki: dict[str, Path]) -> None:
    def body(t: TLSTransport) -> str:
        with pytest.raises(PartyError, match="no channel to 'carol'"):
            t.send("carol", b"x")
        with pytest.raises(PartyError, match="no channel to"):
            t.recv(t.party)
        return "ok"

    res = _session(["alice", "bob"], {"alice": pki["honest"], "bob": pki["honest"]}, body=body)
    assert res == {"alice": "ok", "bob": "ok"}


def test_a_frame_altered_on_the_wire_fails_authentication(pki: dict[str, Path]) -> None:
    def body(t: TLSTransport) -> Any:
        if t.party == "bob":  # a well-formed header, but ciphertext that was not sealed with the key
            t._out["alice"].sock.send(pack_header(t.session_id, 0, 3) + b"abc" + bytes(16))
            return "sent"
        with pytest.raises(PartyError, match="failed authentication"):
            t.recv("bob")
        return "refused"

    res = _session(["alice", "bob"], {"alice": pki["honest"], "bob": pki["honest"]}, body=body)
    assert res == {"alice": "refused", "bob": "sent"}


def test_frames_on_the_wire_are_not_the_plaintext(pki: dict[str, Path]) -> None:
    secret = b"the secret payload " * 100
    seen = bytearray()

    def body(t: TLSTransport) -> Any:
        if t.party == "bob":
            sock = t._out["alice"].sock
            real_sendmsg = sock.sendmsg

            def spy(buffers: Any) -> int:
                sent = real_sendmsg(buffers)
                seen.extend(b"".join(bytes(b) for b in buffers)[:sent])
                return sent

            t._out["alice"].sock = type("Spy", (), {"sendmsg": staticmethod(spy)})()
            t.send("alice", secret)
            t._out["alice"].sock = sock
            return "sent"
        return bytes(t.recv("bob"))

    res = _session(["alice", "bob"], {"alice": pki["honest"], "bob": pki["honest"]}, body=body)
    assert res["alice"] == secret
    assert len(seen) >= len(secret) and b"the secret payload" not in seen


def test_a_private_key_of_another_party_is_named_with_its_files(tmp_path: Path) -> None:
    from veil.net.certs import load_credentials
    from veil.net.tls import tls_contexts

    generate_certificates(["alice", "bob", "dealer"], tmp_path)
    shutil.copy(tmp_path / "bob.key", tmp_path / "alice.key")
    with pytest.raises(PartyError, match=r"alice.pem / .*alice.key: the private key does not belong to the "):
        tls_contexts(load_credentials(tmp_path, "alice"))
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    with pytest.raises(PartyError, match=r"ca.pem: not a readable CA certificate in PEM"):
        tls_contexts(load_credentials(tmp_path, "alice"))


def test_close_from_another_thread_ends_a_waiting_recv_and_sends_still_pass(pki: dict[str, Path]) -> None:
    """One thread waits in recv (no time limit); another thread sends meanwhile, then closes the
    transport: the send goes through and the waiting recv ends at once with 'transport is closed'."""
    def body(t: TLSTransport) -> Any:
        if t.party == "bob":
            got = bytes(t.recv("alice"))
            t.recv("alice", wait=10)  # until alice's side closes
            return got
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                t.recv("bob", wait=math.inf)
            except BaseException as e:
                errors.append(e)

        th = threading.Thread(target=waiter, daemon=True)
        th.start()
        time.sleep(0.3)
        t.send("bob", b"from another thread")
        start = time.monotonic()
        t.close()
        th.join(5)
        return not th.is_alive(), time.monotonic() - start, [str(e) for e in errors]

    res = _session(["alice", "bob"], {"alice": pki["honest"], "bob": pki["honest"]}, body=body)
    done, seconds, errors = res["alice"]
    assert done and seconds < 2.0 and errors == ["alice: transport is closed"], res
    assert isinstance(res["bob"], PartyError) and "closed its connection" in str(res["bob"])


def test_poll_reads_every_connection_so_a_third_party_is_not_stalled(pki: dict[str, Path]) -> None:
    """alice polls for bob's answer; carol first sends alice 30 MB (more than the socket buffers hold)
    and only then tells bob to answer. alice's poll must take carol's bytes too."""
    big = secrets.token_bytes(30_000_000)

    def body(t: TLSTransport) -> Any:
        if t.party == "carol":
            t.send("alice", big)
            t.send("bob", b"go")
            return "sent"
        if t.party == "bob":
            t.recv("carol")
            t.send("alice", b"done")
            return "sent"
        while not t.poll("bob"):
            time.sleep(0.01)
        return bytes(t.recv("bob")), bytes(t.recv("carol")) == big

    generate_certificates(["alice", "bob", "carol"], pki["root"] / "three")
    certs = {p: pki["root"] / "three" for p in ("alice", "bob", "carol")}
    res = _session(["alice", "bob", "carol"], certs, body=body, timeout=10.0)
    assert res == {"alice": (b"done", True), "bob": "sent", "carol": "sent"}, res


def test_recv_waits_as_long_as_the_awaited_message_keeps_coming(pki: dict[str, Path]) -> None:
    """bob's 20 MB frame crawls in over about 2 s (a slow link, never stalled): more than alice's
    0.5 s timeout, but bytes keep arriving, so the recv succeeds (the timeout counts stalls)."""
    from veil.net.tlschannel import nonce

    payload = secrets.token_bytes(BIG)

    def body(t: TLSTransport) -> Any:
        if t.party == "bob":
            out = t._out["alice"]
            head = pack_header(t.session_id, 0, len(payload))
            frame = head + out._aead.encrypt(nonce(0), payload, head)
            out.sock.setblocking(True)
            for i in range(0, len(frame), 1_000_000):
                out.sock.sendall(frame[i:i + 1_000_000])
                time.sleep(0.1)
            return "sent"
        start = time.monotonic()
        return bytes(t.recv("bob")) == payload, time.monotonic() - start

    res = _session(["alice", "bob"], {"alice": pki["honest"], "bob": pki["honest"]}, body=body, timeout=0.5)
    ok, seconds = res["alice"]
    assert ok and seconds > 1.0, res


def test_frames_over_the_aead_limit_are_refused_by_name(pki: dict[str, Path]) -> None:
    """One OCB call seals at most 2^31 - 1 bytes: a larger message is refused before sealing, and a
    header claiming one is refused on reading (no allocation, no crash inside the cipher)."""
    import numpy as np

    from veil.net.tlschannel import MAX_MESSAGE_BYTES

    def body(t: TLSTransport) -> Any:
        if t.party == "bob":
            with pytest.raises(ValueError, match="over the limit of one frame"):
                t.send("alice", memoryview(np.zeros(MAX_MESSAGE_BYTES + 1, dtype=np.uint8)))
            t._out["alice"].sock.send(pack_header(t.session_id, 0, 1 << 31))
            return "sent"
        with pytest.raises(PartyError, match=r"claims 2147483648 bytes \(limit 2147483631\)"):
            t.recv("bob")
        return "refused"

    res = _session(["alice", "bob"], {"alice": pki["honest"], "bob": pki["honest"]}, body=body)
    assert res == {"alice": "refused", "bob": "sent"}, res


def test_an_interrupted_send_ends_that_direction_and_the_peer_hears_at_once(pki: dict[str, Path]) -> None:
    """A KeyboardInterrupt in the middle of a large send: the next send says the direction was
    interrupted (no half frame followed by a frame with the same sequence number), and the peer gets
    'truncated message' at once rather than a timeout."""
    def body(t: TLSTransport) -> Any:
        if t.party == "bob":
            start = time.monotonic()
            with pytest.raises(PartyError, match="truncated message from 'alice'"):
                t.recv("alice")
            return time.monotonic() - start
        real = t._wait

        def interrupted(*args: Any, **kw: Any) -> None:
            t._wait = real  # type: ignore[method-assign]
            raise KeyboardInterrupt

        t._wait = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            t.send("bob", bytes(BIG))
        with pytest.raises(PartyError, match="an earlier send to 'bob' was interrupted"):
            t.send("bob", b"next")
        return "refused"

    res = _session(["alice", "bob"], {"alice": pki["honest"], "bob": pki["honest"]}, body=body, timeout=20.0)
    assert res["alice"] == "refused" and res["bob"] < 5.0, res
