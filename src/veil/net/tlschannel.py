"""One direction of a TLS link between two parties: setup checks, hello, frames, reader thread.

Used by :mod:`veil.net.tls`, which owns connection setup and the party-level checks.

Two connections per pair of parties, one per direction. OpenSSL forbids using one SSL object from
two threads at once, so each connection is used by one side for writing only (the party that dialed
it, a TLS client: :class:`Outgoing`) and by the other for reading only (the party that accepted it,
a TLS server: :class:`Incoming`, whose reader thread drains it into a queue). A ``send`` therefore
never waits for the peer's ``recv``, and no lock or memory BIO sits on the data path: payloads go
out with one ``sendall`` and are decrypted straight into one preallocated buffer per message.

Hello contract (inside TLS, once, from the dialing party, before any frame)::

    magic    4 bytes   b"VHLO"
    session 16 bytes   the session id
    n        2 bytes   little-endian length of the name (1..64)
    name     n bytes   the sender's party name, ASCII

Frames follow the contract of :mod:`veil.net.transport`.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import struct
import threading
from typing import Any

from veil.net.transport import HEADER, PartyError, check_header

HELLO = struct.Struct("<4s16sH")
HELLO_MAGIC = b"VHLO"
MAX_MESSAGE_BYTES = 1 << 36  # a larger length field is refused (corrupt or hostile frame)
SMALL = 1 << 16  # payloads up to this size go out in one write with their header


class PeerClosed(Exception):
    """The peer closed the connection (clean TLS close_notify or TCP FIN)."""


def identity(tls: ssl.SSLSocket) -> frozenset[str]:
    """The names (CN and DNS SANs) in the peer's verified certificate."""
    cert: dict[str, Any] = dict(tls.getpeercert() or {})
    cns = {v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"}
    return frozenset(cns | {v for k, v in cert.get("subjectAltName", ()) if k == "DNS"})


def read_exact(tls: ssl.SSLSocket, view: memoryview) -> int:
    """Fill ``view``; return how many bytes came before the stream ended."""
    pos, total = 0, len(view)
    while pos < total:
        try:
            got = tls.recv_into(view[pos:], total - pos)
        except ssl.SSLZeroReturnError:
            return pos
        if got == 0:
            return pos
        pos += got
    return pos


def hello_bytes(me: str, session_id: bytes) -> bytes:
    name = me.encode("ascii")
    return HELLO.pack(HELLO_MAGIC, session_id, len(name)) + name


def read_hello(me: str, who: str, tls: ssl.SSLSocket, session_id: bytes) -> str:
    """Read the dialing party's hello; return its name. PartyError on a wrong session."""
    head = bytearray(HELLO.size)
    if read_exact(tls, memoryview(head)) < HELLO.size:
        raise PeerClosed
    magic, sid, n = HELLO.unpack(head)
    if magic != HELLO_MAGIC or not 1 <= n <= 64:
        raise PartyError(f"{me}: {who} is not a Veil party (bad hello {bytes(head[:4])!r})")
    if sid != session_id:
        raise PartyError(f"{me}: refused {who}: its session id is {sid.hex()}, this session "
                         f"is {session_id.hex()} (a party of another run, or a stale peers file?)")
    raw = bytearray(n)
    if read_exact(tls, memoryview(raw)) < n:
        raise PeerClosed
    return raw.decode("ascii", errors="replace")


class Outgoing:
    """Our frames to one peer, over the TLS connection we dialed (written by us only)."""

    def __init__(self, me: str, peer: str, tls: ssl.SSLSocket, timeout: float) -> None:
        self.me, self.peer, self.tls = me, peer, tls
        self._lock = threading.Lock()  # several threads of one party may send to the same peer
        tls.settimeout(timeout)  # bounds sendall when the peer stops reading
        self.closed = False

    def write(self, header: bytes, payload: memoryview) -> None:
        with self._lock:
            if payload.nbytes <= SMALL:
                self.tls.sendall(header + payload)
            else:
                self.tls.sendall(header)
                self.tls.sendall(payload)

    def close(self) -> None:
        """Send TLS close_notify (best effort) so the peer sees a clean end, then close."""
        if self.closed:
            return
        self.closed = True
        if self._lock.acquire(timeout=1.0):
            try:
                self.tls.settimeout(0.5)
                with contextlib.suppress(OSError, ValueError):
                    self.tls.unwrap()  # sends close_notify; the peer never answers on this direction
            finally:
                self._lock.release()
        with contextlib.suppress(OSError):
            self.tls.close()


class Incoming:
    """The peer's frames to us, over the TLS connection it dialed (read by our reader thread only)."""

    def __init__(self, me: str, peer: str, who: str, tls: ssl.SSLSocket) -> None:
        self.me, self.peer, self.who, self.tls = me, peer, who, tls
        self.queue: queue.Queue[bytearray | PartyError] = queue.Queue()
        self.closed = False
        self._reader: threading.Thread | None = None

    def start(self, session_id: bytes) -> None:
        self.tls.settimeout(None)  # recv() waits with its own timeout on the queue
        self._reader = threading.Thread(target=self._read_frames, args=(session_id,), daemon=True,
                                        name=f"veil-{self.me}<-{self.peer}")
        self._reader.start()

    def _read_frames(self, session_id: bytes) -> None:
        seq, head = 0, bytearray(HEADER.size)
        try:
            while True:
                got = read_exact(self.tls, memoryview(head))
                if got == 0:
                    raise PartyError(f"{self.me}: party {self.who} closed its connection (it finished, "
                                     f"gave up or died)")
                if got < HEADER.size:
                    raise PartyError(f"{self.me}: truncated message from {self.who}")
                length = check_header(bytes(head), session_id, seq, self.peer, self.me)
                if length > MAX_MESSAGE_BYTES:
                    raise PartyError(f"{self.me}: message from {self.who} claims {length} bytes "
                                     f"(limit {MAX_MESSAGE_BYTES})")
                payload = bytearray(length)
                if read_exact(self.tls, memoryview(payload)) < length:
                    raise PartyError(f"{self.me}: truncated message from {self.who} (connection lost)")
                self.queue.put(payload)
                seq += 1
        except PartyError as e:
            err = e
        except (OSError, ssl.SSLError, MemoryError, ValueError) as e:
            err = PartyError(f"{self.me}: connection to {self.who} lost: {e} (the party died?)")
        if self.closed:
            err = PartyError(f"{self.me}: transport is closed")
        self.queue.put(err)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.tls.shutdown(socket.SHUT_RDWR)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2.0)
        with contextlib.suppress(OSError):
            self.tls.close()
