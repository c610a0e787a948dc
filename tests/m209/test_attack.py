"""Known-plaintext key recovery for the M-209 (veil.m209.attack)."""

import numpy as np
import pytest

from veil.m209 import Key, encrypt, keystream, keystream_from_known_plaintext
from veil.m209.attack import (
    Recovery,
    format_key_list,
    keys_equivalent,
    lugs_from_counts,
    recover_key,
    recover_many,
)
from veil.m209.keys import generate_keys, generate_positions, make_rng


def _keys(n, seed):
    rng = make_rng(seed)
    pins, lugs = generate_keys(n, rng=rng)
    return [Key(pins[i], lugs[i]) for i in range(n)], generate_positions(n, rng=rng), rng


def _probs(pins, accuracy, rng):
    """Simulated calibrated network output: logit ~ N(+-mu, s), mu = s^2 / 2, P(wrong side) = 1 - accuracy."""
    from scipy.stats import norm

    s = 2 * norm.ppf(accuracy)
    logit = rng.normal(s * s / 2, s, size=pins.shape) * np.where(pins, 1, -1)
    return 1 / (1 + np.exp(-logit))


def _known(key, pos, length, rng):
    plain = rng.integers(0, 26, size=length).astype(np.uint8)
    cipher = encrypt(key.pins[None], key.lugs[None], pos, plain)[0]
    return keystream_from_known_plaintext(plain, cipher)


def test_recovers_key_from_long_known_plaintext():
    keys, pos, rng = _keys(3, seed=11)
    for key, p in zip(keys, pos):
        y = _known(key, p, 260, rng)
        probs = _probs(key.pins, 0.95, rng)
        rec = recover_key(y, p, probs, time_limit=20, rng=make_rng(5))
        assert isinstance(rec, Recovery)
        assert rec.reproduced and rec.matches == rec.letters == 260
        assert rec.lug_counts.sum() == 27 and rec.pins.shape == (131,)
        assert keys_equivalent(rec.key, key, rng=make_rng(1))
        assert rec.seconds < 20


def test_recovers_with_lug_probs_and_no_pin_probs_on_easy_text():
    keys, pos, rng = _keys(1, seed=12)
    key, p = keys[0], pos[0]
    y = keystream(key.pins[None], key.lugs[None], p, 300)[0] % 26
    lug_probs = np.full((22, 28), 0.01)
    lug_probs[np.arange(22), key.lug_pair_counts()] = 0.9
    rec = recover_key(y, p, _probs(key.pins, 0.9, rng), lug_probs=lug_probs, time_limit=20, rng=make_rng(2))
    assert rec.reproduced and keys_equivalent(rec.key, key, rng=make_rng(3))


def test_unreproduced_recovery_says_so():
    keys, pos, rng = _keys(1, seed=13)
    key, p = keys[0], pos[0]
    y = _known(key, p, 150, rng)
    rec = recover_key(y, p, None, time_limit=0.001, rng=make_rng(4))
    assert not rec.reproduced
    assert rec.matches < rec.letters == 150
    assert rec.key is not None and rec.lug_counts.sum() == 27


def test_keys_equivalent_detects_one_effective_pin():
    keys, _, _ = _keys(4, seed=14)
    for key in keys:
        counts = key.lug_pair_counts()
        wheel = 1 + int(np.argmax(counts[1:7]))  # a wheel with single-lug bars: each of its pins matters
        assert 1 <= counts[wheel] <= 20
        pins = key.pins.copy()
        j = sum((26, 25, 23, 21, 19, 17)[: wheel - 1]) + 3
        pins[j] = ~pins[j]
        other = Key(pins, key.lugs)
        assert not keys_equivalent(key, other, rng=make_rng(0))
        shuffled = Key(key.pins, key.lugs[np.random.default_rng(0).permutation(27)])
        assert keys_equivalent(key, shuffled, rng=make_rng(0))


def test_lugs_from_counts_round_trips():
    key = _keys(1, seed=15)[0][0]
    assert Key(key.pins, lugs_from_counts(key.lug_pair_counts())) == key
    with pytest.raises(ValueError, match="summing to 27"):
        lugs_from_counts(np.ones(22, dtype=np.int64))


def test_format_key_list_has_lugs_pins_and_check():
    key = _keys(1, seed=16)[0][0]
    text = format_key_list(key, "QX")
    assert "QX" in text
    assert key.lug_string() in text
    for w, pins in enumerate(key.pin_list()):
        assert f"wheel{w + 1} = {pins}" in text
    assert key.letter_check() in text
    assert len(text.splitlines()) == 9


@pytest.mark.parametrize(
    ("ks", "pos", "probs", "message"),
    [
        (np.zeros((2, 10), np.uint8), np.zeros(6, np.int64), None, "keystream_mod26"),
        (np.full(10, 26, np.uint8), np.zeros(6, np.int64), None, "0..25"),
        (np.zeros(10, np.uint8), np.zeros(5, np.int64), None, "positions"),
        (np.zeros(10, np.uint8), np.array([0, 0, 0, 0, 0, 17]), None, "wheel sizes"),
        (np.zeros(10, np.uint8), np.zeros(6, np.int64), np.full(130, 0.5), r"pin_probs: need shape \(131,\)"),
        (np.zeros(10, np.uint8), np.zeros(6, np.int64), np.full(131, 1.5), r"\[0, 1\]"),
        (np.zeros(10, np.uint8), np.zeros(6, np.int64), np.full(131, np.nan), "NaN"),
    ],
)
def test_bad_inputs_raise(ks, pos, probs, message):
    with pytest.raises(ValueError, match=message):
        recover_key(ks, pos, probs, time_limit=1)


def test_bad_lug_probs_and_time_limit_raise():
    y, pos = np.zeros(10, np.uint8), np.zeros(6, np.int64)
    with pytest.raises(ValueError, match="lug_probs"):
        recover_key(y, pos, None, lug_probs=np.full((21, 5), 0.2))
    with pytest.raises(ValueError, match="time_limit"):
        recover_key(y, pos, None, time_limit=0)


def test_recover_many_in_a_pool_keeps_order():
    keys, pos, rng = _keys(3, seed=17)
    pins = np.stack([k.pins for k in keys])
    lugs = np.stack([k.lugs for k in keys])
    ks = keystream(pins, lugs, pos, 220) % 26
    recs = recover_many(ks, pos, _probs(pins, 0.97, rng), time_limit=20, workers=2, rng=make_rng(8), progress=False)
    assert len(recs) == 3
    for rec, key in zip(recs, keys):
        assert rec.reproduced and keys_equivalent(rec.key, key, rng=make_rng(9))
    with pytest.raises(ValueError, match="pin_probs"):
        recover_many(ks, pos, np.full((2, 131), 0.5), workers=1, progress=False)

