"""Cryptographically secure pseudo-random generator for shares and masks.

AES-128 in counter mode (OpenSSL through ``cryptography``) keyed with 16 bytes from the operating
system (``secrets.token_bytes``). AES-CTR is a PRG under the standard assumption that AES is a
pseudo-random permutation; with one key per (party, purpose) and at most 2^64 blocks per key, the
output is indistinguishable from uniform to any efficient observer (128-bit security).

Two parties that hold the same key draw the same stream, which is how the dealer hands out
correlated randomness as a *seed* instead of as data: both ends consume the stream in the same order.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 16
_ZEROS = b""


def new_key() -> bytes:
    """A fresh PRG key from the OS random number generator."""
    return secrets.token_bytes(KEY_BYTES)


def derive_key(master: bytes, index: int) -> bytes:
    """The key of stream number ``index`` under ``master``: AES(master, index), a PRF."""
    enc = Cipher(algorithms.AES(master), modes.ECB()).encryptor()  # noqa: S305 - one block, a PRF call
    return enc.update(index.to_bytes(16, "little")) + enc.finalize()


class PRG:
    """A stream of uniformly random 64-bit words (as ``torch.int64``) from an AES-CTR keystream."""

    def __init__(self, key: bytes | None = None) -> None:
        key = new_key() if key is None else key
        if len(key) != KEY_BYTES:
            raise ValueError(f"PRG key must be {KEY_BYTES} bytes, got {len(key)}")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
        self.words_drawn = 0

    @staticmethod
    def _zeros(n: int) -> memoryview:
        """Plaintext for the keystream: zeros, shared by every generator (nothing secret)."""
        global _ZEROS
        if len(_ZEROS) < n:
            _ZEROS = bytes(max(n, 2 * len(_ZEROS)))
        return memoryview(_ZEROS)[:n]

    def int64(self, shape: tuple[int, ...] | torch.Size | int) -> torch.Tensor:
        """Uniform ring elements of the given shape."""
        return self.draw(shape, torch.int64)

    def draw(self, shape: tuple[int, ...] | torch.Size | int, dtype: torch.dtype) -> torch.Tensor:
        """Uniform integers of ``dtype`` (all bit patterns equally likely) of the given shape."""
        size = torch.Size((shape,) if isinstance(shape, int) else shape)
        n = size.numel()
        width = torch.empty(0, dtype=dtype).element_size()
        self.words_drawn += (n * width + 7) // 8
        # Spare room: update_into wants block_size - 1 spare bytes in its output buffer.
        out = torch.empty(n + 16 // width, dtype=dtype)
        if n:
            self._enc.update_into(self._zeros(width * n), memoryview(out.numpy().view(np.uint8)))  # type: ignore[arg-type]
        return out[:n].reshape(size)
