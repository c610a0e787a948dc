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
           kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Beaver triple ``(a, b, c = op(a, b))`` for a bilinear ``op`` (mul, matmul, convolutions)."""
    fn = BILINEAR_OPS[op]
    kw = kwargs or {}
    a = box.rand_arith(tuple(shape_x))
    b = box.rand_arith(tuple(shape_y))
    c = box.arith(tuple(shape_z), lambda: fn(a, b, **kw))
    return {"a": a, "b": b, "c": c}


@recipe("square")
def square(box: Any, n: int) -> dict[str, Any]:
    """Pair ``(a, a^2)`` for squaring a secret in one opening of 8 bytes per element."""
    a = box.rand_arith((n,))
    return {"a": a, "a2": box.arith((n,), lambda: a * a)}


def _tree_triples(box: Any, n: int, with_lt: bool) -> dict[str, Any]:
    """AND triples of the three tree levels: per level masks ``a`` and ``b1`` (``b2``), and all
    products packed in one word (level ``l`` at bit offset ``2 l``; see ``circuits.tree_products``)."""
    levels = []
    for s in circuits.LEVEL_SPACINGS:
        m = circuits.PAIR_MASKS[s]
        a, b1 = box.rand_bin((n,), m), box.rand_bin((n,), m)
        b2 = box.rand_bin((n,), m) if with_lt else None
        levels.append((a, b1, b2))

    def products() -> torch.Tensor:
        word = torch.zeros((n,), dtype=torch.int64)
        for lvl, (a, b1, b2) in enumerate(levels):
            word |= (a & b1) << (2 * lvl)
            if b2 is not None:
                word |= (a & b2) << (2 * lvl + 1)
        return word

    return {"levels": levels, "c": box.bin((n,), products)}


def _table(box: Any, n: int, mask_bits: int, fn: Any, ys: int) -> tuple[Any, ...]:
    """Random mask ``m`` of ``mask_bits`` XOR-shared bits; the truth table ``T[k] = fn(k, m)`` over
    the 4 values of the two opened bits ``k``, as arithmetic shares; and for each of ``ys``
    multiplicands a mask ``a`` with ``a * T``."""
    m = box.rand_bin((n,), (1 << mask_bits) - 1)

    def table() -> torch.Tensor:
        k = torch.arange(4, dtype=torch.int64)
        return fn(k[None, :], m[:, None])

    # Tables are needed last: their corrections go to party 0, the early fields' to party 1, so
    # the dealer's two links carry the load in parallel.
    t = box.arith((n, 4), table, to=0)
    masks = []
    for _ in range(ys):
        a = box.rand_arith((n,))
        masks.append((a, box.arith((n, 4), lambda a=a: a[:, None] * t, to=0)))
    return m, t, masks


def _and2(k: torch.Tensor) -> torch.Tensor:
    return k & (k >> 1) & 1


def _msb_fn(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # m = (alpha, beta, gamma); k = opened (v ^ beta, w ^ gamma); h = alpha ^ (v & w)
    return (m & 1) ^ _and2(k ^ (m >> 1))


def _eq_fn(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # m = (beta, gamma); k = opened (v ^ beta, w ^ gamma); h = v & w
    return _and2(k ^ m)


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
