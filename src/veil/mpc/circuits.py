"""Bit-level building blocks of the comparison protocols, on 16-bit planes of XOR shares.

Comparing a public ``c`` with a secret ``r`` (given as XOR shares of its bits) is a tree over the 64
bit positions. Every node holds two bits, ``LT`` (c < r on that range) and ``EQ`` (c == r on that
range), and two adjacent nodes combine as ``LT = LT_hi ^ (EQ_hi & LT_lo)``, ``EQ = EQ_hi & EQ_lo``.

Layout. The 64 bits form 16 groups of four (group ``g`` = bits ``4g .. 4g+3``). A *plane* ``i`` of a
word is the 16-bit integer whose bit ``g`` is bit ``4g + i`` of the word (:func:`planes`); all bit
work runs on ``torch.int16`` tensors, a quarter of the memory traffic of 64-bit words.

Leaves in groups of four. The first two levels are free of communication: a group's ``LT`` and
``EQ`` are GF(2) polynomials in its secret bits ``r_0..r_3`` whose coefficients are products of the
public bits ``NOT c_i``. The dealer supplies XOR shares of r's planes and of every product of them
(11 monomials of degree >= 2), the parties evaluate the polynomials locally (:func:`leaf`): 16 nodes,
node ``g`` at bit ``g``. Three AND levels (spacings 1, 2, 4) leave two nodes at bits 0 and 8.
"""

from __future__ import annotations

from itertools import combinations

import torch

MASK63 = 0x7FFFFFFFFFFFFFFF
LEVEL_SPACINGS = (1, 2, 4)  # tree levels that cost one round each
PAIR_MASKS = {1: 0x5555, 2: 0x1111, 4: 0x0101}  # where the pairs' low nodes sit, per level
ALL16 = -1  # all 16 bits of an int16
# Monomials of r's planes: the 4 planes themselves, then every product of 2, 3 and 4 of them.
MONOMIALS: tuple[frozenset[int], ...] = tuple(
    frozenset(s) for k in (1, 2, 3, 4) for s in combinations(range(4), k))
_INDEX = {m: k for k, m in enumerate(MONOMIALS)}


PLANES_CHUNK = 16384  # elements per block: the int64 temporaries stay in the core's cache


def planes(x: torch.Tensor) -> torch.Tensor:
    """``[4, *x.shape]`` int16: plane ``i`` holds bit ``4g + i`` of each int64 of ``x`` at bit ``g``."""
    flat = x.reshape(-1)
    if flat.numel() > PLANES_CHUNK:
        blocks = [_planes(flat[i:i + PLANES_CHUNK]) for i in range(0, flat.numel(), PLANES_CHUNK)]
        return torch.cat(blocks, dim=1).reshape(4, *x.shape)
    return _planes(flat).reshape(4, *x.shape)


def _planes(x: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(4, dtype=torch.int64, device=x.device).reshape(4, 1)
    y = (x.unsqueeze(0) >> shifts) & 0x1111111111111111  # bit 4g + i -> bit 4g
    y = (y | (y >> 3)) & 0x0303030303030303  # gather pairs of groups into each byte
    y = (y | (y >> 6)) & 0x000F000F000F000F  # four groups per 16-bit chunk
    y = (y | (y >> 12)) & 0x000000FF000000FF  # eight per 32-bit half
    y = (y | (y >> 24)) & 0xFFFF
    return y.to(torch.int16)


def monomials(r_planes: torch.Tensor) -> torch.Tensor:
    """Dealer side: all 15 monomials of the 4 planes, ``[15, *shape]`` int16 (order :data:`MONOMIALS`)."""
    out = []
    for mono in MONOMIALS:
        it = iter(sorted(mono))
        v = r_planes[next(it)]
        for i in it:
            v = v & r_planes[i]
        out.append(v)
    return torch.stack(out)


# A GF(2) polynomial in the group's secret bits r_0..r_3 whose coefficients are themselves GF(2)
# polynomials in the public bits cbar_i = NOT c_i: {r-monomial: set of cbar-monomials}.
_Sym = dict[frozenset[int], frozenset[frozenset[int]]]
Terms = list[tuple[frozenset[int], frozenset[int]]]


def _sym_xor(p: _Sym, q: _Sym) -> _Sym:
    out = dict(p)
    for m, c in q.items():
        out[m] = out.get(m, frozenset()) ^ c
        if not out[m]:
            del out[m]
    return out


def _sym_and(p: _Sym, q: _Sym) -> _Sym:
    out: _Sym = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            prod: frozenset[frozenset[int]] = frozenset()
            for a in c1:
                for b in c2:
                    prod = prod ^ frozenset({a | b})
            out = _sym_xor(out, {m1 | m2: prod})
    return out


def _group_terms() -> tuple[Terms, Terms]:
    """LT and EQ of a 4-bit group as lists of (r-monomial, cbar-monomial) terms, worked out once.

    With ``lt_i = cbar_i r_i`` and ``eq_i = cbar_i ^ r_i``, from the low bit up:
    ``LT = lt_i ^ eq_i LT``, ``EQ = eq_i EQ``. Every r-monomial turns out to have a single
    cbar-monomial as coefficient (15 terms for LT, 16 for EQ).
    """
    one = frozenset({frozenset[int]()})
    lt: _Sym = {}
    eq: _Sym = {}
    for i in range(4):
        eq_i: _Sym = {frozenset(): frozenset({frozenset({i})}), frozenset({i}): one}
        lt_i: _Sym = {frozenset({i}): frozenset({frozenset({i})})}
        lt = lt_i if i == 0 else _sym_xor(lt_i, _sym_and(eq_i, lt))
        eq = eq_i if i == 0 else _sym_and(eq_i, eq)
    return ([(m, t) for m, c in lt.items() for t in c], [(m, t) for m, c in eq.items() for t in c])


LT_TERMS, EQ_TERMS = _group_terms()


def leaf(c_planes: torch.Tensor, mono_share: torch.Tensor, party: int,
         want_lt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """XOR shares of (LT, EQ) of the 16 groups of public ``c`` against secret ``r``, node g at bit g.

    ``c_planes`` are the planes of ``c`` (:func:`planes`); ``mono_share`` this party's XOR share of
    r's monomials (:func:`monomials`). Local: about 60 operations on int16.
    """
    cbar = [~c_planes[i] for i in range(4)]
    cprod: dict[frozenset[int], torch.Tensor | None] = {frozenset(): None}  # None: all ones
    for k in (1, 2, 3, 4):
        for subset in combinations(range(4), k):
            prev = cprod[frozenset(subset[:-1])]
            cprod[frozenset(subset)] = cbar[subset[-1]] if prev is None else prev & cbar[subset[-1]]
    scratch = torch.empty_like(cbar[0])

    def evaluate(terms: Terms) -> torch.Tensor:
        out = torch.zeros_like(cbar[0])
        for rmono, tmono in terms:
            coef = cprod[tmono]
            if not rmono:  # public term: party 0 alone adds it
                if party == 0:
                    out ^= torch.full_like(out, ALL16) if coef is None else coef
            elif coef is None:
                out ^= mono_share[_INDEX[rmono]]
            else:
                out ^= torch.bitwise_and(mono_share[_INDEX[rmono]], coef, out=scratch)
        return out

    eq = evaluate(EQ_TERMS)
    return (evaluate(LT_TERMS) if want_lt else eq), eq


# Masks of the AND triples, row by row of a [10, n] int16 draw: (a, b1, b2) of levels 1, 2, 3, and
# the final 3 mask bits.
MASK_ROWS = (0x5555, 0x5555, 0x5555, 0x1111, 0x1111, 0x1111, 0x0101, 0x0101, 0x0101, 0x0007)


def level_masks(draw: torch.Tensor, with_lt: bool) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """The AND-triple masks of the three levels and the 3 final mask bits, from ``[10, n]`` random
    int16 (independent rows, each kept at the bits its level uses)."""
    rows = torch.tensor(MASK_ROWS, dtype=torch.int16, device=draw.device).unsqueeze(1)
    m = draw & rows
    per_level = 3 if with_lt else 2
    levels: list[tuple[torch.Tensor, ...]] = [tuple(m[3 * k + j] for j in range(per_level)) for k in range(3)]
    return levels, m[9].to(torch.int64)


def pack_products(levels: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Dealer side: the AND products of all levels in two int16 words: level 1's ``a&b1 | (a&b2)<<1``
    in the first; level 2's (bits 4j, 4j+1) and level 3's shifted by 2 (bits 8j+2, 8j+3) in the second."""
    def prods(trio: tuple[torch.Tensor, ...]) -> torch.Tensor:
        a, b1 = trio[0], trio[1]
        p = a & b1
        return p | ((a & trio[2]) << 1) if len(trio) == 3 else p

    return torch.stack([prods(levels[0]), prods(levels[1]) | (prods(levels[2]) << 2)])


def unpack_products(word: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This party's shares of a level's two products (``a & b1``, ``a & b2``), from :func:`pack_products`."""
    m = PAIR_MASKS[LEVEL_SPACINGS[level]]
    w = word[0] if level == 0 else (word[1] if level == 1 else word[1] >> 2)
    return w & m, (w >> 1) & m
