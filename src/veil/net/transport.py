"""Transports: how parties exchange raw tensor bytes.

Compatibility contract of a frame (every transport, in-process included)::

    magic    4 bytes   b"VEIL"
    session 16 bytes   the session id every party of a run was given
    seq      8 bytes   little-endian, per (sender, receiver) pair, starting at 0
    length   8 bytes   little-endian payload length
    payload  length bytes

A frame whose magic, session or sequence number is wrong is refused with :class:`PartyError`:
a message of another run (or a replayed one) is never taken for data of this run.

Round counting is the protocol layer's business (a round is one step in which parties exchange
messages); a transport counts bytes and messages per peer.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

MAGIC = b"VEIL"
HEADER = struct.Struct("<4s16sQQ")
SESSION_ID_BYTES = 16
DEFAULT_TIMEOUT_S = 60.0


class PartyError(RuntimeError):
    """A peer died, stalled, or sent a message that does not belong to this session."""


@dataclass
class TrafficStats:
    """Bytes and messages this party sent to and received from each peer, plus protocol rounds.

    Bytes count payloads plus frame headers (what a wire would carry before TLS framing).
    """

    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)
    messages_sent: dict[str, int] = field(default_factory=dict)
    rounds: int = 0

    def record_send(self, peer: str, n: int) -> None:
        self.bytes_sent[peer] = self.bytes_sent.get(peer, 0) + n
        self.messages_sent[peer] = self.messages_sent.get(peer, 0) + 1

    def record_recv(self, peer: str, n: int) -> None:
        self.bytes_received[peer] = self.bytes_received.get(peer, 0) + n

    def copy(self) -> TrafficStats:
        return TrafficStats(dict(self.bytes_sent), dict(self.bytes_received), dict(self.messages_sent),
                            self.rounds)

    def __sub__(self, other: TrafficStats) -> TrafficStats:
        def diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}

        return TrafficStats(diff(self.bytes_sent, other.bytes_sent),
                            diff(self.bytes_received, other.bytes_received),
                            diff(self.messages_sent, other.messages_sent), self.rounds - other.rounds)

    def total(self, peers: Sequence[str] | None = None) -> int:
        """Bytes sent plus received, over ``peers`` (all peers when None)."""
        keys = set(self.bytes_sent) | set(self.bytes_received) if peers is None else set(peers)
        return sum(self.bytes_sent.get(k, 0) + self.bytes_received.get(k, 0) for k in keys)

    def as_dict(self) -> dict[str, object]:
        return {"bytes_sent": dict(self.bytes_sent), "bytes_received": dict(self.bytes_received),
                "messages_sent": dict(self.messages_sent), "rounds": self.rounds}


def pack_header(session_id: bytes, seq: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, session_id, seq, length)


def check_header(raw: bytes, session_id: bytes, expected_seq: int, peer: str, me: str) -> int:
    """Validate a frame header from ``peer``; return the payload length."""
    magic, sid, seq, length = HEADER.unpack(raw)
    if magic != MAGIC:
        raise PartyError(f"{me}: message from {peer!r} is not a Veil frame (bad magic {magic!r})")
    if sid != session_id:
        raise PartyError(f"{me}: refused a message from {peer!r} with session id {sid.hex()}; "
                         f"this session is {session_id.hex()} (a message of another run?)")
    if seq != expected_seq:
        raise PartyError(f"{me}: message from {peer!r} has sequence number {seq}, expected "
                         f"{expected_seq} (replayed or lost message)")
    return int(length)


class Transport(ABC):
    """Point-to-point, ordered, reliable message passing between named parties.

    Two parties may both send before they receive: a ``send`` that waits for room in the peer's
    buffers reads the incoming connections meanwhile (the TLS transport) or never waits (the
    in-process one).
    """

    party: str
    parties: tuple[str, ...]
    session_id: bytes
    stats: TrafficStats
    timeout: float

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(p for p in self.parties if p != self.party)

    @abstractmethod
    def send(self, to: str, payload: bytes | bytearray | memoryview) -> None:
        """Send one message to party ``to``."""

    @abstractmethod
    def recv(self, frm: str, *, wait: float | None = None) -> bytearray:
        """Receive the next message from party ``frm``; PartyError after ``wait`` seconds (default:
        ``timeout``; ``math.inf`` waits until the message comes or the connection closes)."""

    @abstractmethod
    def poll(self, frm: str) -> bool:
        """Whether a message (or the news of a closed connection) from ``frm`` is waiting."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; further sends and receives fail."""

    def _check_peer(self, name: str) -> None:
        if name == self.party or name not in self.parties:
            raise PartyError(f"{self.party}: no channel to {name!r}; peers are {list(self.peers)}")

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
