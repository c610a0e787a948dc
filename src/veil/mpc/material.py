"""Every kind of correlated randomness the dealer hands out (the registry of recipes).

Each recipe runs on the dealer (full values) and on both compute parties (their shares), see
:mod:`veil.mpc.dealer`. Shapes and counts are the only parameters; all are public.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from veil.mpc import circuits
from veil.mpc.dealer import recipe

Shape = tuple[int, ...]

BILINEAR_OPS = {
    "mul": lambda a, b, **kw: a * b,
    "matmul": lambda a, b, **kw: a @ b,
    "conv1d": lambda a, b, **kw: F.conv1d(a, b, **kw),
    "conv2d": lambda a, b, **kw: F.conv2d(a, b, **kw),
    "conv_transpose2d": lambda a, b, **kw: F.conv_transpose2d(a, b, **kw),
}


@recipe("triple")
def triple(box: Any, op: str, shape_x: list[int], shape_y: list[int], shape_z: list[int],
           kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Beaver triple ``(a, b, c = op(a, b))`` for a bilinear ``op`` (mul, matmul, convolutions)."""
    fn = BILINEAR_OPS[op]
    kw = kwargs or {}
    a = box.rand_arith(tuple(shape_x))
    b = box.rand_arith(tuple(shape_y))
    c = box.arith(tuple(shape_z), lambda: fn(a, b, **kw))
    return a, b, c


@recipe("square")
def square(box: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair ``(a, a^2)`` for squaring a secret in one opening of 8 bytes per element."""
    a = box.rand_arith((n,))
    return a, box.arith((n,), lambda: a * a)


def _tree_triples(box: Any, n: int, with_lt: bool) -> list[tuple[torch.Tensor, ...]]:
    out = []
    for s in circuits.LEVEL_SPACINGS:
        m = circuits.PAIR_MASKS[s]
        a = box.rand_bin((n,), m)
        b1 = box.rand_bin((n,), m)
        if with_lt:
            b2 = box.rand_bin((n,), m)
            c = box.bin((n,), lambda a=a, b1=b1, b2=b2: (a & b1) | ((a & b2) << 1))
            out.append((a, b1, b2, c))
        else:
            out.append((a, b1, box.bin((n,), lambda a=a, b1=b1: a & b1)))
    return out


def _table(box: Any, n: int, bits: int, fn: Any, ys: int) -> tuple[Any, ...]:
    """Random mask ``m`` of ``bits`` XOR-shared bits, the shifted truth table ``T[j] = fn(j ^ m)``
    as arithmetic shares, and for each of ``ys`` multiplicands a mask ``a`` and ``a * T``."""
    m = box.rand_bin((n,), (1 << bits) - 1)
    size = 1 << bits

    def table() -> torch.Tensor:
        j = torch.arange(size, dtype=torch.int64)
        return fn(j[None, :] ^ m[:, None])

    t = box.arith((n, size), table)
    masks = []
    for _ in range(ys):
        a = box.rand_arith((n,))
        masks.append((a, box.arith((n, size), lambda a=a: a[:, None] * t)))
    return m, t, masks


def _msb_fn(j: torch.Tensor) -> torch.Tensor:
    # bits of j: q (borrow-in xor r63), v (EQ of the high half), w (LT of the low half)
    return (j & 1) ^ ((j >> 1) & (j >> 2) & 1)


def _eq_fn(j: torch.Tensor) -> torch.Tensor:
    return j & (j >> 1) & 1


@recipe("msb")
def msb(box: Any, n: int, ys: int = 0) -> dict[str, Any]:
    """Material for the most significant bit of ``n`` secrets, and its products with ``ys`` secrets.

    Mask ``r`` (arithmetic and XOR shares of its 64 bits), the packed degree >= 2 monomials of each
    4-bit group of ``r mod 2^63``, AND triples for three tree levels, and the final truth table.
    """
    r = box.rand_arith((n,))
    r_bin = box.bin((n,), lambda: r)
    mono = box.bin((circuits.MONOMIAL_WORDS, n), lambda: circuits.monomial_words(r & circuits.MASK63))
    tri = _tree_triples(box, n, with_lt=True)
    m, t, masks = _table(box, n, 3, _msb_fn, ys)
    return {"r": r, "r_bin": r_bin, "mono": mono, "triples": tri, "m": m, "t": t, "masks": masks}


@recipe("eqz")
def eqz(box: Any, n: int, ys: int = 0) -> dict[str, Any]:
    """Material for testing ``n`` secrets against zero (all 64 bits), and products with ``ys``."""
    r = box.rand_arith((n,))
    r_bin = box.bin((n,), lambda: r)
    mono = box.bin((circuits.MONOMIAL_WORDS, n), lambda: circuits.monomial_words(r))
    tri = _tree_triples(box, n, with_lt=False)
    m, t, masks = _table(box, n, 2, _eq_fn, ys)
    return {"r": r, "r_bin": r_bin, "mono": mono, "triples": tri, "m": m, "t": t, "masks": masks}
