"""Encrypted inputs and outputs of either mode, as one object, one file format and one message format.

A :class:`CiphertextSet` is what travels between client and server: groups of ciphertexts, one group
per batch (``batched`` mode: a ciphertext per feature, up to ``N / 2`` images in the slots) or per
image (``latency`` mode). :func:`encrypt` (client), :func:`evaluate` (server) and :func:`decrypt`
(client) work on whole sets; :func:`pack`/:func:`unpack` turn a set into the bytes of a Veil HE
container (the same bytes whether written to a file or sent to the server), checked on the way in
against the key id, the parameters and every ciphertext's digest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from veil.he.keys import HEParams, Keys, from_bytes, read_file, to_bytes, unpack_container
from veil.he.models import HEError, Plan

MODES = ("batched", "latency")


@dataclass
class CiphertextSet:
    """``groups[g]`` holds the ciphertexts of batch or image ``g``; ``counts[g]`` its images.
    ``stage`` is ``input`` (the client's images) or ``output`` (the server's logits, ``outputs`` per image)."""

    mode: str
    key_id: str
    params: HEParams
    groups: list[list[Any]]
    counts: list[int]
    stage: str = "input"
    outputs: int | None = None

    @property
    def images(self) -> int:
        return sum(self.counts)


def encrypt(keys: Keys, x: torch.Tensor, mode: str, plan: Plan | None = None,
            progress: Callable[[int], None] | None = None) -> CiphertextSet:
    """Client: images ``x`` of shape ``(N, ...)``. Latency mode needs the plan (its :func:`~veil.he.models.skeleton`
    is enough: the layout depends on the architecture only)."""
    from veil.he.batched import encrypt_batch
    from veil.he.latency import encrypt_image, input_layout

    _check_mode(mode)
    x = torch.as_tensor(x)
    if len(x) == 0:
        raise HEError("no images to encrypt")
    if plan is not None:
        want = 1
        for d in plan.input_shape:
            want *= d
        if x[0].numel() != want:
            raise HEError(f"the model takes inputs of shape {tuple(plan.input_shape)} ({want} values), "
                          f"these have shape {tuple(x.shape[1:])}")
    groups, counts = [], []
    if mode == "batched":
        for start in range(0, len(x), keys.params.slots):
            batch = encrypt_batch(keys, x[start:start + keys.params.slots])
            groups.append(batch.cts)
            counts.append(batch.count)
            if progress:
                progress(batch.count)
    else:
        if plan is None:
            raise HEError("latency mode lays each image out by the model's architecture: give its description "
                          "(`veil he describe`, --model-description; in Python, the plan or its skeleton)")
        layout = input_layout(plan, keys.params.slots)
        for image in x:
            groups.append(encrypt_image(keys, layout, image))
            counts.append(1)
            if progress:
                progress(1)
    return CiphertextSet(mode, keys.key_id, keys.params, groups, counts)


def evaluate(keys: Keys, plan: Plan, cset: CiphertextSet, progress: Callable[[int], None] | None = None
             ) -> CiphertextSet:
    """Server: the plan on every group, with the server's keys (no secret key needed or used)."""
    from veil.he.batched import BatchedEvaluator, Encrypted
    from veil.he.latency import LatencyEvaluator

    _check_mode(cset.mode)
    if cset.stage != "input":
        raise HEError("these ciphertexts are already the output of a model")
    if cset.key_id != keys.key_id:
        raise HEError(f"ciphertexts of key {cset.key_id}, the server holds key {keys.key_id}: wrong key")
    groups = []
    if cset.mode == "batched":
        batched = BatchedEvaluator(keys, plan)
        for cts, count in zip(cset.groups, cset.counts, strict=True):
            groups.append(batched(Encrypted(cts, count, cset.key_id)).cts)
            if progress:
                progress(count)
    else:
        single = LatencyEvaluator(keys, plan)
        for cts in cset.groups:
            groups.append([single(cts)])
            if progress:
                progress(1)
    return CiphertextSet(cset.mode, cset.key_id, cset.params, groups, list(cset.counts), "output", plan.outputs)


def decrypt(keys: Keys, cset: CiphertextSet) -> torch.Tensor:
    """Client: the logits, ``(images, outputs)`` float64."""
    from veil.he.batched import Encrypted, decrypt_batch
    from veil.he.latency import decrypt_logits

    if cset.stage != "output" or cset.outputs is None:
        raise HEError("these are encrypted inputs, not a model's outputs: send them to the server first")
    if not keys.is_private:
        raise HEError("decryption needs the client key file (the secret key)")
    if cset.key_id != keys.key_id:
        raise HEError(f"ciphertexts of key {cset.key_id}, this is key {keys.key_id}: wrong key")
    if cset.mode == "batched":
        parts = [decrypt_batch(keys, Encrypted(cts, count, cset.key_id))
                 for cts, count in zip(cset.groups, cset.counts, strict=True)]
    else:
        parts = [decrypt_logits(keys, cts[0], cset.outputs)[None] for cts in cset.groups]
    return torch.cat(parts)


# ---- bytes and files ------------------------------------------------------------------------------
def pack(cset: CiphertextSet) -> bytes:
    from veil.he.keys import pack_container

    header = {"kind": "ciphertexts", "mode": cset.mode, "stage": cset.stage, "key_id": cset.key_id,
              "params": cset.params.as_dict(), "counts": list(cset.counts), "sizes": [len(g) for g in cset.groups],
              "outputs": cset.outputs}
    blobs = {f"g{g:06d}c{c:06d}": to_bytes(ct) for g, cts in enumerate(cset.groups) for c, ct in enumerate(cts)}
    return pack_container(header, blobs)


def unpack(data: bytes, keys: Keys, where: str) -> CiphertextSet:
    """A set from :func:`pack`'s bytes, checked against ``keys`` (key id and parameters)."""
    import tenseal.sealapi as seal

    header, blobs = unpack_container(data, "ciphertexts", where)
    if header.get("key_id") != keys.key_id:
        raise HEError(f"{where}: encrypted under key {header.get('key_id')}, this is key {keys.key_id}: wrong key")
    if HEParams.from_dict(header.get("params", {})) != keys.params:
        raise HEError(f"{where}: encrypted with other parameters ({header.get('params')}) than the keys'")
    try:
        mode, stage = header["mode"], header["stage"]
        counts, sizes = [int(c) for c in header["counts"]], [int(s) for s in header["sizes"]]
        outputs = None if header.get("outputs") is None else int(header["outputs"])
    except (KeyError, TypeError, ValueError) as e:
        raise HEError(f"{where}: damaged header ({type(e).__name__}: {e})") from None
    _check_mode(mode)
    if stage not in ("input", "output") or len(counts) != len(sizes) or any(c < 1 for c in counts) \
            or sum(sizes) != len(blobs) or (stage == "output") != (outputs is not None):
        raise HEError(f"{where}: the header does not describe its ciphertexts (damaged)")
    groups = []
    for g, size in enumerate(sizes):
        names = [f"g{g:06d}c{c:06d}" for c in range(size)]
        if any(n not in blobs for n in names):
            raise HEError(f"{where}: group {g} is incomplete (damaged)")
        groups.append([from_bytes(seal.Ciphertext, keys.context, blobs[n], f"{where}: {n}") for n in names])
    return CiphertextSet(mode, header["key_id"], keys.params, groups, counts, stage, outputs)


def save(cset: CiphertextSet, path: str | Path) -> Path:
    """Write ``cset`` atomically (not secret: ciphertexts; mode 0644)."""
    from veil.files import write_atomic

    write_atomic(path, pack(cset))
    return Path(path)


def load(path: str | Path, keys: Keys) -> CiphertextSet:
    return unpack(read_file(path), keys, str(path))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise HEError(f"mode must be one of {MODES}, got {mode!r}")
