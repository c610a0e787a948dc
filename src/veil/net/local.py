"""In-process transport: parties are threads of one process, messages go through queues.

For unit tests and quick experiments only: nothing is encrypted (nothing leaves the process). The
frames are the same as on TCP, so session ids and sequence numbers are checked the same way.
"""

from __future__ import annotations

import math
import queue
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

from veil.net.transport import (
    DEFAULT_TIMEOUT_S,
    HEADER,
    SESSION_ID_BYTES,
    PartyError,
    TrafficStats,
    Transport,
    check_header,
    pack_header,
)


class LocalHub:
    """The shared mailboxes of one in-process run."""

    def __init__(self, parties: Sequence[str], session_id: bytes | None = None) -> None:
        if len(set(parties)) != len(parties):
            raise ValueError(f"party names must be distinct, got {list(parties)}")
        self.parties = tuple(parties)
        self.session_id = session_id if session_id is not None else secrets.token_bytes(SESSION_ID_BYTES)
        self.queues: dict[tuple[str, str], queue.Queue[bytes | None]] = {
            (a, b): queue.Queue() for a in parties for b in parties if a != b}

    def transport(self, party: str, timeout: float = DEFAULT_TIMEOUT_S) -> LocalTransport:
        return LocalTransport(self, party, timeout)

    def inject(self, frm: str, to: str, frame: bytes) -> None:
        """Put a raw frame in a mailbox, as an attacker on the wire could (tests)."""
        self.queues[(frm, to)].put(frame)


class LocalTransport(Transport):
    def __init__(self, hub: LocalHub, party: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if party not in hub.parties:
            raise ValueError(f"unknown party {party!r}; the hub has {list(hub.parties)}")
        self.hub = hub
        self.party = party
        self.parties = hub.parties
        self.session_id = hub.session_id
        self.timeout = timeout
        self.stats = TrafficStats()
        self._send_seq: dict[str, int] = {}
        self._recv_seq: dict[str, int] = {}
        self._closed = False

    def send(self, to: str, payload: bytes | bytearray | memoryview) -> None:
        self._check_peer(to)
        if self._closed:
            raise PartyError(f"{self.party}: transport is closed")
        data = bytes(payload)
        seq = self._send_seq.get(to, 0)
        self._send_seq[to] = seq + 1
        frame = pack_header(self.session_id, seq, len(data)) + data
        self.hub.queues[(self.party, to)].put(frame)
        self.stats.record_send(to, len(frame))

    def recv(self, frm: str, *, wait: float | None = None) -> bytearray:
        self._check_peer(frm)
        limit = self.timeout if wait is None else wait
        try:
            q = self.hub.queues[(frm, self.party)]
            frame = q.get() if math.isinf(limit) else q.get(timeout=limit)
        except queue.Empty:
            raise PartyError(f"{self.party}: no message from {frm!r} within {limit:g} s "
                             f"(the party died or stalled)") from None
        if frame is None:
            raise PartyError(f"{self.party}: party {frm!r} closed its connection")
        seq = self._recv_seq.get(frm, 0)
        length = check_header(frame[:HEADER.size], self.session_id, seq, frm, self.party)
        self._recv_seq[frm] = seq + 1
        if length != len(frame) - HEADER.size:
            raise PartyError(f"{self.party}: truncated message from {frm!r}")
        self.stats.record_recv(frm, len(frame))
        return bytearray(frame[HEADER.size:])

    def poll(self, frm: str) -> bool:
        self._check_peer(frm)
        return not self.hub.queues[(frm, self.party)].empty()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for p in self.peers:
                self.hub.queues[(self.party, p)].put(None)


def run_threads(targets: dict[str, Callable[[Transport], Any]], *, timeout: float = DEFAULT_TIMEOUT_S,
                session_id: bytes | None = None) -> dict[str, Any]:
    """Run ``targets[name](transport)`` for every party in its own thread; return their results.

    The first exception raised by any party is re-raised here (after the others stop).
    """
    hub = LocalHub(list(targets), session_id)
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def body(name: str) -> None:
        t = hub.transport(name, timeout)
        try:
            results[name] = targets[name](t)
        except BaseException as e:  # reported to the caller below
            errors[name] = e
        finally:
            t.close()

    threads = [threading.Thread(target=body, args=(n,), name=f"veil-{n}", daemon=True) for n in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        # Prefer the root cause over the "peer closed" errors it triggered in the others.
        primary = [e for e in errors.values() if not isinstance(e, PartyError)]
        raise (primary or list(errors.values()))[0]
    return results
