"""A cryptographic mask generator for Flower's SecAgg+.

SecAgg+ hides each client's quantised update under masks expanded from secret seeds: a self mask
from 32 random bytes, and pairwise masks from Diffie-Hellman keys. Its security rests on those
masks being unpredictable without the seeds. Flower 1.41's ``pseudo_rand_gen`` expands a seed by
XOR-folding it to **32 bits** and drawing from numpy's Mersenne Twister. That leaves 2^32 possible
masks per seed, few enough to try them all. MT19937 is also not a cryptographic generator.

:func:`mask_prg` takes the place of that generator. It is AES-256 in counter mode (``cryptography``),
keyed by SHA-256 of a domain tag and the whole seed, so each seed's mask is a keystream of 256-bit
security. :func:`install` puts it in the two places SecAgg+ calls the generator: Flower's client mod
and its server workflow. Veil's ClientApp and ServerApp call it themselves, so both sides of a Veil
run expand masks the same way and the masks cancel in the sum. A client running stock Flower
against a Veil server would not cancel: its round would fail the unmasking, not leak.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_TAG = b"veil/secagg+/mask/v1\x00"


def mask_prg(seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform integers in ``[0, num_range)`` (``num_range`` a power of two, <= 2^32), one int64 array
    per shape in ``dimensions_list`` (a 0-d array for ``()``), from the keystream of AES-256-CTR
    keyed by SHA-256(tag || seed)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if num_range < 2 or num_range > 2 ** 32 or num_range & (num_range - 1):
        raise ValueError(f"the mask range must be a power of two in [2, 2^32], got {num_range}")
    sizes = [int(np.prod(d)) if len(d) else 1 for d in dimensions_list]
    key = hashlib.sha256(_TAG + bytes(seed)).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
    stream = encryptor.update(b"\x00" * (4 * sum(sizes))) + encryptor.finalize()
    words = np.frombuffer(stream, dtype="<u4").astype(np.int64) & (num_range - 1)
    out, at = [], 0
    for dims, size in zip(dimensions_list, sizes):
        chunk = words[at:at + size]
        out.append(np.array(chunk[0], dtype=np.int64) if len(dims) == 0 else chunk.reshape(dims))
        at += size
    return out


def install() -> None:
    """Make Flower's SecAgg+ client mod and server workflow expand masks with :func:`mask_prg`
    (idempotent; call in every process that runs either)."""
    import importlib

    # by module path: the package re-exports a function of the same name as the client module
    for name in ("flwr.client.mod.secure_aggregation.secaggplus_mod",
                 "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):
        module = importlib.import_module(name)
        if not hasattr(module, "pseudo_rand_gen"):
            raise ImportError(f"{module.__name__} has no pseudo_rand_gen: this Flower version is not supported "
                              f"(Veil is tested with flwr 1.41)")
        module.pseudo_rand_gen = mask_prg
