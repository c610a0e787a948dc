"""The dealer (crypto provider) of the 2-party protocol, and how parties take its material.

Trust model: the dealer is a third, non-colluding, semi-honest party. It produces correlated
randomness (Beaver triples, shared bits of a random mask, shifted truth tables...) and never
receives inputs, shares, masked values or outputs: the only message it gets from a compute party is
a request naming a recipe and public shapes.

Seeds, not data. At start-up the dealer sends master keys ``k0`` to party 0 and ``k1`` to party 1;
request number ``i`` draws from the AES-CTR stream keyed ``AES(k_p, i)``, on both the dealer and
party ``p``, in the same order.
A *random* field (``rand_arith``/``rand_bin``) costs no traffic at all: its value is the sum (or XOR)
of the two streams. A *derived* field (``arith``/``bin``: e.g. ``c = a * b`` of a triple) is one
party's stream for that party, and a correction ``value - stream`` sent to the other party (``to``,
party 1 unless the recipe spreads the load). Every request is answered by one message to each
compute party. Dealer traffic is counted on the dealer's channels, apart from the compute parties'.

A recipe is one function written once and run on both sides: on the dealer with :class:`DealerBox`
(fields are full values, derived fields are computed) and on a party with :class:`PartyBox` (fields
are that party's shares, derived fields are taken from the stream or the dealer's message). The
registry ``RECIPES`` is the allowlist of what a party may ask for.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from veil.mpc.prg import PRG, derive_key, new_key
from veil.net.transport import PartyError, Transport

Recipe = Callable[..., Any]
RECIPES: dict[str, Recipe] = {}
MAX_REQUEST_ELEMENTS = 1 << 31
_REPLY = struct.Struct("<QQ")  # request number, part


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


_WIRE = {8: torch.int64, 2: torch.int16}  # binary fields travel as 64-bit words or 16-bit planes


def _encode(t: torch.Tensor) -> torch.Tensor:
    """A correction as a flat tensor of bytes."""
    return t.detach().reshape(-1).cpu().contiguous().view(torch.uint8)


def _reply(counter: int, part: int, parts: list[torch.Tensor]) -> memoryview:
    """Part ``part`` of the dealer's answer to request ``counter``: both numbers, then the
    corrections, in one copy."""
    head = torch.tensor([counter, part], dtype=torch.int64)
    return memoryview(torch.cat([head.view(torch.uint8), *parts]).numpy())  # type: ignore[arg-type]


class DealerBox:
    """Dealer side: fields are full values; corrections are collected per receiving party and sent
    at each :meth:`flush` (one message to each compute party; the recipe's end flushes too)."""

    def __init__(self, prg0: PRG, prg1: PRG, send: Callable[[int, int, list[torch.Tensor]], None]) -> None:
        self.prgs = (prg0, prg1)
        self.corrections: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._send, self.part = send, 0

    def flush(self) -> None:
        """Send what the parties need first, then go on computing the rest (party 1 first: it is
        the one that waits for the early fields). A party with no correction in this part gets no
        message (it knows, running the same recipe)."""
        for party in (1, 0):
            if self.corrections[party]:
                self._send(party, self.part, self.corrections[party])
        self.corrections = ([], [])
        self.part += 1

    def rand_arith(self, shape: tuple[int, ...]) -> torch.Tensor:
        value = self.prgs[0].int64(shape)
        value += self.prgs[1].int64(shape)
        return value

    def rand_bin(self, shape: tuple[int, ...], mask: int | None = None,
                 dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return _mask(self.prgs[0].draw(shape, dtype) ^ self.prgs[1].draw(shape, dtype), mask)

    def _derived(self, shape: tuple[int, ...], value: Callable[[], torch.Tensor]) -> torch.Tensor:
        v = value()
        if tuple(v.shape) != tuple(shape):
            raise ValueError(f"recipe bug: derived field has shape {tuple(v.shape)}, declared {shape}")
        return v

    def arith(self, shape: tuple[int, ...], value: Callable[[], torch.Tensor], to: int = 1) -> torch.Tensor:
        v = self._derived(shape, value)
        stream = self.prgs[1 - to].int64(shape)
        self.corrections[to].append(_encode(torch.sub(v, stream, out=stream)))
        return v

    def bin(self, shape: tuple[int, ...], value: Callable[[], torch.Tensor], nbytes: int = 8,
            to: int = 1) -> torch.Tensor:
        v = self._derived(shape, value).to(_WIRE[nbytes])
        self.corrections[to].append(_encode(v ^ self.prgs[1 - to].draw(shape, _WIRE[nbytes])))
        return v


class _Pending:
    """A derived field whose correction from the dealer has not been read yet."""

    __slots__ = ("nbytes", "part", "shape")

    def __init__(self, shape: tuple[int, ...], nbytes: int, part: int) -> None:
        self.shape, self.nbytes, self.part = shape, nbytes, part


class PartyBox:
    """Party side: fields are this party's shares. A derived field is drawn from the stream by one
    party and is :class:`_Pending` at the other (``to``) until the dealer's message is read."""

    def __init__(self, index: int, prg: PRG) -> None:
        self.index, self.prg = index, prg
        self.pending: list[_Pending] = []
        self.part = 0

    def flush(self) -> None:
        self.part += 1

    def rand_arith(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.prg.int64(shape)

    def rand_bin(self, shape: tuple[int, ...], mask: int | None = None,
                 dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return _mask(self.prg.draw(shape, dtype), mask)

    def _later(self, shape: tuple[int, ...], nbytes: int) -> Any:
        p = _Pending(tuple(shape), nbytes, self.part)
        self.pending.append(p)
        return p

    def arith(self, shape: tuple[int, ...], value: Callable[[], torch.Tensor], to: int = 1) -> Any:
        return self._later(shape, 8) if self.index == to else self.prg.int64(shape)

    def bin(self, shape: tuple[int, ...], value: Callable[[], torch.Tensor], nbytes: int = 8,
            to: int = 1) -> Any:
        if self.index == to:
            return self._later(shape, nbytes)
        return self.prg.draw(shape, _WIRE[nbytes])


class Material:
    """What a recipe returned at a party, read like a dict. Derived fields are filled in from the
    dealer's messages (one per part of the recipe) on first access, so the dealer's work overlaps the
    parties' rounds: the first round uses random fields only, and late fields come in later parts."""

    def __init__(self, fields: dict[str, Any], pending: list[_Pending], parts: int,
                 fetch: Callable[[int], memoryview]) -> None:
        self._fields, self._pending, self._fetch = fields, pending, fetch
        self._parts = parts
        self._read = 0  # parts read so far
        self.request = -1
        self._values: dict[int, torch.Tensor] = {}

    def resolve(self, upto: int | None = None) -> None:
        """Read the dealer's messages up to part ``upto`` (all parts when None). Only parts with
        a derived field for this party have a message; earlier requests' messages are read first
        (they arrive in order)."""
        last = self._parts - 1 if upto is None else upto
        while self._read <= last:
            part = self._read
            mine = [q for q in self._pending if q.part == part]
            if mine:
                self._parse(self._fetch(part), mine)
            self._read += 1

    def _parse(self, buf: memoryview, fields: list[_Pending]) -> None:
        off = 0
        for p in fields:
            n = int(np.prod(p.shape)) if p.shape else 1
            if off + n * p.nbytes > len(buf):
                raise PartyError("dealer's message is shorter than the recipe needs (parties out of step?)")
            dtype = _WIRE[p.nbytes]
            if n == 0:
                self._values[id(p)] = torch.zeros(p.shape, dtype=dtype)
            else:
                self._values[id(p)] = torch.frombuffer(buf, dtype=dtype, count=n, offset=off).reshape(p.shape)
            off += n * p.nbytes
        if off != len(buf):
            raise PartyError(f"dealer's message has {len(buf) - off} bytes the recipe did not use "
                             f"(parties out of step?)")

    def _fill(self, obj: Any) -> Any:
        if isinstance(obj, _Pending):
            self.resolve(obj.part)
            return self._values[id(obj)]
        if isinstance(obj, list | tuple):
            return type(obj)(self._fill(v) for v in obj)
        if isinstance(obj, dict):
            return {k: self._fill(v) for k, v in obj.items()}
        return obj

    def __getitem__(self, key: str) -> Any:
        return self._fill(self._fields[key])


class DealerClient:
    """A compute party's end of the dealer: runs recipes on its own stream and the dealer's messages."""

    def __init__(self, transport: Transport, index: int, dealer: str) -> None:
        self.transport, self.index, self.dealer = transport, index, dealer
        self._master = bytes(transport.recv(dealer))
        self.requests = 0
        self._unread: list[Material] = []  # materials with dealer messages still to read, in order

    def _fetcher(self, counter: int) -> Callable[[int], memoryview]:
        def fetch(part: int) -> memoryview:
            for earlier in [m for m in self._unread if m.request < counter]:
                earlier.resolve()  # their messages come first on the channel
            self._unread = [m for m in self._unread if m.request >= counter]
            msg = self.transport.recv(self.dealer)
            got = _REPLY.unpack_from(msg)
            if got != (counter, part):
                raise PartyError(f"dealer answered request {got[0]} part {got[1]}, expected {counter} "
                                 f"part {part} (parties out of step)")
            return memoryview(msg)[_REPLY.size:]

        return fetch

    def take(self, name: str, **params: Any) -> Material:
        """Material of recipe ``name`` for this party (party 0 sends the request to the dealer)."""
        fn = RECIPES[name]
        if self.index == 0:
            self.transport.send(self.dealer, json.dumps({"recipe": name, "params": params}).encode())
        box = PartyBox(self.index, PRG(derive_key(self._master, self.requests)))
        fields = fn(box, **params)
        mat = Material(fields, box.pending, box.part + 1, self._fetcher(self.requests))
        mat.request = self.requests
        if box.pending:
            self._unread.append(mat)
        self.requests += 1
        return mat

    def close(self, *, abandon: bool = False) -> None:
        """Read what the dealer still owes us (the stream stays in step), then tell it we are done.
        ``abandon``: after an error, do not wait for it (the dealer may have failed on that request)."""
        for mat in [] if abandon else list(self._unread):
            mat.resolve()
        if self.index == 0:
            self.transport.send(self.dealer, json.dumps({"recipe": None}).encode())


def _check_params(name: str, params: dict[str, Any]) -> None:
    if name not in RECIPES:
        raise PartyError(f"dealer: refused request for unknown recipe {name!r}; known: {sorted(RECIPES)}")
    for key in ("n", "rows", "cols", "ys"):
        v = params.get(key)
        if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_REQUEST_ELEMENTS):
            raise PartyError(f"dealer: refused {name!r} request with {key}={v!r}")
    for key in ("shape_x", "shape_y", "shape_z"):
        shape = params.get(key)
        if shape is None:
            continue
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d for d in shape):
            raise PartyError(f"dealer: refused {name!r} request with {key}={shape!r}")
        if math.prod(shape) > MAX_REQUEST_ELEMENTS:
            raise PartyError(f"dealer: refused {name!r} request: {key} has {math.prod(shape)} elements "
                             f"(limit {MAX_REQUEST_ELEMENTS})")


Reply = tuple[int, int, list[torch.Tensor]]  # party, part, corrections


def _run(name: str, params: dict[str, Any], counter: int, masters: tuple[bytes, bytes],
         send: Callable[[int, int, list[torch.Tensor]], None]) -> None:
    prgs = [PRG(derive_key(k, counter)) for k in masters]
    box = DealerBox(prgs[0], prgs[1], send)
    RECIPES[name](box, **params)
    box.flush()


def serve(transport: Transport, compute_parties: tuple[str, str]) -> int:
    """Run the dealer until party 0 says it is done; return the number of requests served.

    Speculation: while the parties compute, the dealer prepares (but does not send) the request it
    expects next: the one that followed the current request last time (programs repeat: loops,
    batches, chunks). It does not guess a request it has never seen followed: a program's first pass
    would pay for wrong guesses (the dealer busy on a useless one while the real request waits).
    Streams are keyed per request number, so a wrong guess costs only the dealer's time, and it never
    guesses while a request is already waiting.
    """
    import veil.mpc.material  # noqa: F401 - fills RECIPES

    p0, p1 = compute_parties
    masters = (new_key(), new_key())
    transport.send(p0, masters[0])
    transport.send(p1, masters[1])
    followers: dict[str, str] = {}  # request -> the request that came after it last time
    previous: str | None = None
    ready: tuple[str, list[Reply]] | None = None  # a prepared guess for request number `served`
    served = 0

    def deliver(counter: int) -> Callable[[int, int, list[torch.Tensor]], None]:
        def send(party: int, part: int, parts: list[torch.Tensor]) -> None:
            transport.send((p0, p1)[party], _reply(counter, part, parts))
        return send

    while True:
        # Between requests the dealer is idle for as long as the parties compute: no stall timeout
        # here (a party that dies closes its connection, which ends this wait at once).
        raw = transport.recv(p0, wait=math.inf)
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
        key = json.dumps([name, params], sort_keys=True)
        if ready is not None and ready[0] == key:
            for party, part, parts in ready[1]:
                deliver(served)(party, part, parts)
        else:
            _run(name, params, served, masters, deliver(served))
        if previous is not None:
            followers[previous] = key
        previous, ready = key, None
        served += 1
        guess = followers.get(key)
        if guess is not None and not transport.poll(p0):
            held: list[Reply] = []

            def hold(party: int, part: int, parts: list[torch.Tensor], held: list[Reply] = held) -> None:
                held.append((party, part, parts))

            g_name, g_params = json.loads(guess)
            _run(g_name, g_params, served, masters, hold)
            ready = (guess, held)
