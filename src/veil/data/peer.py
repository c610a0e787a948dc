"""Two compute parties keeping in step over a dataset: one-round swaps of checked JSON metadata
(an error on either side stops both, with the same error type), an agreed shuffle seed, and the
shuffle order it fixes. Used by :mod:`veil.data.shares` and by ``veil.nn.fit``."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from veil.data.sharefile import SEED_BYTES, ShareFileError
from veil.mpc.prg import PRG
from veil.net.transport import PartyError
from veil.ring import EncodingError

if TYPE_CHECKING:
    from veil.mpc.session import Session

_ERRORS: dict[str, type[Exception]] = {"ShareFileError": ShareFileError, "EncodingError": EncodingError,
                                       "TypeError": TypeError, "OSError": OSError, "ValueError": ValueError}


def _exchange(session: Session, obj: Mapping[str, Any]) -> dict[str, Any]:
    """One round: send a JSON object to the peer, receive the peer's."""
    session.transport.send(session.peer, json.dumps(obj).encode())
    raw = session.transport.recv(session.peer)
    session.stats.rounds += 1
    try:
        msg = json.loads(bytes(raw))
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        raise PartyError(f"{session.party}: malformed message from {session.peer!r} (parties out of step?)")
    return msg


def _swap_checked(session: Session, mine: dict[str, Any] | Exception, what: str) -> dict[str, Any]:
    """Swap ``mine`` (or the local error) with the peer; fail in both parties if either side failed,
    the peer with the same error type, so that no party waits for a peer that already gave up."""
    if isinstance(mine, Exception):
        kind = next(k for k, cls in _ERRORS.items() if isinstance(mine, cls))
        _exchange(session, {"error": {"kind": kind, "message": str(mine)}})
        raise mine
    theirs = _exchange(session, mine)
    err = theirs.get("error")
    if err is not None:
        cls = _ERRORS.get(str(err.get("kind")), ValueError) if isinstance(err, dict) else ValueError
        message = str(err.get("message") if isinstance(err, dict) else err)[:4000]
        raise cls(f"{session.peer} {what}: {message}")
    return theirs


def _local_error(e: Exception) -> Exception:
    if isinstance(e, tuple(_ERRORS.values())):
        return e
    raise e


def agree_seed(session: Session) -> bytes:
    """A fresh 128-bit shuffle seed both compute parties hold: the first party draws it with
    ``secrets`` and sends it (one message). Call it in both parties at the same point."""
    if session.index == 0:
        seed = secrets.token_bytes(SEED_BYTES)
        session.transport.send(session.peer, seed)
    else:
        seed = bytes(session.transport.recv(session.peer))
        if len(seed) != SEED_BYTES:
            raise PartyError(f"{session.party}: expected a {SEED_BYTES}-byte seed from {session.peer!r}")
    session.stats.rounds += 1
    return seed


def shuffle_order(seed: bytes, n: int) -> torch.Tensor:
    """The permutation of ``range(n)`` that :meth:`SharedDataset.batches` follows for ``seed``: sort the
    indices by 64-bit keys from AES-CTR keyed with SHA-256("veil.data.shares order v1" || seed)[:16].
    Uniform but for ties (probability below n^2 / 2^65), which a stable sort breaks by index."""
    key = hashlib.sha256(b"veil.data.shares order v1\x00" + bytes(seed)).digest()[:16]
    return torch.argsort(PRG(key).int64(n), stable=True)
