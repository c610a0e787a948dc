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
    info = torch.iinfo(t.dtype)
    mask = torch.randint(info.min, info.max, t.shape, generator=g, dtype=t.dtype)
    return t ^ mask, mask


def _bit(t: torch.Tensor, pos: int) -> int:
    return (int(t) % 2**16 >> pos) & 1


@FAST
@given(WORDS)
def test_planes_gather_bit_i_of_every_group(xs: list[int]) -> None:
    p = circuits.planes(torch.tensor(xs, dtype=torch.int64))
    assert p.shape == (4, len(xs)) and p.dtype == torch.int16
    for k, word in enumerate(xs):
        for g, nib in enumerate(_nibbles(word)):
            for i in range(4):
                assert _bit(p[i, k], g) == (nib >> i) & 1


@FAST
@given(WORDS, WORDS, st.integers(0, 2**32))
def test_leaves_compare_every_nibble(cs: list[int], rs: list[int], seed: int) -> None:
    n = min(len(cs), len(rs))
    c = torch.tensor(cs[:n], dtype=torch.int64)
    r = torch.tensor(rs[:n], dtype=torch.int64)
    m0, m1 = _xor_share(circuits.monomials(circuits.planes(r)), seed)
    cp = circuits.planes(c)
    lt0, eq0 = circuits.leaf(cp, m0, 0, want_lt=True)
    lt1, eq1 = circuits.leaf(cp, m1, 1, want_lt=True)
    lt, eq = lt0 ^ lt1, eq0 ^ eq1
    for i in range(n):
        for g, (a, b) in enumerate(zip(_nibbles(cs[i]), _nibbles(rs[i]))):
            assert _bit(lt[i], g) == int(a < b), "LT = [c < r] of group g, at bit g"
            assert _bit(eq[i], g) == int(a == b), "EQ = [c == r] of group g, at bit g"
    _, eq_only0 = circuits.leaf(cp, m0, 0, want_lt=False)
    _, eq_only1 = circuits.leaf(cp, m1, 1, want_lt=False)
    assert torch.equal(eq_only0 ^ eq_only1, eq)


@FAST
@given(WORDS)
def test_monomials_are_every_product_of_the_planes(rs: list[int]) -> None:
    r = torch.tensor(rs, dtype=torch.int64)
    mono = circuits.monomials(circuits.planes(r))
    assert mono.shape == (15, len(rs))
    for k, word in enumerate(rs):
        for g, nib in enumerate(_nibbles(word)):
            for j, m in enumerate(circuits.MONOMIALS):
                assert _bit(mono[j, k], g) == int(all((nib >> b) & 1 for b in m))


@FAST
@given(st.integers(1, 50), st.integers(0, 2**32))
def test_level_masks_and_packed_products(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    draw = torch.randint(-(2**15), 2**15 - 1, (len(circuits.MASK_ROWS), n), generator=g, dtype=torch.int16)
    levels, final = circuits.level_masks(draw, with_lt=True)
    assert int(final.max()) <= 7 and final.dtype == torch.int64
    word = circuits.pack_products(levels)
    for lvl, (a, b1, b2) in enumerate(levels):
        m = circuits.PAIR_MASKS[circuits.LEVEL_SPACINGS[lvl]]
        for t in (a, b1, b2):
            assert int((t & ~torch.tensor(m, dtype=torch.int16)).abs().max()) == 0, "masks stay on the level's bits"
        c1, c2 = circuits.unpack_products(word, lvl)
        assert torch.equal(c1, a & b1) and torch.equal(c2, a & b2)


def test_constants_describe_the_tree() -> None:
    assert len(circuits.MONOMIALS) == 15 and len(circuits.LT_TERMS) == 15 and len(circuits.EQ_TERMS) == 16
    for s, mask in circuits.PAIR_MASKS.items():
        assert mask == sum(1 << p for p in range(0, 16, 2 * s))
