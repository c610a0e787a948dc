"""The vectorised M-209 against the reference ``m209`` package, and the manual's key procedure."""

import random

import numpy as np
import pytest
from m209.converter import M209
from m209.drum import Drum
from m209.keylist.generate import check_lug_placement, check_overlaps, generate_key_list, pin_list_check

from veil.m209 import (
    LUG_PAIRS,
    Key,
    array_to_letters,
    check_procedure,
    decrypt,
    encrypt,
    generate_keys,
    generate_lugs,
    generate_pins,
    keystream,
    keystream_from_known_plaintext,
    letters_from_positions,
    letters_to_array,
    lug_pair_counts,
    positions_from_letters,
)
from veil.m209.keys import generate_positions, make_rng


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = make_rng(20260209)
    n = 1000
    pins, lugs = generate_keys(n, rng=rng)
    positions = generate_positions(n, rng=rng)
    plain = rng.integers(0, 26, size=(n, 120)).astype(np.uint8)
    return pins, lugs, positions, plain


def test_matches_reference_letter_for_letter(batch):
    pins, lugs, positions, plain = batch
    cipher = encrypt(pins, lugs, positions, plain)
    settings = letters_from_positions(positions)
    for i in range(pins.shape[0]):
        key = Key(pins[i], lugs[i])
        machine = M209(lugs=key.lug_string(), pin_list=key.pin_list())
        machine.set_key_wheels(settings[i])
        ref = machine.encrypt(array_to_letters(plain[i]), group=False)
        assert array_to_letters(cipher[i]) == ref, f"key {i}: {key.lug_string()} {key.pin_list()} at {settings[i]}"
    assert np.array_equal(decrypt(pins, lugs, positions, cipher), plain)


def test_keystream_is_the_drum_count(batch):
    pins, lugs, positions, plain = batch
    ks = keystream(pins[:50], lugs[:50], positions[:50], 60)
    for i in range(50):
        key = Key(pins[i], lugs[i])
        machine = M209(lugs=key.lug_string(), pin_list=key.pin_list())
        machine.set_key_wheels(letters_from_positions(positions[i : i + 1])[0])
        counts = []
        for _ in range(60):
            counts.append(machine.drum.rotate([kw.is_effective() for kw in machine.key_wheels]))
            for kw in machine.key_wheels:
                kw.rotate()
        assert ks[i].tolist() == counts
    all_a = encrypt(pins, lugs, positions, np.zeros(120, np.uint8))
    full = keystream(pins, lugs, positions, 120)
    assert np.array_equal(keystream_from_known_plaintext(np.zeros(120, np.uint8), all_a), full % 26)
    assert np.array_equal(keystream_from_known_plaintext(plain, encrypt(pins, lugs, positions, plain)), full % 26)


def test_reference_key_lists_round_trip():
    random.seed(7)  # the reference generator uses the global `random`
    for _ in range(20):
        key_list = generate_key_list("AB")
        key = Key.from_reference(key_list)
        assert key.lug_string() == key_list.lugs
        assert key.pin_list() == key_list.pin_list
        assert key.letter_check() == key_list.letter_check
        assert Key.from_reference(key.to_reference("AB")) == key
        assert not check_procedure(key)


def test_spaces_and_letters():
    assert letters_to_array("AZ B").tolist() == [0, 25, 25, 1]
    with pytest.raises(ValueError, match="spaces=True"):
        letters_to_array("A B", spaces=False)
    assert array_to_letters([0, 25, 1], z_as_space=True) == "A B"
    assert positions_from_letters("AAAAAA").tolist() == [0] * 6
    assert positions_from_letters(["ZZXUSQ"]).tolist() == [[25, 24, 22, 20, 18, 16]]
    with pytest.raises(ValueError, match="wheel 2 has no letter 'W'"):
        positions_from_letters("AWAAAA")
    rng = make_rng(3)
    pins, lugs = generate_keys(1, rng=rng)
    key = Key(pins[0], lugs[0])
    machine = key.reference_machine()
    machine.set_key_wheels("GHIJKL")
    assert array_to_letters(encrypt(pins, lugs, "GHIJKL", "ATTACK AT DAWN")[0]) == machine.encrypt(
        "ATTACK AT DAWN", group=False)


def test_procedure_invariants():
    rng = make_rng(11)
    pins, lugs = generate_keys(200, rng=rng)
    for i in range(200):
        key = Key(pins[i], lugs[i])
        assert check_procedure(key) == []
        assert pin_list_check(key.pin_list())
        assert check_lug_placement(Drum.from_key_list(key.lug_string()))
        overlaps = [(a - 1, b - 1, int(c)) for (a, b), c in zip(LUG_PAIRS[7:], key.lug_pair_counts()[7:]) if c]
        assert check_overlaps(overlaps)
        assert 1 <= key.overlaps <= 12
    for target in (1, 5, 12):
        for lug in generate_lugs(30, overlaps=target, rng=rng):
            assert Key(pins[0], lug).overlaps == target
            assert ((lug > 0).sum(axis=1) >= 1).all()


def test_lug_pair_counts_sum_to_27(batch):
    _, lugs, _, _ = batch
    counts = lug_pair_counts(lugs)
    assert counts.shape == (1000, 22)
    assert (counts.sum(axis=1) == 27).all()
    assert len(set(LUG_PAIRS)) == 22
    one = np.zeros((1, 27, 2), np.int64)
    one[0, 0] = (3, 1)  # unordered input is normalised to (1, 3)
    one[0, 1] = (2, 0)
    c = lug_pair_counts(one)[0]
    assert c[LUG_PAIRS.index((0, 0))] == 25 and c[LUG_PAIRS.index((1, 3))] == 1 and c[LUG_PAIRS.index((0, 2))] == 1


def test_bad_keys_raise():
    pins = generate_pins(1, rng=make_rng(5))[0]
    lugs = np.zeros((27, 2), np.int64)
    lugs[:, 1] = 1
    with pytest.raises(ValueError, match="27 bars"):
        Key(pins, np.zeros((28, 2), np.int64))
    bad = lugs.copy()
    bad[3, 1] = 7
    with pytest.raises(ValueError, match=r"0 \(neutral\) or 1\.\.6"):
        Key(pins, bad)
    same = lugs.copy()
    same[0] = (2, 2)
    with pytest.raises(ValueError, match="different wheels"):
        Key(pins, same)
    with pytest.raises(ValueError, match="131"):
        Key(pins[:130], lugs)
    with pytest.raises(ValueError, match="wheel 2: 24 pins, needs 25"):
        Key.from_wheels([np.zeros(n, bool) for n in (26, 24, 23, 21, 19, 17)], lugs)
    with pytest.raises(ValueError, match="positions"):
        keystream(pins[None], lugs[None], np.array([[0, 0, 0, 0, 0, 17]]), 5)
    problems = check_procedure(Key(np.zeros(131, bool), lugs))
    assert any("40%..60%" in p for p in problems) and any("appendix II" in p for p in problems)
