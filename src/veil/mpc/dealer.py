"""The dealer (crypto provider) of the 2-party protocol, and how parties take its material.

Trust model: the dealer is a third, non-colluding, semi-honest party. It produces correlated
randomness (Beaver triples, shared bits of a random mask, shifted truth tables...) and never
receives inputs, shares, masked values or outputs: the only message it gets from a compute party is
a request naming a recipe and public shapes.

Seeds, not data. At start-up the dealer sends AES-CTR keys ``k0`` to party 0 and ``k1`` to party 1.
Every random share is drawn from these streams by both the dealer and its party, in the same order.
A *random* field (``rand_arith``/``rand_bin``) costs no traffic at all: its value is the sum (or XOR)
of the two streams. A *derived* field (``arith``/``bin``: e.g. ``c = a * b`` of a triple) is party 0's
stream for party 0, and a correction ``value - stream0`` sent to party 1. Dealer traffic is counted
on the dealer's channels, apart from the compute parties' traffic.

A recipe is one function written once and run on both sides: on the dealer with :class:`DealerBox`
(fields are full values, derived fields are computed) and on a party with :class:`PartyBox` (fields
are that party's shares, derived fields are taken from the stream or the dealer's message). The
registry ``RECIPES`` is the allowlist of what a party may ask for.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from veil.mpc.prg import PRG, new_key
from veil.net.transport import PartyError, Transport

Recipe = Callable[..., Any]
RECIPES: dict[str, Recipe] = {}
MAX_REQUEST_ELEMENTS = 1 << 31
_NP_BY_BYTES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.int64}
_REPLY = struct.Struct("<Q")


def recipe(name: str) -> Callable[[Recipe], Recipe]:
    """Register a material recipe under ``name`` (the allowlist of dealer requests)."""

    def deco(fn: Recipe) -> Recipe:
        if name in RECIPES:
            raise ValueError(f"recipe {name!r} registered twice")
        RECIPES[name] = fn
        return fn

    return deco


def _mask(t: torch.Tensor, mask: int | None) -> torch.Tensor:
    return t if mask is None else t & mask


def _encode(t: torch.Tensor, nbytes: int) -> bytes:
    arr = t.detach().cpu().contiguous().numpy()
    return arr.astype(_NP_BY_BYTES[nbytes], copy=False).tobytes()


class DealerBox:
    """Dealer side: fields are full values; corrections for party 1 are collected in order."""

    def __init__(self, prg0: PRG, prg1: PRG) -> None:
        self.prg0, self.prg1 = prg0, prg1
        self.corrections: list[bytes] = []

    def rand_arith(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.prg0.int64(shape) + self.prg1.int64(shape)

    def rand_bin(self, shape: tuple[int, ...], mask: int | None = None) -> torch.Tensor:
        return _mask(self.prg0.int64(shape) ^ self.prg1.int64(shape), mask)

    def arith(self, shape: tuple[int, ...], value: Callable[[], torch.Tensor]) -> torch.Tensor:
        v = value()
        if tuple(v.shape) != tuple(shape):
            raise ValueError(f"recipe bug: derived field has shape {tuple(v.shape)}, declared {shape}")
        self.corrections.append(_encode(v - self.prg0.int64(shape), 8))
        return v

    def bin(self, shape: tuple[int, ...], value: Callable[[], torch.Tensor], nbytes: int = 8) -> torch.Tensor:
        v = value()
        if tuple(v.shape) != tuple(shape):
            raise ValueError(f"recipe bug: derived field has shape {tuple(v.shape)}, declared {shape}")
        low = (1 << (8 * nbytes)) - 1 if nbytes < 8 else None
        self.corrections.append(_encode(v ^ _mask(self.prg0.int64(shape), low), nbytes))
        return v


class PartyBox:
    """Party side: fields are this party's shares."""

    def __init__(self, index: int, prg: PRG, fetch: Callable[[], bytearray]) -> None:
        self.index, self.prg, self._fetch = index, prg, fetch
        self._buf: bytearray | None = None
        self._offset = 0

    def rand_arith(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.prg.int64(shape)

    def rand_bin(self, shape: tuple[int, ...], mask: int | None = None) -> torch.Tensor:
        return _mask(self.prg.int64(shape), mask)

    def _take(self, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
        if self._buf is None:
            self._buf = self._fetch()
        n = int(np.prod(shape)) if len(shape) else 1
        end = self._offset + n * nbytes
        if end > len(self._buf):
            raise PartyError("dealer's message is shorter than the recipe needs (parties out of step?)")
        arr = np.frombuffer(self._buf, dtype=_NP_BY_BYTES[nbytes], count=n, offset=self._offset)
        self._offset = end
        return torch.from_numpy(arr.astype(np.int64)).reshape(shape)

    def arith(self, shape: tuple[int, ...], value: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.prg.int64(shape) if self.index == 0 else self._take(shape, 8)

    def bin(self, shape: tuple[int, ...], value: Callable[[], torch.Tensor], nbytes: int = 8) -> torch.Tensor:
        if self.index == 0:
            low = (1 << (8 * nbytes)) - 1 if nbytes < 8 else None
            return _mask(self.prg.int64(shape), low)
        return self._take(shape, nbytes)

    def finish(self) -> None:
        """Party 1 consumes the dealer's message even when the recipe had no derived field."""
        if self.index == 1:
            if self._buf is None:
                self._buf = self._fetch()
            if self._offset != len(self._buf):
                raise PartyError(f"dealer's message has {len(self._buf) - self._offset} bytes the "
                                 f"recipe did not use (parties out of step?)")


class DealerClient:
    """A compute party's end of the dealer: runs recipes on its own streams and the dealer's messages."""

    def __init__(self, transport: Transport, index: int, dealer: str) -> None:
        self.transport, self.index, self.dealer = transport, index, dealer
        key = transport.recv(dealer)
        self.prg = PRG(bytes(key))
        self.requests = 0

    def _fetch(self) -> bytearray:
        msg = self.transport.recv(self.dealer)
        (counter,) = _REPLY.unpack_from(msg)
        if counter != self.requests:
            raise PartyError(f"dealer answered request {counter}, expected {self.requests}")
        return msg[_REPLY.size:]

    def take(self, name: str, **params: Any) -> Any:
        fn = RECIPES[name]
        if self.index == 0:
            self.transport.send(self.dealer, json.dumps({"recipe": name, "params": params}).encode())
        box = PartyBox(self.index, self.prg, self._fetch)
        out = fn(box, **params)
        box.finish()
        self.requests += 1
        return out

    def close(self) -> None:
        if self.index == 0:
            self.transport.send(self.dealer, json.dumps({"recipe": None}).encode())


def _check_params(name: str, params: dict[str, Any]) -> None:
    if name not in RECIPES:
        raise PartyError(f"dealer: refused request for unknown recipe {name!r}; known: {sorted(RECIPES)}")
    for key in ("n", "rows", "cols"):
        v = params.get(key)
        if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_REQUEST_ELEMENTS):
            raise PartyError(f"dealer: refused {name!r} request with {key}={v!r}")


def serve(transport: Transport, compute_parties: tuple[str, str]) -> int:
    """Run the dealer until party 0 says it is done; return the number of requests served."""
    import veil.mpc.material  # noqa: F401 - fills RECIPES

    p0, p1 = compute_parties
    k0, k1 = new_key(), new_key()
    transport.send(p0, k0)
    transport.send(p1, k1)
    prg0, prg1 = PRG(k0), PRG(k1)
    served = 0
    while True:
        raw = transport.recv(p0)
        try:
            req = json.loads(bytes(raw))
            name, params = req["recipe"], req.get("params", {})
        except (ValueError, KeyError, TypeError) as e:
            raise PartyError(f"dealer: malformed request from {p0!r}: {e}") from None
        if name is None:
            return served
        if not isinstance(params, dict):
            raise PartyError(f"dealer: malformed request parameters from {p0!r}")
        _check_params(name, params)
        box = DealerBox(prg0, prg1)
        RECIPES[name](box, **params)
        transport.send(p1, _REPLY.pack(served) + b"".join(box.corrections))
        served += 1
