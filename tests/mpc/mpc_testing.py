"""Helpers of the engine's tests: plaintext oracles, public test inputs, and ways to run parties.

Inputs are *public test data*: both parties get the same tensors as arguments and the owner shares
its copy. Every random input comes from a per-call ``torch.Generator`` (never the global RNG: with the
in-process transport all parties are threads of one process and would share it).

References are computed in float64 on the *quantized* inputs (what the owner actually encodes:
``round(x * 2^16) / 2^16``), so bounds below count only the protocol's own error.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import veil
from veil.mpc.dealer import serve
from veil.mpc.session import Session
from veil.net.local import LocalHub
from veil.net.transport import HEADER, PartyError, TrafficStats

FRAC_BITS = 16
ULP = 2.0**-FRAC_BITS  # one unit in the last place of the default fixed point
PARTIES = ("alice", "bob")
LAUNCH_TIMEOUT_S = 30.0


def quantize(x: torch.Tensor | float, frac_bits: int = FRAC_BITS) -> torch.Tensor:
    """What the fixed-point encoding keeps of ``x`` (float64)."""
    scale = float(1 << frac_bits)
    return torch.round(torch.as_tensor(x, dtype=torch.float64) * scale) / scale


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Quantized normal test data (float64)."""
    return quantize(torch.randn(shape, generator=generator(seed), dtype=torch.float64) * scale)


def uniform(seed: int, *shape: int, lo: float, hi: float) -> torch.Tensor:
    """Quantized uniform test data on [lo, hi] (float64)."""
    u = torch.rand(shape, generator=generator(seed), dtype=torch.float64)
    return quantize(lo + (hi - lo) * u)


def run_local(program: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``veil.launch`` over the in-process transport."""
    kwargs.setdefault("timeout", LAUNCH_TIMEOUT_S)
    return veil.launch(program, *args, transport="local", **kwargs)


# ---- secure evaluation against an oracle ---------------------------------------------------------
def _reveal_all(obj: Any) -> Any:
    if isinstance(obj, veil.SecretTensor):
        # Read every result at float64 in both parties, whatever dtype each party's tensor carries
        # (tests/mpc/test_session.py checks the dtypes themselves).
        as64 = veil.SecretTensor(obj.share, obj.session, dtype=torch.float64)
        return as64.reveal(to=list(PARTIES))
    if isinstance(obj, dict):
        return {k: _reveal_all(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_reveal_all(v) for v in obj)
    return obj


def _share_inputs(session: veil.Session, inputs: Sequence[torch.Tensor]) -> list[veil.SecretTensor]:
    """Input ``i`` is owned by alice for even ``i`` and by bob for odd ``i``; the other party checks
    the shape it expects."""
    out = []
    for i, x in enumerate(inputs):
        owner = PARTIES[i % 2]
        mine = x if session.party == owner else None
        out.append(session.share(mine, owner=owner, shape=tuple(x.shape)))
    return out


def _eval_program(session: veil.Session, fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> Any:
    return _reveal_all(fn(*_share_inputs(session, inputs)))


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), "alice and bob revealed different values"
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    else:
        assert a == b


def secure_eval(fn: Callable[..., Any], *inputs: torch.Tensor, **launch_kwargs: Any) -> Any:
    """Share ``inputs`` (alternating owners), run ``fn(*secrets)`` in both parties, reveal every
    SecretTensor of its result (nested dicts/lists/tuples) to both at float64; check both parties
    opened the same values and return them."""
    out = run_local(_eval_program, fn, list(inputs), **launch_kwargs)
    _assert_same(out["alice"], out["bob"])
    return out["alice"]


def max_abs_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    return float((got.double() - want.double()).abs().max()) if want.numel() else 0.0


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str = "") -> None:
    """``|got - want| <= atol`` elementwise, with the measured error in the message."""
    err = max_abs_err(got, want)
    assert err <= atol, f"{what}: max abs error {err:.3e} > {atol:.3e}"


# ---- running parties by hand, with every frame recorded -----------------------------------------
@dataclass
class Frame:
    sender: str
    receiver: str
    data: bytes

    @property
    def payload(self) -> bytes:
        return self.data[HEADER.size:]


class RecordingQueue(queue.Queue):  # type: ignore[type-arg]
    """A mailbox that logs every frame put into it (close markers, ``None``, are not frames)."""

    def __init__(self, sender: str, receiver: str, log: list[Frame]) -> None:
        super().__init__()
        self.sender, self.receiver, self.log = sender, receiver, log

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is not None:
            self.log.append(Frame(self.sender, self.receiver, bytes(item)))
        super().put(item, block, timeout)


class RecordingHub(LocalHub):
    """A LocalHub whose mailboxes record every frame, in order."""

    def __init__(self, parties: Sequence[str], session_id: bytes | None = None) -> None:
        super().__init__(parties, session_id)
        self.frames: list[Frame] = []
        for a, b in list(self.queues):
            self.queues[(a, b)] = RecordingQueue(a, b, self.frames)

    def between(self, sender: str, receiver: str) -> list[Frame]:
        return [f for f in self.frames if f.sender == sender and f.receiver == receiver]


@dataclass
class Run:
    hub: LocalHub
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    stats: dict[str, TrafficStats] = field(default_factory=dict)  # each party's, after it closed


def run_parties(program: Callable[..., Any], *args: Any, hub: LocalHub | None = None,
                timeout: float = LAUNCH_TIMEOUT_S) -> Run:
    """Run alice and bob (``program(session, *args)``) and the dealer (``serve``) as threads over
    ``hub`` (a :class:`RecordingHub` by default). Errors are collected per party, not raised."""
    hub = hub if hub is not None else RecordingHub([*PARTIES, "dealer"])
    run = Run(hub)

    def body(name: str) -> None:
        t = hub.transport(name, timeout)
        try:
            if name == "dealer":
                run.results[name] = serve(t, PARTIES)
            else:
                session = Session(t, parties=PARTIES)
                try:
                    run.results[name] = program(session, *args)
                finally:
                    session.close()
        except BaseException as e:  # collected for the test to inspect
            run.errors[name] = e
        finally:
            t.close()
            run.stats[name] = t.stats

    threads = [threading.Thread(target=body, args=(n,), daemon=True) for n in (*PARTIES, "dealer")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout + 10)
        assert not th.is_alive(), f"party thread {th.name} hung"
    return run


__all__ = ["FRAC_BITS", "PARTIES", "ULP", "Frame", "PartyError", "RecordingHub", "Run", "assert_close",
           "encodings", "free_ports", "generator", "leaks", "max_abs_err", "quantize", "randn", "run_local",
           "run_parties", "secure_eval", "uniform"]


# ---- secrets on the wire -------------------------------------------------------------------------
def encodings(*tensors: torch.Tensor) -> set[bytes]:
    fp = veil.FixedPoint()
    return {struct.pack("<q", int(v)) for t in tensors for v in fp.encode(t).flatten().tolist()}


def leaks(frames: list[Frame], secrets: set[bytes]) -> list[tuple[str, str, int]]:
    """(sender, receiver, offset) of every 8-byte window of a frame that equals a secret encoding."""
    found = []
    for f in frames:
        data = f.data
        for off in range(len(data) - 7):
            if data[off:off + 8] in secrets:
                found.append((f.sender, f.receiver, off))
    return found


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports free on 127.0.0.1 right now (for peers files of multi-process tests)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
