"""One TLS connection between two parties: handshake, hello, frames, and a reader thread.

Used by :mod:`veil.net.tls`, which owns connection setup and the party-level checks.

OpenSSL forbids using one SSL object from two threads at once (even SSL_read beside SSL_write), so
TLS runs over memory BIOs guarded by a lock; only the raw socket, which is full duplex, is used by
the reader thread and the sender at the same time. The reader thread drains the connection into a
queue, so a ``send`` never waits for the peer's ``recv``, and large payloads are decrypted straight
into one preallocated buffer per message.

Hello contract (inside TLS, once in each direction, before any frame)::

    magic    4 bytes   b"VHLO"
    session 16 bytes   the session id
    n        2 bytes   little-endian length of the name (1..64)
    name     n bytes   the sender's party name, ASCII

Frames follow the contract of :mod:`veil.net.transport`.
"""

from __future__ import annotations

import queue
import socket
import ssl
import struct
import threading
from typing import Any, cast

from veil.net.transport import HEADER, PartyError, check_header

HELLO = struct.Struct("<4s16sH")
HELLO_MAGIC = b"VHLO"
MAX_MESSAGE_BYTES = 1 << 36  # a larger length field is refused (corrupt or hostile frame)
CHUNK = 1 << 20  # plaintext bytes encrypted and sent per step
SMALL = 1 << 16  # payloads up to this size go out in one TLS record with their header
MAX_READ = 1 << 30  # SSLObject.read takes a C int


class PeerClosed(Exception):
    """The socket reached its end (the peer closed it, or its process died)."""


class TLSChannel:
    """One TLS connection to a peer: an ``ssl.SSLObject`` over a plain blocking socket."""

    def __init__(self, me: str, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool,
                 who: str) -> None:
        self.me, self.who, self.peer, self.sock = me, who, "", sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        self._tls_lock = threading.Lock()  # guards _tls, _in and _out
        self._send_lock = threading.Lock()  # keeps ciphertext in order on the wire
        self._buf = bytearray(1 << 18)
        self.queue: queue.Queue[bytearray | PartyError] = queue.Queue()
        self.closed = False
        self.peer_closed_tls = False  # the peer sent TLS close_notify (a clean close)
        self._reader: threading.Thread | None = None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- raw I/O -----------------------------------------------------------------------------
    def _fill(self) -> None:
        """Read ciphertext from the socket into the TLS input buffer; PeerClosed at end of stream."""
        while True:
            try:
                n = self.sock.recv_into(self._buf)
                break
            except TimeoutError:
                if self._reader is None or self.closed:  # during setup, the deadline has passed
                    raise
        if n == 0:
            raise PeerClosed
        with self._tls_lock:
            self._in.write(memoryview(self._buf)[:n])

    def _flush(self) -> None:
        with self._tls_lock:
            data = self._out.read()
        if data:
            self.sock.sendall(data)

    def read_into(self, view: memoryview) -> int:
        """Fill ``view`` with plaintext; return how many bytes came before the stream ended.

        Whether the end was clean (TLS close_notify) is recorded in ``peer_closed_tls``.
        """
        pos = 0
        while pos < len(view):
            with self._tls_lock:
                try:
                    got = cast(int, self._tls.read(min(len(view) - pos, MAX_READ), view[pos:pos + MAX_READ]))
                except ssl.SSLWantReadError:
                    got = -1
                except ssl.SSLZeroReturnError:
                    self.peer_closed_tls = True
                    return pos
            if got > 0:
                pos += got
            elif got == 0:  # CPython returns b"" rather than raising on close_notify
                self.peer_closed_tls = True
                return pos
            else:
                try:
                    self._fill()
                except PeerClosed:
                    return pos
        return pos

    def write(self, *parts: bytes | memoryview) -> None:
        """Encrypt ``parts`` in order and send them, a chunk at a time."""
        with self._send_lock:
            for part in parts:
                for i in range(0, len(part), CHUNK):
                    with self._tls_lock:
                        self._tls.write(part[i:i + CHUNK])
                        data = self._out.read()
                    self.sock.sendall(data)

    # -- setup (one thread) ---------------------------------------------------------------------
    def handshake(self) -> None:
        try:
            while True:
                try:
                    with self._tls_lock:
                        self._tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    self._fill()
            self._flush()
        except ssl.SSLError:
            try:  # let the peer see our alert
                self._flush()
            except OSError:
                pass
            raise

    def identity(self) -> frozenset[str]:
        """The names (CN and DNS SANs) in the peer's verified certificate."""
        cert: dict[str, Any] = dict(self._tls.getpeercert() or {})
        cns = {v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"}
        return frozenset(cns | {v for k, v in cert.get("subjectAltName", ()) if k == "DNS"})

    def hello(self, session_id: bytes) -> str:
        """Send our hello, read the peer's; return its party name. PartyError on a wrong session."""
        name = self.me.encode("ascii")
        self.write(HELLO.pack(HELLO_MAGIC, session_id, len(name)) + name)
        head = bytearray(HELLO.size)
        if self.read_into(memoryview(head)) < HELLO.size:
            raise PeerClosed
        magic, sid, n = HELLO.unpack(head)
        if magic != HELLO_MAGIC or not 1 <= n <= 64:
            raise PartyError(f"{self.me}: {self.who} is not a Veil party (bad hello {bytes(head[:4])!r})")
        if sid != session_id:
            raise PartyError(f"{self.me}: refused {self.who}: its session id is {sid.hex()}, this session "
                             f"is {session_id.hex()} (a party of another run, or a stale peers file?)")
        raw = bytearray(n)
        if self.read_into(memoryview(raw)) < n:
            raise PeerClosed
        return raw.decode("ascii", errors="replace")

    # -- running ------------------------------------------------------------------------------
    def start(self, peer: str, session_id: bytes, timeout: float) -> None:
        self.peer, self.who = peer, repr(peer)
        self.sock.settimeout(timeout)  # bounds sendall; the reader just keeps waiting
        self._reader = threading.Thread(target=self._read_frames, args=(session_id,), daemon=True,
                                        name=f"veil-{self.me}<-{peer}")
        self._reader.start()

    def _read_frames(self, session_id: bytes) -> None:
        seq, head = 0, bytearray(HEADER.size)
        try:
            while True:
                got = self.read_into(memoryview(head))
                if got == 0:
                    if self.peer_closed_tls:
                        raise PartyError(f"{self.me}: party {self.who} closed its connection (it finished "
                                         f"or gave up)")
                    raise PartyError(f"{self.me}: party {self.who} dropped the connection without "
                                     f"closing it (the party died or its host went away)")
                if got < HEADER.size:
                    raise PartyError(f"{self.me}: truncated message from {self.who}")
                length = check_header(bytes(head), session_id, seq, self.peer, self.me)
                if length > MAX_MESSAGE_BYTES:
                    raise PartyError(f"{self.me}: message from {self.who} claims {length} bytes "
                                     f"(limit {MAX_MESSAGE_BYTES})")
                payload = bytearray(length)
                if self.read_into(memoryview(payload)) < length:
                    raise PartyError(f"{self.me}: truncated message from {self.who} (connection lost)")
                self.queue.put(payload)
                seq += 1
        except PartyError as e:
            err = e
        except (OSError, ssl.SSLError, MemoryError) as e:
            err = PartyError(f"{self.me}: connection to {self.who} lost: {e}")
        if self.closed:
            err = PartyError(f"{self.me}: transport is closed")
        self.queue.put(err)

    def close(self) -> None:
        """Send TLS close_notify (best effort), shut the socket down, stop the reader."""
        if self.closed:
            return
        self.closed = True
        if self._send_lock.acquire(timeout=1.0):
            try:
                with self._tls_lock:
                    try:
                        self._tls.unwrap()
                    except (ssl.SSLError, ValueError):
                        pass  # close_notify is in _out; we do not wait for the peer's
                    data = self._out.read()
                self.sock.settimeout(1.0)
                self.sock.sendall(data)
            except OSError:
                pass
            finally:
                self._send_lock.release()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2.0)
        self.sock.close()
