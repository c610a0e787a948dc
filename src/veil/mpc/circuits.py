"""Bit-level building blocks of the comparison protocols, on 64-bit words of XOR shares.

Comparing a public ``c`` with a secret ``r`` (given as XOR shares of its bits) is a tree over the 64
bit positions. Every node holds two bits, ``LT`` (c < r on that range) and ``EQ`` (c == r on that
range), and two adjacent nodes combine as ``LT = LT_hi ^ (EQ_hi & LT_lo)``, ``EQ = EQ_hi & EQ_lo``.

Layout. Bits stay where they are in the word: a node that covers ``2^k`` bits lives at the lowest of
its positions, so after a level with spacing ``s`` the nodes sit at multiples of ``2s``. Combining is
a shift by ``s`` and a mask; no bit shuffling is ever needed.

Leaves in groups of four. The first two levels are free of communication: a group of four bits'
``LT`` and ``EQ`` are GF(2) polynomials in the group's secret bits ``r_0..r_3`` whose coefficients
are products of the public bits ``NOT c_i``. The dealer supplies XOR shares of every monomial of
degree >= 2 (11 per group), the parties evaluate the polynomials locally (:func:`leaf`). 64 leaves become 16 nodes at
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

# A GF(2) polynomial in the group's secret bits r_0..r_3 whose coefficients are themselves GF(2)
# polynomials in the public bits cbar_i = NOT c_i: {r-monomial: set of cbar-monomials}.
_Sym = dict[frozenset[int], frozenset[frozenset[int]]]


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


Terms = list[tuple[frozenset[int], frozenset[int]]]


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


def leaf(c: torch.Tensor, r_share: torch.Tensor, mono_share: torch.Tensor, party: int,
         want_lt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """XOR shares of (LT, EQ) of every 4-bit group of public ``c`` against secret ``r``, at bit 4g.

    ``r_share`` is this party's XOR share of ``r``; ``mono_share`` its share of the packed degree >= 2
    monomials (:func:`monomial_words`). Local: about 110 word operations.
    """
    notc = ~c
    cbar = [(notc >> i) & G4 for i in range(4)]
    cprod: dict[frozenset[int], torch.Tensor | None] = {frozenset(): None}  # None: all ones
    for k in (1, 2, 3, 4):
        for subset in combinations(range(4), k):
            fs = frozenset(subset)
            if k == 1:
                cprod[fs] = cbar[subset[0]]
            else:
                prev = cprod[frozenset(subset[:-1])]
                assert prev is not None
                cprod[fs] = prev & cbar[subset[-1]]
    shares: dict[frozenset[int], torch.Tensor] = {frozenset({i}): (r_share >> i) & G4 for i in range(4)}
    for k, mono in enumerate(MONOMIALS):
        shares[mono] = (mono_share[k // 4] >> (k % 4)) & G4

    scratch = torch.empty_like(c)

    def evaluate(terms: Terms) -> torch.Tensor:
        out = torch.zeros_like(c)
        for rmono, tmono in terms:
            coef = cprod[tmono]
            if not rmono:  # public term: party 0 alone adds it
                if party == 0:
                    out ^= torch.full_like(c, G4) if coef is None else coef
            elif coef is None:
                out ^= shares[rmono]
            else:
                out ^= torch.bitwise_and(shares[rmono], coef, out=scratch)
        return out

    eq = evaluate(EQ_TERMS)
    return (evaluate(LT_TERMS) if want_lt else eq), eq


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


def unpack3(word: torch.Tensor, mask: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return word & mask, (word >> 1) & mask, (word >> 2) & mask
