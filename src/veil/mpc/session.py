"""A session: one party's handle on a run of a secure computation.

The session owns the transport, the party names, the dealer client, the random generators and the
fixed-point options. Nothing is global: two sessions in one process do not interfere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from veil.mpc.dealer import DealerClient
from veil.mpc.prg import PRG, new_key
from veil.net.transport import PartyError, TrafficStats, Transport
from veil.ring import FixedPoint

if TYPE_CHECKING:
    from veil.mpc.protocol import Protocol
    from veil.mpc.tensor import SecretTensor

PROTOCOLS = ("2pc",)


@dataclass(frozen=True)
class SessionOptions:
    """Options of a session. Change with ``options.replace(...)`` / ``session.replace(...)``."""

    fixed_point: FixedPoint = field(default_factory=FixedPoint)
    device: str = "cpu"
    # "local": every product is truncated locally (SecureML: no communication; a large error with
    # probability ~|x| 2^-32 per element). "exact": the outputs of matmul and convolutions of two
    # secrets, and the squarings inside exp (softmax, sigmoid), where values reach 2^38, are truncated
    # with one more round and never take the large error (long trainings).
    truncation: str = "local"

    def __post_init__(self) -> None:
        if self.truncation not in ("local", "exact"):
            raise ValueError(f"truncation must be 'local' or 'exact', got {self.truncation!r}")

    def replace(self, **changes: Any) -> SessionOptions:
        if "precision" in changes:
            changes["fixed_point"] = FixedPoint(changes.pop("precision"))
        return replace(self, **changes)


class Session:
    """One compute party's view of a 2-party + dealer computation.

    Create it inside a party process (the launcher does: see :func:`veil.launch`) from a transport
    connected to the other compute party and the dealer.
    """

    def __init__(self, transport: Transport, *, parties: Sequence[str] = ("alice", "bob"),
                 dealer: str = "dealer", protocol: str = "2pc", options: SessionOptions | None = None,
                 _shared: Session | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; available: {list(PROTOCOLS)}")
        self.transport = transport
        self.party = transport.party
        self.parties = tuple(parties)
        if len(self.parties) != 2 or self.party not in self.parties:
            raise ValueError(f"the 2pc protocol needs exactly two compute parties including {self.party!r}, "
                             f"got {list(self.parties)}")
        self.index = self.parties.index(self.party)
        self.peer = self.parties[1 - self.index]
        self.dealer_name = dealer
        self.options = options or SessionOptions()
        self.dealer: DealerClient
        self.pair_prg: PRG
        self.protocol: Protocol
        if _shared is not None:  # a view with other options over the same connections
            self.dealer, self.pair_prg, self.protocol = _shared.dealer, _shared.pair_prg, _shared.protocol
            return
        self.dealer = DealerClient(transport, self.index, dealer)
        # Key of the pseudo-random secret sharing between the two compute parties.
        if self.index == 0:
            key = new_key()
            transport.send(self.peer, key)
        else:
            key = bytes(transport.recv(self.peer))
        self.pair_prg = PRG(key)
        from veil.mpc.dealer2pc import DealerProtocol2PC

        self.protocol = DealerProtocol2PC(self)

    # ---- options -------------------------------------------------------------------------
    @property
    def fixed_point(self) -> FixedPoint:
        return self.options.fixed_point

    @property
    def device(self) -> torch.device:
        return torch.device(self.options.device)

    def replace(self, **changes: Any) -> Session:
        """A session over the same connections with other options (e.g. ``precision=20``)."""
        return Session(self.transport, parties=self.parties, dealer=self.dealer_name,
                       options=self.options.replace(**changes), _shared=self)

    # ---- secrets ---------------------------------------------------------------------------
    def share(self, value: torch.Tensor | Any | None, *, owner: str,
              shape: Sequence[int] | None = None) -> SecretTensor:
        """Secret-share ``value`` held by ``owner``. Other parties pass ``None`` (and may pass
        ``shape`` to check what they expect)."""
        from veil.mpc.tensor import SecretTensor

        ring = None
        dtype = torch.float32
        if self.party == owner and value is not None:
            t = torch.as_tensor(value)
            dtype = t.dtype if t.dtype.is_floating_point else torch.float32
            ring = self.fixed_point.encode(t, what=f"the secret of {owner!r}").to(self.device)
        share, dtype = self.protocol.share(ring, owner, shape, dtype)
        return SecretTensor(share, self, dtype=dtype, owner=owner)

    # ---- traffic ---------------------------------------------------------------------------
    @property
    def stats(self) -> TrafficStats:
        return self.transport.stats

    def traffic(self) -> dict[str, Any]:
        """Bytes and rounds so far: with the other compute party, with the dealer, and in total."""
        st = self.transport.stats
        return {"party": self.party, "rounds": st.rounds,
                "bytes_with_peer": st.total([self.peer]),
                "bytes_with_dealer": st.total([self.dealer_name]),
                "bytes_sent": sum(st.bytes_sent.values()), "bytes_received": sum(st.bytes_received.values())}

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, Any]]:
        """``with session.measure() as m: ...`` then ``m`` holds the traffic of the block."""
        before = self.transport.stats.copy()
        out: dict[str, Any] = {}
        yield out
        d = self.transport.stats - before
        out.update(rounds=d.rounds, bytes_with_peer=d.total([self.peer]),
                   bytes_with_dealer=d.total([self.dealer_name]))

    def close(self, *, abandon: bool = False) -> None:
        """Tell the dealer this party is done (party 0) and release nothing else; ``abandon`` (after an
        error) skips waiting for dealer material still in flight."""
        with contextlib.suppress(PartyError):
            self.dealer.close(abandon=abandon)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Session(party={self.party!r}, parties={list(self.parties)}, dealer={self.dealer_name!r}, "
                f"frac_bits={self.fixed_point.frac_bits})")
