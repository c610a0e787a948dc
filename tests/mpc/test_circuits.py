"""Bit-level building blocks of the comparisons (veil.mpc.circuits), against brute force."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.mpc import circuits

WORDS = st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=16)
FAST = settings(max_examples=40, deadline=None)


def _nibbles(word: int) -> list[int]:
    u = word % 2**64
    return [(u >> (4 * g)) & 0xF for g in range(16)]


def _xor_share(t: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(-(2**63), 2**63 - 1, t.shape, generator=g, dtype=torch.int64)
    return t ^ mask, mask


@FAST
@given(WORDS, WORDS, st.integers(0, 2**32))
def test_leaves_compare_every_nibble(cs: list[int], rs: list[int], seed: int) -> None:
    n = min(len(cs), len(rs))
    c = torch.tensor(cs[:n], dtype=torch.int64)
    r = torch.tensor(rs[:n], dtype=torch.int64)
    r0, r1 = _xor_share(r, seed)
    m0, m1 = _xor_share(circuits.monomial_words(r), seed + 1)
    lt0, eq0 = circuits.leaf(c, r0, m0, 0, want_lt=True)
    lt1, eq1 = circuits.leaf(c, r1, m1, 1, want_lt=True)
    lt, eq = lt0 ^ lt1, eq0 ^ eq1
    for i in range(n):
        pairs = list(enumerate(zip(_nibbles(cs[i]), _nibbles(rs[i]))))
        want_lt = sum(1 << (4 * g) for g, (a, b) in pairs if a < b)
        want_eq = sum(1 << (4 * g) for g, (a, b) in pairs if a == b)
        assert int(lt[i]) % 2**64 == want_lt, "LT = [c < r] per 4-bit group, at bit 4g"
        assert int(eq[i]) % 2**64 == want_eq, "EQ = [c == r] per 4-bit group, at bit 4g"
    _, eq_only0 = circuits.leaf(c, r0, m0, 0, want_lt=False)
    _, eq_only1 = circuits.leaf(c, r1, m1, 1, want_lt=False)
    assert torch.equal(eq_only0 ^ eq_only1, eq)


@FAST
@given(WORDS)
def test_monomial_words_pack_every_product_of_a_group(rs: list[int]) -> None:
    r = torch.tensor(rs, dtype=torch.int64)
    words = circuits.monomial_words(r)
    assert words.shape == (circuits.MONOMIAL_WORDS, len(rs))
    for i, word in enumerate(rs):
        for g, nib in enumerate(_nibbles(word)):
            for k, mono in enumerate(circuits.MONOMIALS):
                want = int(all((nib >> b) & 1 for b in mono))
                got = (int(words[k // 4, i]) % 2**64 >> (4 * g + k % 4)) & 1
                assert got == want


def test_constants_describe_the_tree() -> None:
    assert len(circuits.MONOMIALS) == 11 and circuits.MONOMIAL_WORDS == 3
    assert circuits.G4 == sum(1 << (4 * g) for g in range(16))
    for s, mask in circuits.PAIR_MASKS.items():
        assert mask == sum(1 << p for p in range(0, 64, 2 * s))
    word = torch.tensor([0b101], dtype=torch.int64)
    assert [int(t) for t in circuits.unpack3(word, 1)] == [1, 0, 1]
