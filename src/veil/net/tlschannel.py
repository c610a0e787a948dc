"""One direction of a link between two parties: TLS set-up, hello, AEAD frames, non-blocking I/O.

Used by :mod:`veil.net.tlssetup` (connection setup, the party-level checks) and :mod:`veil.net.tls`
(the event loop).

Two connections per pair of parties, one per direction, each written by the party that dialed it
(:class:`Outgoing`) and read by the party that accepted it (:class:`Incoming`). After set-up both
are non-blocking and driven by the transport's event loop, in the calling thread: a party waiting
in ``send`` or ``recv`` reads every incoming connection meanwhile, so two parties sending each other
megabytes at once do not deadlock, and a message needs no hand-off between threads (one wake-up
per message instead of two). A ``send`` larger than the socket buffers returns once the peer has
read the rest, which it does in its own next ``send``, ``recv`` or ``poll``.

Set-up runs TLS 1.3 with both certificates checked. Inside TLS the dialing party sends its hello
and a fresh 128-bit key (``secrets``); both sides then close TLS (close_notify both ways) and the
connection carries frames sealed with AES-128-OCB3 (RFC 7253) under that key, one AEAD call per
message instead of one per 16 KB TLS record (several times faster in Python for the megabyte
messages of MPC). OCB3 rather than GCM: the same guarantee (a nonce-respecting AEAD under AES), and
OpenSSL's OCB runs at twice GCM's speed here (1.6 MB sealed in 0.19 ms against 0.37 ms), which the
parties of a multiplication pay four times per round trip. The
key is known only to the two authenticated endpoints (it travelled inside their mutually
authenticated TLS session); the nonce is the frame's sequence number (unique per key: each
direction has its own key), and the frame header is the associated data, so a forged, altered,
replayed, reordered or truncated frame fails authentication or the sequence check.

Hello contract (inside TLS, once, from the dialing party, before TLS closes)::

    magic    4 bytes   b"VHLO"
    session 16 bytes   the session id
    n        2 bytes   little-endian length of the name (1..64)
    name     n bytes   the sender's party name, ASCII
    key     16 bytes   AES-128-OCB3 key of this direction

Frame on the wire: the header of :mod:`veil.net.transport` in clear (authenticated as associated
data), then ``length + 16`` bytes of ciphertext and tag; nonce = 4 zero bytes + 8-byte sequence.
"""

from __future__ import annotations

import collections
import contextlib
import secrets
import socket
import ssl
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3

from veil.net.transport import HEADER, PartyError, check_header

HELLO = struct.Struct("<4s16sH")
HELLO_MAGIC = b"VHLO"
KEY_BYTES = 16
TAG_BYTES = 16
# One AEAD call seals a frame, and OpenSSL's OCB takes at most 2^31 - 1 bytes: larger messages are
# refused when sent, and a larger length field is refused when read (corrupt or hostile frame).
MAX_MESSAGE_BYTES = (1 << 31) - 1 - TAG_BYTES


class PeerClosed(Exception):
    """The peer closed the connection (clean TLS close_notify or TCP FIN)."""


def identity(tls: ssl.SSLSocket) -> frozenset[str]:
    """The names (CN and DNS SANs) in the peer's verified certificate."""
    cert: dict[str, Any] = dict(tls.getpeercert() or {})
    cns = {v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"}
    return frozenset(cns | {v for k, v in cert.get("subjectAltName", ()) if k == "DNS"})


def read_exact(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view`` (blocking socket); return how many bytes came before the stream ended."""
    pos, total = 0, len(view)
    while pos < total:
        try:
            got = sock.recv_into(view[pos:], total - pos)
        except ssl.SSLZeroReturnError:
            return pos
        if got == 0:
            return pos
        pos += got
    return pos


def nonce(seq: int) -> bytes:
    return b"\x00\x00\x00\x00" + seq.to_bytes(8, "little")


def new_hello(me: str, session_id: bytes) -> tuple[bytes, bytes]:
    """Our hello and the fresh key it carries."""
    name = me.encode("ascii")
    key = secrets.token_bytes(KEY_BYTES)
    return HELLO.pack(HELLO_MAGIC, session_id, len(name)) + name + key, key


def read_hello(me: str, who: str, tls: ssl.SSLSocket, session_id: bytes) -> tuple[str, bytes]:
    """Read the dialing party's hello; return its name and key. PartyError on a wrong session."""
    head = bytearray(HELLO.size)
    if read_exact(tls, memoryview(head)) < HELLO.size:
        raise PeerClosed
    magic, sid, n = HELLO.unpack(head)
    if magic != HELLO_MAGIC or not 1 <= n <= 64:
        raise PartyError(f"{me}: {who} is not a Veil party (bad hello {bytes(head[:4])!r})")
    if sid != session_id:
        raise PartyError(f"{me}: refused {who}: its session id is {sid.hex()}, this session "
                         f"is {session_id.hex()} (a party of another run, or a stale peers file?)")
    raw = bytearray(n + KEY_BYTES)
    if read_exact(tls, memoryview(raw)) < n + KEY_BYTES:
        raise PeerClosed
    return raw[:n].decode("ascii", errors="replace"), bytes(raw[n:])


def end_tls(tls: ssl.SSLSocket) -> socket.socket:
    """Close TLS both ways (close_notify) and return the plain connection for AEAD frames."""
    tls.unwrap()
    return socket.socket(tls.family, tls.type, tls.proto, fileno=tls.detach())


class Outgoing:
    """Our frames to one peer, sealed with the key we sent it, over the connection we dialed.

    :meth:`seal` queues a frame; :meth:`flush` writes what the socket takes without blocking."""

    def __init__(self, me: str, peer: str, sock: socket.socket, key: bytes) -> None:
        self.me, self.peer, self.sock = me, peer, sock
        self._aead = AESOCB3(key)
        self._buf = bytearray(0)  # the sealed payload, reused once the previous frame is written
        self._pending: collections.deque[memoryview] = collections.deque()
        sock.setblocking(False)
        self.closed = False

    def seal(self, header: bytes, seq: int, payload: memoryview) -> None:
        """Queue one frame: ``header`` in clear (associated data), then ``payload`` sealed into the
        reused buffer. Only when nothing is pending: the transport writes a whole frame before the
        next, and a direction whose send failed takes no more."""
        need = payload.nbytes + TAG_BYTES
        if len(self._buf) < need:
            self._buf = bytearray(max(need, 2 * len(self._buf)))
        out = memoryview(self._buf)[:need]
        self._aead.encrypt_into(nonce(seq), payload, header, out)
        self._pending.append(memoryview(header))
        self._pending.append(out)

    @property
    def pending(self) -> bool:
        """Whether queued bytes are still unwritten."""
        return bool(self._pending)

    def flush(self) -> int:
        """Write queued bytes until the socket would block; return how many were written.
        OSError if the connection is broken."""
        pending, total = self._pending, 0
        while pending:
            try:
                sent = self.sock.sendmsg(list(pending)[:64])
            except BlockingIOError:
                break
            total += sent
            while sent:
                head = pending[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    pending.popleft()
                else:
                    pending[0] = head[sent:]
                    sent = 0
        return total

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)  # the peer reads a clean end of stream
        with contextlib.suppress(OSError):
            self.sock.close()


class Incoming:
    """The peer's frames to us, opened with its key: :meth:`read` takes what the socket holds
    without blocking and queues complete frames in order, then the error that ended the stream.

    The buffer for a frame grows as its bytes arrive (a header claiming gigabytes costs nothing
    until they come) and is kept for the next frames."""

    def __init__(self, me: str, peer: str, who: str, sock: socket.socket, key: bytes) -> None:
        self.me, self.peer, self.who, self.sock = me, peer, who, sock
        self._aead = AESOCB3(key)
        self.frames: collections.deque[bytearray] = collections.deque()
        self.error: PartyError | None = None  # set once the stream ended; reported after its frames
        self.closed = False
        self.session_id = b""
        self.bytes_in = 0  # every byte read so far (a waiting recv sees progress)
        self._seq = 0
        self._head = bytearray(HEADER.size)
        self._got = 0  # bytes of the current header (while _need is 0) or of the current body
        self._need = 0  # sealed bytes of the current body; 0 while reading a header
        self._sealed = bytearray(0)
        self._length = 0

    def start(self, session_id: bytes) -> None:
        self.session_id = session_id
        self.sock.setblocking(False)

    def read(self) -> None:
        """Read until the socket would block; queue each complete frame, opened."""
        if self.error is not None:
            return
        try:
            while True:
                if not self._need:
                    got = self.sock.recv_into(memoryview(self._head)[self._got:])
                    if got == 0:
                        raise PartyError(f"{self.me}: party {self.who} closed its connection (it "
                                         f"finished, gave up or died)" if self._got == 0 else
                                         f"{self.me}: truncated message from {self.who}")
                    self._got += got
                    if self._got == HEADER.size:
                        self._begin_body()
                else:
                    if self._got == len(self._sealed):
                        self._grow()
                    got = self.sock.recv_into(memoryview(self._sealed)[self._got:self._need])
                    if got == 0:
                        raise PartyError(f"{self.me}: truncated message from {self.who} (connection lost)")
                    self._got += got
                    if self._got == self._need:
                        self._open()
                self.bytes_in += got
        except BlockingIOError:
            return
        except PartyError as e:
            self.error = e
        except MemoryError:
            self.error = PartyError(f"{self.me}: message from {self.who} of {self._length} bytes: more than "
                                    f"this process can hold")
        except (OSError, ValueError) as e:
            self.error = PartyError(f"{self.me}: connection to {self.who} lost: {e} (the party died?)")
        if self.closed:
            self.error = PartyError(f"{self.me}: transport is closed")

    def _begin_body(self) -> None:
        length = check_header(bytes(self._head), self.session_id, self._seq, self.peer, self.me)
        if length > MAX_MESSAGE_BYTES:
            raise PartyError(f"{self.me}: message from {self.who} claims {length} bytes "
                             f"(limit {MAX_MESSAGE_BYTES})")
        self._length, self._need, self._got = length, length + TAG_BYTES, 0

    def _grow(self) -> None:
        """Room for more of the current frame: double the buffer, up to the frame's size."""
        size = min(self._need, max(2 * len(self._sealed), 1 << 20))
        try:
            bigger = bytearray(size)
        except MemoryError:
            raise PartyError(f"{self.me}: message from {self.who} claims {self._length} bytes, more than "
                             f"this process can hold") from None
        bigger[:self._got] = memoryview(self._sealed)[:self._got]
        self._sealed = bigger

    def _open(self) -> None:
        payload = bytearray(self._length)
        try:
            self._aead.decrypt_into(nonce(self._seq), memoryview(self._sealed)[:self._need], bytes(self._head),
                                    payload)
        except InvalidTag:
            raise PartyError(f"{self.me}: message {self._seq} from {self.who} failed authentication "
                             f"(altered or forged on the wire)") from None
        self.frames.append(payload)
        self._seq += 1
        self._need, self._got = 0, 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
