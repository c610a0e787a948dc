"""TCP transport with mutual TLS 1.3: parties in separate processes, on one host or many.

Security properties:

* **Confidentiality and integrity** of every byte between two parties: TLS 1.3 only (forward
  secrecy) carries the hello and a fresh per-direction AES-128-OCB3 key; frames are then sealed with
  that key (see :mod:`veil.net.tlschannel`). Nothing is ever pickled; payloads are raw bytes.
* **Mutual authentication**: both sides require a certificate chaining to the deployment's CA
  (``ca.pem`` from ``veil keygen``, the only trust anchor loaded), and after the handshake each side
  checks that the peer's certificate names exactly the party it expects (CN and SAN). A party with a
  certificate from another CA, or for another name, is refused with :class:`PartyError`.
* **Session binding**: after TLS the dialing side sends a hello (party name + session id), checked
  by the accepting side, on both directions of every pair; a party of another run is refused.
  Every frame then carries the session id and a per-pair sequence number
  (see ``veil.net.transport``), so frames are never taken from another run, replayed or reordered.
* A connection that ends at a frame boundary is reported as the peer closing; the protocol layer
  fails on the message it still expects, so truncation cannot pass for data.

Connection setup (certificates, hellos) lives in :mod:`veil.net.tlssetup`.

The hello (party name + session id) and the frames' encryption are described in
:mod:`veil.net.tlschannel`; frames follow :mod:`veil.net.transport`. The event loop (no threads: the
calling thread reads every incoming connection while it waits to send or receive) is
:class:`TLSTransport` below.
"""

from __future__ import annotations

import contextlib
import math
import selectors
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from veil.net.tlschannel import MAX_MESSAGE_BYTES, Incoming, Outgoing
from veil.net.tlssetup import connect_channels, tls_contexts
from veil.net.transport import DEFAULT_TIMEOUT_S, HEADER, PartyError, TrafficStats, Transport, pack_header

__all__ = ["TLSTransport", "tls_contexts"]


class TLSTransport(Transport):
    """Messages between parties over TCP with mutual TLS 1.3; build one with :meth:`connect`.

    No threads of its own: the thread that sends or receives drives the event loop. While it waits
    (for a message, or for room in a peer's buffers) it reads every incoming connection, so two
    parties that send each other large messages at once do not deadlock. Several threads may use one
    transport: sends to one peer are serialized, the loop's state is locked only for non-blocking
    steps, and :meth:`close` wakes a thread that waits.

    Timeouts count time without progress: a ``recv`` fails after ``timeout`` seconds in which no
    byte of the awaited peer arrived, a ``send`` after ``timeout`` seconds in which the peer took no
    byte (its buffers full: it stalled, or it has been computing without reading for that long).
    """

    def __init__(self, party: str, parties: tuple[str, ...], session_id: bytes,
                 outgoing: dict[str, Outgoing], incoming: dict[str, Incoming], timeout: float) -> None:
        self.party, self.parties, self.session_id = party, parties, session_id
        self.timeout = timeout
        self.stats = TrafficStats()
        self._out, self._in = outgoing, incoming
        self._send_seq = dict.fromkeys(outgoing, 0)
        self._send_failed: dict[str, str] = {}  # a direction is unusable after a failed send ...
        self._recv_failed: dict[str, str] = {}  # ... or after its stream ended
        self._closed = False
        self._lock = threading.Lock()  # the loop's state; held only for non-blocking steps
        self._sending = {peer: threading.Lock() for peer in outgoing}  # one send at a time per peer
        self._selector = selectors.DefaultSelector()
        self._ended: set[str] = set()  # incoming streams that ended (no longer watched)
        self._wake_r, self._wake_w = socket.socketpair()  # close() wakes a waiting thread
        self._waiters = 0  # threads in the selector; the last one out after close() releases it
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        for ch in incoming.values():
            ch.start(session_id)
            self._selector.register(ch.sock, selectors.EVENT_READ, ch)

    @classmethod
    def connect(cls, party: str, addresses: Mapping[str, tuple[str, int]], certs_dir: Path,
                session_id: bytes, *, timeout: float = DEFAULT_TIMEOUT_S,
                listen_socket: socket.socket | None = None, connect_timeout: float = 30.0) -> TLSTransport:
        """Connect ``party`` to every other party of ``addresses`` (keys in party order).

        ``listen_socket``, if given, is an already listening socket for ``party`` (it is closed once
        every other party has connected); otherwise one is bound to ``addresses[party]`` (pass your
        own socket to listen elsewhere, e.g. on all interfaces behind NAT). Every party dials every
        other (its sending direction) and accepts every other (its receiving direction); each
        connection must prove the peer's name with a certificate of our CA and a hello with our
        session id.
        """
        parties, outgoing, incoming = connect_channels(party, addresses, certs_dir, session_id, listen_socket,
                                                       connect_timeout)
        return cls(party, parties, session_id, outgoing, incoming, timeout)

    def _closed_error(self) -> PartyError:
        return PartyError(f"{self.party}: transport is closed")

    def _wait(self, deadline: float, writer: Outgoing | None = None) -> None:
        """Wait until an incoming connection has data (read what every ready one holds), ``writer``
        can write, :meth:`close` is called, or ``deadline`` passes (at once if it has passed)."""
        remaining = deadline - time.monotonic()
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if writer is not None:
                self._selector.register(writer.sock, selectors.EVENT_WRITE, writer)
            self._waiters += 1
        try:
            events = self._selector.select(None if math.isinf(remaining) else max(remaining, 0.0))
        finally:
            with self._lock:
                self._waiters -= 1
                if self._closed:
                    if not self._waiters:
                        self._release()
                elif writer is not None:
                    self._selector.unregister(writer.sock)
        with self._lock:
            if self._closed:
                raise self._closed_error()
            for key, _ in events:
                if isinstance(key.data, Incoming):
                    self._read(key.data)

    def _read(self, ch: Incoming) -> None:
        ch.read()
        if ch.error is not None and ch.peer not in self._ended:
            self._ended.add(ch.peer)
            self._selector.unregister(ch.sock)  # an ended stream stays readable: stop watching it

    def send(self, to: str, payload: bytes | bytearray | memoryview) -> None:
        self._check_peer(to)
        view = memoryview(payload)
        if not view.contiguous:
            raise ValueError(f"{self.party}: send needs a contiguous buffer")
        view = view.cast("B") if view.nbytes else memoryview(b"")
        if view.nbytes > MAX_MESSAGE_BYTES:
            raise ValueError(f"{self.party}: a message of {view.nbytes} bytes is over the limit of one frame "
                             f"({MAX_MESSAGE_BYTES} bytes); send it in parts (e.g. smaller batches)")
        out = self._out[to]
        with self._sending[to]:
            with self._lock:
                if self._closed:
                    raise self._closed_error()
                if to in self._send_failed:
                    raise PartyError(self._send_failed[to])
                seq = self._send_seq[to]
                out.seal(pack_header(self.session_id, seq, view.nbytes), seq, view)
            try:
                # While the peer's buffers are full, keep reading ours.
                deadline = time.monotonic() + self.timeout
                while True:
                    with self._lock:
                        if self._closed:
                            raise self._closed_error()
                        wrote = out.flush()
                        if not out.pending:
                            break
                    now = time.monotonic()
                    if wrote:
                        deadline = now + self.timeout
                    elif now >= deadline:
                        raise PartyError(f"{self.party}: {to!r} did not take a message within {self.timeout:g} "
                                         f"s (the party died or stalled)")
                    self._wait(deadline, out)
            except BaseException as e:
                # The frame is cut: the direction cannot go on; close it so that the peer hears at once.
                out.close()
                if isinstance(e, OSError):
                    why = f"{self.party}: could not send to {to!r}: {e} (the party died?)"
                    self._send_failed[to] = why
                    raise PartyError(why) from e
                self._send_failed[to] = (str(e) if isinstance(e, PartyError) else
                                         f"{self.party}: an earlier send to {to!r} was interrupted")
                raise
            self._send_seq[to] = seq + 1
            self.stats.record_send(to, HEADER.size + view.nbytes)

    def _take(self, frm: str, ch: Incoming) -> bytearray | None:
        """The next frame from ``frm`` if one is here (reading what its connection holds); raises if
        its stream ended. Called with the lock held."""
        if self._closed:
            raise self._closed_error()
        if frm in self._recv_failed:
            raise PartyError(self._recv_failed[frm])
        if not ch.frames and frm not in self._ended:
            self._read(ch)
        if ch.frames:
            item = ch.frames.popleft()
            self.stats.record_recv(frm, HEADER.size + len(item))
            return item
        if ch.error is not None:
            self._recv_failed[frm] = str(ch.error)
            raise PartyError(str(ch.error))
        return None

    def recv(self, frm: str, *, wait: float | None = None) -> bytearray:
        self._check_peer(frm)
        limit = self.timeout if wait is None else wait
        if math.isnan(limit):
            raise ValueError(f"{self.party}: recv wait must be a number of seconds, got {wait!r}")
        ch, progress, deadline = self._in[frm], -1, 0.0
        while True:
            with self._lock:
                item = self._take(frm, ch)
                if item is not None:
                    return item
                got = ch.bytes_in
            now = time.monotonic()
            if got != progress:  # some of the awaited message arrived: the peer is alive
                progress, deadline = got, now + limit
            elif now >= deadline:
                raise PartyError(f"{self.party}: no message from {frm!r} within {limit:g} s "
                                 f"(the party died or stalled)")
            self._wait(deadline)

    def poll(self, frm: str) -> bool:
        self._check_peer(frm)
        if self._closed:
            return True  # recv will say so
        self._wait(time.monotonic())  # read what every connection holds, without waiting
        with self._lock:
            ch = self._in[frm]
            return bool(ch.frames) or ch.error is not None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            channels: list[Outgoing | Incoming] = [*self._out.values(), *self._in.values()]
            for ch in channels:
                ch.close()
            if self._waiters:  # the last of them releases the selector on its way out
                with contextlib.suppress(OSError):
                    self._wake_w.send(b"\x00")
            else:
                self._release()

    def _release(self) -> None:
        self._selector.close()
        for sock in (self._wake_r, self._wake_w):
            sock.close()
