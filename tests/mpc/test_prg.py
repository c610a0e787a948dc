"""The AES-CTR pseudo-random generator of shares and masks (veil.mpc.prg)."""

from __future__ import annotations

import pytest
import torch

from veil.mpc.prg import KEY_BYTES, PRG, new_key


def test_same_key_same_stream_in_any_chunking() -> None:
    key = new_key()
    a, b = PRG(key), PRG(key)
    whole = a.int64((10, 7))
    parts = torch.cat([b.int64(3), b.int64(0), b.int64((2, 5)).flatten(), b.int64(57)])
    assert torch.equal(whole.flatten(), parts)
    assert a.words_drawn == b.words_drawn == 70


def test_different_keys_different_streams_and_fresh_keys() -> None:
    assert len(new_key()) == KEY_BYTES and new_key() != new_key()
    x, y = PRG(new_key()).int64(1000), PRG(new_key()).int64(1000)
    assert int((x == y).sum()) == 0
    assert PRG().int64(4).dtype == torch.int64


def test_stream_uses_all_64_bits() -> None:
    x = PRG(bytes(KEY_BYTES)).int64(4096)
    assert int((x < 0).sum()) > 1800 and int((x >= 0).sum()) > 1800
    assert len(set(x.tolist())) == 4096


@pytest.mark.parametrize("length", [0, 15, 17, 32])
def test_key_length_is_checked(length: int) -> None:
    with pytest.raises(ValueError, match=f"PRG key must be {KEY_BYTES} bytes, got {length}"):
        PRG(bytes(length))
