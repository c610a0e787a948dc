"""Bit-level building blocks of the comparison protocols, on 64-bit words of XOR shares.

Comparing a public ``c`` with a secret ``r`` (given as XOR shares of its bits) is a tree over the 64
bit positions. Every node holds two bits, ``LT`` (c < r on that range) and ``EQ`` (c == r on that
range), and two adjacent nodes combine as ``LT = LT_hi ^ (EQ_hi & LT_lo)``, ``EQ = EQ_hi & EQ_lo``.

Layout. Bits stay where they are in the word: a node that covers ``2^k`` bits lives at the lowest of
its positions, so after a level with spacing ``s`` the nodes sit at multiples of ``2s``. Combining is
a shift by ``s`` and a mask; no bit shuffling is ever needed.

Leaves in groups of four. The first two levels are free of communication: a group of four bits'
``LT`` and ``EQ`` are GF(2) polynomials in the group's secret bits ``r_0..r_3`` whose coefficients
depend only on the public ``c``. The dealer supplies XOR shares of every monomial of degree >= 2
(11 per group), the parties evaluate the polynomials locally. 64 leaves become 16 nodes at
positions 4g; three AND levels (spacing 4, 8, 16) leave two nodes at positions 0 and 32.
"""

from __future__ import annotations

from itertools import combinations

import torch

G4 = 0x1111111111111111  # bit 4g of every group g
MASK63 = 0x7FFFFFFFFFFFFFFF
LEVEL_SPACINGS = (4, 8, 16)  # tree levels that cost one round each
PAIR_MASKS = {4: 0x0101010101010101, 8: 0x0001000100010001, 16: 0x0000000100000001}
# Monomials of degree >= 2 in the 4 bits of a group, in a fixed order; packed 4 to a word.
MONOMIALS: tuple[frozenset[int], ...] = tuple(
    frozenset(s) for k in (2, 3, 4) for s in combinations(range(4), k))
MONOMIAL_WORDS = (len(MONOMIALS) + 3) // 4

# A polynomial: monomial -> public coefficient word (None stands for G4, "one" in every group).
Poly = dict[frozenset[int], torch.Tensor | None]


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _xor(a: torch.Tensor | None, b: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    a_t = torch.full_like(like, G4) if a is None else a
    b_t = torch.full_like(like, G4) if b is None else b
    return a_t ^ b_t


def poly_xor(p: Poly, q: Poly, like: torch.Tensor) -> Poly:
    out = dict(p)
    for mono, coef in q.items():
        out[mono] = _xor(out[mono], coef, like) if mono in out else coef
    return out


def poly_and(p: Poly, q: Poly, like: torch.Tensor) -> Poly:
    out: Poly = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            term: Poly = {m1 | m2: _and(c1, c2)}
            out = poly_xor(out, term, like)
    return out


def group_polys(c: torch.Tensor, want_lt: bool) -> tuple[Poly, Poly]:
    """LT and EQ of each 4-bit group of public ``c`` against secret ``r``, as polynomials in r's bits.

    Returns ``(lt, eq)`` (``lt`` is empty when ``want_lt`` is False). Coefficients are words with
    one bit per group, at positions 4g.
    """
    cbar = [((~c) >> i) & G4 for i in range(4)]
    lt: Poly = {}
    eq: Poly = {}
    for i in range(4):
        eq_i: Poly = {frozenset(): cbar[i], frozenset({i}): None}
        if want_lt:
            lt_i: Poly = {frozenset({i}): cbar[i]}
            lt = lt_i if i == 0 else poly_xor(lt_i, poly_and(eq_i, lt, c), c)
        eq = eq_i if i == 0 else poly_and(eq_i, eq, c)
    return lt, eq


def monomial_words(r: torch.Tensor) -> torch.Tensor:
    """Dealer side: the degree >= 2 monomials of every group of ``r``, packed (shape ``[W, *r]``)."""
    bits = [(r >> i) & G4 for i in range(4)]
    words = [torch.zeros_like(r) for _ in range(MONOMIAL_WORDS)]
    for k, mono in enumerate(MONOMIALS):
        v = bits[min(mono)]
        for i in mono:
            v = v & bits[i]
        words[k // 4] |= v << (k % 4)
    return torch.stack(words)


def eval_poly(p: Poly, r_share: torch.Tensor, mono_share: torch.Tensor, party: int) -> torch.Tensor:
    """XOR share of a group polynomial, given XOR shares of r and of its packed monomials."""
    out = torch.zeros_like(r_share)
    index = {m: k for k, m in enumerate(MONOMIALS)}
    for mono, coef in p.items():
        if not mono:
            if party == 0:
                out ^= torch.full_like(out, G4) if coef is None else coef
            continue
        if len(mono) == 1:
            share = (r_share >> next(iter(mono))) & G4
        else:
            k = index[mono]
            share = (mono_share[k // 4] >> (k % 4)) & G4
        out ^= share if coef is None else share & coef
    return out


def unpack3(word: torch.Tensor, mask: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return word & mask, (word >> 1) & mask, (word >> 2) & mask
