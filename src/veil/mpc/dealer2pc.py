"""Two compute parties with additive shares in Z_2^64, and a dealer for correlated randomness.

Security: semi-honest (honest-but-curious) parties, the dealer not colluding with either compute
party. Each compute party's view is its shares (uniform), values masked by uniform dealer masks, and
dealer material (uniform or derived from uniform masks it never sees in clear): it learns nothing
beyond what is revealed to it. Channels are authenticated and encrypted by the transport (TLS).

Primitives and their cost at each compute party (``n`` elements):

=========== ========================================================= ======= ==============
primitive   how                                                       rounds  bytes sent
=========== ========================================================= ======= ==============
share       owner's share ``x - r``, the other's ``r`` from a PRG the    0      a shape header
            two compute parties share (pseudo-random secret sharing)
reveal      the other party sends its share to each receiver            1       8n
mul/matmul  Beaver triple from the dealer, open ``x - a`` and ``y - b``  1       8(|x|+|y|)
products    several products of shared factors: each value opened once   1       8 n per value
            under its own mask, the dealer's ``a_i a_j`` per pair
truncate    local (SecureML): party 0 shifts its share, party 1          0       0
            negates, shifts and negates back
msb         open ``c = x + r``; compare ``c mod 2^63`` with ``r mod      5       17n (+8n per
            2^63`` on XOR shares in 16-bit planes (leaf groups of 4     product ``y * msb``)
            bits evaluated locally from dealer monomials, 3 AND
            levels), last level and conversion to arithmetic in one
            opening of a masked 3-bit index into a dealer truth table
eqz         same tree on all 64 bits, EQ only                           5       15n
=========== ========================================================= ======= ==============

The comparisons (msb, eqz) live in :mod:`veil.mpc.compare2pc`, mixed into the protocol class.

Truncation error: party 0 computes ``floor(x0 / 2^f)``, party 1 ``-floor(-x1 / 2^f)``. When
the shares do not wrap around 2^64 the result is ``x / 2^f`` within one unit in the last place; for a
secret ``x`` (ring units, before truncation) they wrap with probability ``|x| / 2^64``, and then the
result is off by about ``2^(64 - f)``. A product of two values of magnitude 1 at 16 fractional bits
(``|x| = 2^32``) fails with probability 2^-32, of magnitude 2^4 with 2^-24 per element: applications
keep values small (normalised inputs) and the approximations keep intermediates near 1 (approx.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from veil.mpc.compare2pc import Comparisons2PC
from veil.mpc.protocol import Protocol
from veil.net.transport import PartyError

if TYPE_CHECKING:
    from veil.mpc.session import Session

_NP = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.int64}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _to_bytes(t: torch.Tensor, nbytes: int) -> bytes:
    arr = t.detach().cpu().contiguous().numpy()
    return arr.astype(_NP[nbytes], copy=False).tobytes()


class DealerProtocol2PC(Comparisons2PC, Protocol):
    name = "2pc"

    def __init__(self, session: Session) -> None:
        self.s = session
        self.index = session.index
        self.peer = session.peer

    # ---- communication -------------------------------------------------------------------
    def _swap(self, buf: torch.Tensor) -> bytearray:
        """One round: send the flat tensor ``buf`` to the peer, receive the peer's message of the
        same size."""
        t = self.s.transport
        t.send(self.peer, memoryview(buf.cpu().view(torch.uint8).numpy()))  # type: ignore[arg-type]
        raw = t.recv(self.peer)
        self.s.stats.rounds += 1
        expected = buf.numel() * buf.element_size()
        if len(raw) != expected:
            raise PartyError(f"{self.s.party}: expected {expected} bytes from {self.peer!r}, got {len(raw)} "
                             f"(parties out of step)")
        return raw

    def exchange(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One round: send ``parts`` (int64, int16 or uint8 tensors) to the peer, return the peer's
        tensors of the same shapes and dtypes. One copy into one buffer, one message."""
        raw = self._swap(torch.cat([p.detach().reshape(-1).cpu().view(torch.uint8) for p in parts]))
        out, off = [], 0
        for p in parts:
            n = p.numel()
            arr = torch.zeros(0, dtype=p.dtype) if n == 0 else torch.frombuffer(raw, dtype=p.dtype, count=n,
                                                                               offset=off)
            off += n * p.element_size()
            out.append(arr.reshape(p.shape).to(p.device))
        return out

    def open(self, shares: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Reveal arithmetic shares to both compute parties (one round)."""
        theirs = self.exchange(shares)
        return [b.add_(a) for a, b in zip(shares, theirs)]  # the peer's tensors are ours to reuse

    def open_masked(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> list[torch.Tensor]:
        """Open ``x + sign * m`` for each ``(x, m, sign)`` (one round), computed straight into the
        send buffer: Beaver's ``x - a`` and the comparisons' ``x + r`` without a temporary."""
        flats = [(x.reshape(-1), m.reshape(-1), sign) for x, m, sign in pairs]
        dev = pairs[0][0].device if pairs else torch.device("cpu")
        buf = torch.empty(sum(x.numel() for x, _, _ in flats), dtype=torch.int64, device=dev)
        off = 0
        for x, m, sign in flats:
            out = buf[off:off + x.numel()]
            torch.add(x, m, alpha=sign, out=out)
            off += x.numel()
        raw = self._swap(buf)
        theirs = torch.frombuffer(raw, dtype=torch.int64) if buf.numel() else torch.zeros(0, dtype=torch.int64)
        theirs = theirs.to(dev)
        theirs += buf
        out_list, off = [], 0
        for (x, _, _), (orig, _, _) in zip(flats, pairs):
            out_list.append(theirs[off:off + x.numel()].reshape(orig.shape))
            off += x.numel()
        return out_list

    def open_xor(self, shares: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Reveal XOR shares to both compute parties (one round), in their own dtypes."""
        theirs = self.exchange(shares)
        return [a ^ b for a, b in zip(shares, theirs)]

    # ---- sharing ---------------------------------------------------------------------------
    def share(self, value: torch.Tensor | None, owner: str, shape: Sequence[int] | None,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.dtype]:
        s = self.s
        if owner not in s.parties:
            raise ValueError(f"owner {owner!r} is not a compute party of this session {list(s.parties)}")
        if s.party == owner:
            if value is None:
                raise ValueError(f"{s.party} owns this secret but passed no value")
            if shape is not None and tuple(shape) != tuple(value.shape):
                raise ValueError(f"{s.party}: value has shape {tuple(value.shape)}, but shape={tuple(shape)}")
            header = {"share_shape": list(value.shape), "dtype": _DTYPE_NAMES[dtype]}
            s.transport.send(self.peer, json.dumps(header).encode())
            mask = s.pair_prg.int64(value.shape).to(value.device)
            return value - mask, dtype
        raw = s.transport.recv(owner)
        try:
            header = json.loads(bytes(raw))
            got = tuple(int(d) for d in header["share_shape"])
            their_dtype = _DTYPES[header["dtype"]]
        except (ValueError, KeyError, TypeError):
            raise PartyError(f"{s.party}: malformed share header from {owner!r}") from None
        if shape is not None and tuple(shape) != got:
            raise ValueError(f"{s.party}: expected a secret of shape {tuple(shape)} from {owner!r}, "
                             f"but {owner!r} shares shape {got}")
        return s.pair_prg.int64(got).to(s.device), their_dtype

    def reveal(self, share: torch.Tensor, to: Sequence[str]) -> torch.Tensor | None:
        s = self.s
        unknown = [p for p in to if p not in s.parties]
        if unknown or not to:
            raise ValueError(f"reveal(to=...) must name compute parties {list(s.parties)}, got {list(to)}")
        if self.peer in to:
            s.transport.send(self.peer, _to_bytes(share, 8))
        result = None
        if s.party in to:
            raw = s.transport.recv(self.peer)
            if len(raw) != share.numel() * 8:
                raise PartyError(f"{s.party}: reveal expected {share.numel() * 8} bytes from {self.peer!r}")
            other = torch.from_numpy(np.frombuffer(raw, dtype=np.int64).copy()).reshape(share.shape)
            result = share + other.to(share.device)
        s.stats.rounds += 1
        return result

    # ---- arithmetic ------------------------------------------------------------------------
    def add_public(self, share: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return share + value if self.index == 0 else share + torch.zeros_like(value)

    def bilinear(self, x: torch.Tensor, y: torch.Tensor, op: str, kwargs: dict[str, Any]) -> torch.Tensor:
        return self.bilinear_many([(x, y, op, kwargs)])[0]

    def bilinear_many(self, items: Sequence[tuple[torch.Tensor, torch.Tensor, str, dict[str, Any]]]
                      ) -> list[torch.Tensor]:
        """Several independent Beaver products in one round: one triple each, all openings in one
        message."""
        from veil.mpc.material import BILINEAR_OPS, output_shape

        mats, pairs = [], []
        for x, y, op, kwargs in items:
            shape_z = list(output_shape(op, tuple(x.shape), tuple(y.shape), kwargs))
            mat = self.s.dealer.take("triple", op=op, shape_x=list(x.shape), shape_y=list(y.shape),
                                     shape_z=shape_z, kwargs=kwargs)
            a, b = mat["a"].to(x.device), mat["b"].to(x.device)
            mats.append((mat, a, b))
            pairs += [(x, a, -1), (y, b, -1)]
        opened = self.open_masked(pairs)
        out = []
        for i, ((x, y, op, kwargs), (mat, a, _b)) in enumerate(zip(items, mats)):
            e, f = opened[2 * i], opened[2 * i + 1]
            # op(x, y) = op(e, f) + op(e, b) + op(a, f) + c = op(e, y) + op(a, f) + c, and op(e, y) is
            # linear in y's shares: share i is c_i + op(e, y_i) + op(a_i, f), the same at both parties.
            z = mat["c"].to(x.device)  # ours to overwrite: a fresh stream draw or the dealer's message
            if op == "mul":
                z.addcmul_(e, y).addcmul_(a, f)  # two passes, no temporaries (z has the broadcast shape)
            else:
                fn = BILINEAR_OPS[op]
                z += fn(e, y, **kwargs)
                z += fn(a, f, **kwargs)
            out.append(z)
        return out

    def products(self, values: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Products of secrets that share factors (powers, Goldschmidt steps) in one round, each
        value opened once under its own mask:

        1. The dealer gives shares of a uniform mask ``a_i`` per value and of ``c_ij = a_i a_j`` per
           pair.
        2. Open ``E_i = v_i - a_i`` for every value (uniform: nothing about ``v_i``).
        3. ``v_i v_j = E_i v_j + E_j a_i + c_ij``, linear in the shares of ``v_j``, ``a_i`` and
           ``c_ij``: share p is ``c_ij^p + E_i v_j^p + E_j a_i^p``.

        8 bytes per element and value each way, against 16 per pair for independent Beaver triples."""
        if not values:
            return []
        shape = values[0].shape
        if any(v.shape != shape for v in values):
            raise ValueError(f"products: values must have one shape, got {[tuple(v.shape) for v in values]}")
        flat = [v.reshape(-1) for v in values]
        mat = self.s.dealer.take("mask_products", n=flat[0].numel(), values=len(flat),
                                 pairs=[[int(i), int(j)] for i, j in pairs])
        dev = flat[0].device
        masks = [m.to(dev) for m in mat["masks"]]
        opened = self.open_masked([(v, a, -1) for v, a in zip(flat, masks)])
        out = []
        for (i, j), c in zip(pairs, mat["products"]):
            z = c.to(dev)  # ours to overwrite: a fresh stream draw or the dealer's message
            z.addcmul_(opened[i], flat[j]).addcmul_(opened[j], masks[i])
            out.append(z.reshape(shape))
        return out

    def square(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        mat = self.s.dealer.take("square", n=flat.numel())
        a = mat["a"].to(x.device)
        (e,) = self.open_masked([(flat, a, -1)])
        # x^2 = (e + a)^2 = a^2 + e (e + 2a) = a^2 + e (x + a): share i is a2_i + e (x_i + a_i)
        z = mat["a2"].to(x.device)
        z.addcmul_(e, torch.add(flat, a))
        return z.reshape(x.shape)

    def truncate(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == 0:
            return x
        if self.index == 0:
            return x >> bits
        out = torch.neg(x)  # -floor(-x / 2^bits), one temporary
        return out.bitwise_right_shift_(bits).neg_()

    def truncate_exact(self, xs: Sequence[torch.Tensor], bits: int) -> list[torch.Tensor]:
        """Shares of ``floor(x / 2^bits)`` (or one less) for secrets ``|x| < 2^62``: never the large
        error of local truncation, at the cost of one round (all ``xs`` together).

        1. The dealer gives shares of a uniform ``r``, of ``r >> bits`` and of ``r``'s top bit ``t``.
        2. Open ``c = x + 2^62 + r`` (uniform: it tells nothing about ``x``).
        3. With ``x' = x + 2^62`` in ``[0, 2^63)``, the sum ``x' + r`` wrapped past ``2^64`` exactly when
           ``t = 1`` and ``c``'s top bit is 0: ``w = t (1 - c_63)``, linear in ``t``'s shares.
        4. ``floor(x' / 2^b) = (c >> b) + w 2^(64-b) - (r >> b) - carry``, carry in {0, 1}; subtract
           ``2^(62-b)``.
        """
        flats = [x.reshape(-1) for x in xs]
        n = sum(f.numel() for f in flats)
        if n == 0:
            return [x.clone() for x in xs]
        flat = torch.cat(flats) if len(flats) > 1 else flats[0]
        mat = self.s.dealer.take("trunc", n=n, bits=bits)
        r, hi, top = (mat[k].to(flat.device) for k in ("r", "hi", "top"))
        shifted = flat + (1 << 62) if self.index == 0 else flat
        (c,) = self.open_masked([(shifted, r, 1)])
        c_top = (c >> 63) & 1
        w = top * (1 - c_top)
        out = w * (1 << (64 - bits)) - hi
        if self.index == 0:
            out += ((c >> bits) & ((1 << (64 - bits)) - 1)) - (1 << (62 - bits))
        parts, off = [], 0
        for x, f in zip(xs, flats):
            parts.append(out[off:off + f.numel()].reshape(x.shape))
            off += f.numel()
        return parts
