"""The comparisons of the 2-party protocol with a dealer: the sign bit (``msb``) and the zero test
(``eqz``) of arithmetic shares, and products with the resulting bit in the same rounds.

Mixed into :class:`veil.mpc.dealer2pc.DealerProtocol2PC`, whose openings (``open_masked``,
``open_xor``) and session they use; the method table and costs are in that module's docstring, the
circuits on 16-bit planes in :mod:`veil.mpc.circuits`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from veil.mpc import circuits

if TYPE_CHECKING:
    from veil.mpc.session import Session

CHUNK_ELEMENTS = 1 << 20  # comparisons on more elements run in chunks (bounded memory)


class Comparisons2PC:
    """``msb`` and ``eqz`` on this party's shares (see the module docstring)."""

    s: Session
    index: int
    open_masked: Callable[..., list[torch.Tensor]]
    open_xor: Callable[..., list[torch.Tensor]]

    def _tree(self, c: torch.Tensor, tree: dict[str, Any], with_lt: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """XOR shares (int16) of (LT, EQ) at the two top nodes (bits 0 and 8) of the comparison tree."""
        i = self.index
        lt, eq = circuits.leaf(circuits.planes(c), tree["mono"].to(torch.int16), i, want_lt=with_lt)
        products = tree["products"].to(torch.int16)
        for lvl, (s, masks) in enumerate(zip(circuits.LEVEL_SPACINGS, tree["levels"])):
            m = circuits.PAIR_MASKS[s]
            hi_eq, lo_eq = (eq >> s) & m, eq & m
            c1, c2 = circuits.unpack_products(products, lvl)
            if with_lt:
                a, b1, b2 = masks
                hi_lt, lo_lt = (lt >> s) & m, lt & m
                first = (hi_eq ^ a) | ((lo_lt ^ b1) << 1)
                if s == 1:  # pairs at even bits: two operands fit in a word, the third goes apart
                    d_e1, e2 = self.open_xor([first, lo_eq ^ b2])
                else:
                    (d_e1,) = self.open_xor([first | ((lo_eq ^ b2) << 2)])
                    e2 = (d_e1 >> 2) & m
                d, e1 = d_e1 & m, (d_e1 >> 1) & m
                z1 = c1 ^ (d & b1) ^ (e1 & a)
                z2 = c2 ^ (d & b2) ^ (e2 & a)
                if i == 0:
                    z1, z2 = z1 ^ (d & e1), z2 ^ (d & e2)
                lt, eq = hi_lt ^ z1, z2
            else:
                a, b1 = masks
                (opened,) = self.open_xor([(hi_eq ^ a) | ((lo_eq ^ b1) << 1)])
                d, e1 = opened & m, (opened >> 1) & m
                z = c1 ^ (d & b1) ^ (e1 & a)
                if i == 0:
                    z = z ^ (d & e1)
                eq = lt = z
        return lt, eq

    def _finish(self, index_share: torch.Tensor, mat: Any, es: Sequence[torch.Tensor],
                low_bit: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Open the masked final bits and read the dealer's 4-entry truth table at the opened index.

        Returns the opened low bit (msb only; zeros for eqz), the shares of the table entry ``h``
        and of ``y * h`` for each multiplicand ``y`` (from ``e = y - a`` and the dealer's ``a * T``).
        """
        masked = (index_share.to(torch.int64) ^ mat["m"]).to(torch.uint8)
        (j,) = self.open_xor([masked])
        j = j.to(torch.int64)
        low = j & 1 if low_bit else torch.zeros_like(j)
        k = (j >> 1 if low_bit else j).unsqueeze(1)
        h = mat["t"].gather(1, k).squeeze(1)
        prods = [e * h + at.gather(1, k).squeeze(1) for (_a, at), e in zip(mat["masks"], es)]
        return low, h, prods

    def _take(self, name: str, x: torch.Tensor, ys: Sequence[torch.Tensor]) -> Any:
        return _OnDevice(self.s.dealer.take(name, n=x.numel(), ys=len(ys)), x.device)

    def msb(self, x: torch.Tensor, ys: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self._chunked(self._msb, x, ys)

    def eqz(self, x: torch.Tensor, ys: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self._chunked(self._eqz, x, ys)

    def _chunked(self, fn: Any, x: torch.Tensor, ys: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run a comparison on the flattened secret, in equal chunks of at most ``CHUNK_ELEMENTS``
        (each chunk its own 5 rounds): memory stays bounded for the millions of comparisons of a large
        batch, and inputs up to a chunk's size cost no extra round."""
        shape = x.shape
        flat, yflat = x.reshape(-1), [y.reshape(-1) for y in ys]
        for y in yflat:
            if y.numel() != flat.numel():
                raise ValueError(f"comparison: multiplicand has {y.numel()} elements, the secret {flat.numel()}")
        n = flat.numel()
        if n <= CHUNK_ELEMENTS:
            bit, out = fn(flat, yflat)
        else:
            size = -(-n // -(-n // CHUNK_ELEMENTS))  # equal chunks: the dealer's guesses stay right
            parts = [fn(flat[i:i + size], [y[i:i + size] for y in yflat]) for i in range(0, n, size)]
            bit = torch.cat([b for b, _ in parts])
            out = [torch.cat([o[k] for _, o in parts]) for k in range(len(yflat))]
        return bit.reshape(shape), [o.reshape(shape) for o in out]

    def _msb(self, flat: torch.Tensor, yflat: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        mat = self._take("msb", flat, yflat)
        opened = self.open_masked([(flat, mat["r"], 1)] + [(y, a, -1) for y, (a, _) in zip(yflat, mat["masks"])])
        c, es = opened[0], opened[1:]
        lt, eq = self._tree(c & circuits.MASK63, mat["tree"], with_lt=True)
        index = ((lt >> 8) & 1) | (((eq >> 8) & 1) << 1) | ((lt & 1) << 2)
        q_hat, h, prods = self._finish(index, mat, es, low_bit=True)
        # msb = c63 ^ q_hat ^ h (the dealer folded r's top bit into the table): p + (1 - 2p) h
        p = ((c >> 63) & 1) ^ q_hat
        sigma = 1 - 2 * p
        bit = sigma * h + (p if self.index == 0 else 0)
        return bit, [p * y + sigma * yh for y, yh in zip(yflat, prods)]

    def _eqz(self, flat: torch.Tensor, yflat: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        mat = self._take("eqz", flat, yflat)
        opened = self.open_masked([(flat, mat["r"], 1)] + [(y, a, -1) for y, (a, _) in zip(yflat, mat["masks"])])
        c, es = opened[0], opened[1:]
        _, eq = self._tree(c, mat["tree"], with_lt=False)
        index = ((eq >> 8) & 1) | ((eq & 1) << 1)
        _, h, prods = self._finish(index, mat, es, low_bit=False)
        return h, prods


class _OnDevice:
    """Material fields moved to the computation's device on access."""

    def __init__(self, mat: Any, device: torch.device) -> None:
        self.mat, self.device = mat, device

    def __getitem__(self, key: str) -> Any:
        v = self.mat[key]
        return v if self.device.type == "cpu" else _to_device(v, self.device)


def _to_device(obj: Any, dev: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        return {k: _to_device(v, dev) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, dev) for v in obj)
    return obj
