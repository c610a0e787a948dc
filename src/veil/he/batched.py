"""Batched encrypted inference: one image per slot (the CryptoNets packing).

The client encrypts feature ``i`` of up to ``N / 2`` images into ciphertext ``i`` (slot ``k`` holds
image ``k``). Every affine layer is then, for each output, a weighted sum of ciphertexts by public
scalars (no rotation, so no Galois key), and an activation ``a x^2 + b x`` squares whole
ciphertexts. The work does not depend on how many images share the slots: amortised over a full
batch, a few milliseconds per image.

Scales are kept exact, not approximated: an affine layer encodes its weights at the scale
``2^scale_bits * q / S_in`` so that after the rescale by the level's prime ``q`` its outputs have the
scale ``2^scale_bits`` exactly; an activation computes ``x^2 + (b / a) x`` (both terms at ``S^2 / q``)
and folds ``a`` into the next affine layer's weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from veil.he.keys import Keys
from veil.he.models import Activation, Affine, HEError, Plan


def exact_scale(keys: Keys, ct: Any) -> float:
    """The scale to encode plaintext factors of ``ct`` at, so that the product, rescaled by its level's
    prime ``q``, has the scale ``2^scale_bits`` exactly: ``2^scale_bits * q / scale(ct)``."""
    data = keys.context.get_context_data(ct.parms_id())
    return 2.0 ** keys.params.scale_bits * float(data.parms().coeff_modulus()[-1].value()) / ct.scale


def sum_of_products(evaluator: Any, terms: Iterable[tuple[Any, Any]]) -> Any | None:
    """``sum ct * pt`` over ``terms`` (ciphertext, plaintext) pairs, not rescaled; None if there are none.
    ``terms`` may be a generator that reuses one plaintext: each is used before the next is drawn."""
    import tenseal.sealapi as seal

    acc = None
    for ct, pt in terms:
        term = seal.Ciphertext()
        evaluator.multiply_plain(ct, pt, term)
        if acc is None:
            acc = term
        else:
            evaluator.add_inplace(acc, term)
    return acc


@dataclass
class Encrypted:
    """Ciphertexts of a batch: ``features`` ciphertexts, ``count`` images in their slots."""

    cts: list[Any]
    count: int
    key_id: str


def encrypt_batch(keys: Keys, x: torch.Tensor) -> Encrypted:
    """Client: ``x`` of shape ``(B, ...)`` with ``B <= N/2``, one ciphertext per feature."""
    import tenseal.sealapi as seal

    x = torch.as_tensor(x, dtype=torch.float64).reshape(len(x), -1)
    if len(x) == 0 or len(x) > keys.params.slots:
        raise HEError(f"a batch holds 1..{keys.params.slots} images (N/2 slots), got {len(x)}")
    if not torch.isfinite(x).all():
        raise HEError("NaN or infinite values cannot be encrypted")
    encoder = seal.CKKSEncoder(keys.context)
    encryptor = seal.Encryptor(keys.context, keys.public)
    scale = 2.0 ** keys.params.scale_bits
    cols = np.ascontiguousarray(x.T.numpy())
    cts = []
    for column in cols:
        pt = seal.Plaintext()
        encoder.encode(column.tolist(), scale, pt)
        ct = seal.Ciphertext()
        encryptor.encrypt(pt, ct)
        cts.append(ct)
    return Encrypted(cts, len(x), keys.key_id)


def decrypt_batch(keys: Keys, enc: Encrypted) -> torch.Tensor:
    """Client: ``(count, features)`` float64 values."""
    import tenseal.sealapi as seal

    if not keys.is_private:
        raise HEError("decryption needs the client key file (the secret key)")
    if enc.key_id != keys.key_id:
        raise HEError(f"ciphertexts of key {enc.key_id}, this is key {keys.key_id}: wrong key")
    encoder = seal.CKKSEncoder(keys.context)
    decryptor = seal.Decryptor(keys.context, keys.secret)
    out = []
    for ct in enc.cts:
        pt = seal.Plaintext()
        decryptor.decrypt(ct, pt)
        out.append(encoder.decode_double(pt)[:enc.count])
    return torch.tensor(out, dtype=torch.float64).T.contiguous()


class BatchedEvaluator:
    """Server: evaluates a :class:`Plan` on :class:`Encrypted` batches with the server's keys."""

    def __init__(self, keys: Keys, plan: Plan) -> None:
        import tenseal.sealapi as seal

        if plan.depth > keys.params.depth:
            raise HEError(f"the model needs {plan.depth} multiplicative levels, the parameters give "
                          f"{keys.params.depth}: use more primes (or a larger N for the budget)")
        self.keys, self.plan = keys, plan
        self.seal = seal
        self.encoder = seal.CKKSEncoder(keys.context)
        self.evaluator = seal.Evaluator(keys.context)
        self.target = 2.0 ** keys.params.scale_bits

    def __call__(self, enc: Encrypted) -> Encrypted:
        if enc.key_id != self.keys.key_id:
            raise HEError(f"ciphertexts of key {enc.key_id}, the server holds key {self.keys.key_id}")
        first = self.plan.steps[0]
        if isinstance(first, Affine) and len(enc.cts) != first.shape[1]:
            raise HEError(f"the model takes {first.shape[1]} features, got {len(enc.cts)} ciphertexts")
        h, fold = enc.cts, 1.0
        for step in self.plan.steps:
            if isinstance(step, Affine):
                h = self._affine(h, step.weight * fold, step.bias)
                fold = 1.0
            else:
                h, fold = self._activation(h, step)
        return Encrypted(h, enc.count, enc.key_id)

    def _affine(self, h: list[Any], weight: torch.Tensor, bias: torch.Tensor) -> list[Any]:
        seal, ev, enc = self.seal, self.evaluator, self.encoder
        parms, delta = h[0].parms_id(), exact_scale(self.keys, h[0])
        w = weight.numpy()
        out = []
        pt = seal.Plaintext()

        def terms(row: np.ndarray) -> Iterator[tuple[Any, Any]]:
            for i in np.flatnonzero(row):
                enc.encode(float(row[i]), parms, delta, pt)
                yield h[i], pt

        for row, b in zip(w, bias.tolist(), strict=True):
            acc = sum_of_products(ev, terms(row))
            if acc is None:  # an all-zero row: the bias alone
                raise HEError("an output with all-zero weights (prune it from the model)")
            ev.rescale_to_next_inplace(acc)
            acc.scale = self.target
            enc.encode(float(b), acc.parms_id(), acc.scale, pt)
            ev.add_plain_inplace(acc, pt)
            out.append(acc)
        return out

    def _activation(self, h: list[Any], step: Activation) -> tuple[list[Any], float]:
        """``a x^2 + b x = a (x^2 + (b/a) x)``: returns the bracket and ``a`` (folded forward)."""
        seal, ev, enc = self.seal, self.evaluator, self.encoder
        if step.a == 0:
            raise HEError(f"{step.source}: a linear activation (a = 0) should be merged into its layers")
        ratio = step.b / step.a
        out = []
        pt = seal.Plaintext()
        for ct in h:
            sq = seal.Ciphertext()
            ev.square(ct, sq)
            ev.relinearize_inplace(sq, self.keys.relin)
            if ratio != 0:
                enc.encode(ratio, ct.parms_id(), ct.scale, pt)
                lin = seal.Ciphertext()
                ev.multiply_plain(ct, pt, lin)
                ev.add_inplace(sq, lin)  # both at scale S^2, same level
            ev.rescale_to_next_inplace(sq)
            out.append(sq)
        return out, step.a
