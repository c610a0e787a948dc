"""Single-image encrypted inference: one image, a few ciphertexts, rotations (low latency).

Layout, for a :class:`~veil.he.models.Plan` whose first layer is a convolution (or any affine layer):

* **first layer, no rotation of the input.** The client lays its image out by the layer's public
  *gather table* (for a convolution: which pixel each output reads at each kernel tap; for a dense
  layer: every pixel). Tap ``t`` of output ``o`` goes to slot ``r * P + o`` of ciphertext
  ``t // R`` (``r = t % R``), where ``P`` is the outputs rounded up to a power of two and ``R = slots / P``
  taps share a ciphertext. The server multiplies each ciphertext by the matching weights and sums the
  ``R`` blocks with ``log2 R`` rotations: every block then holds the layer's output, so the vector
  is periodic with period ``P``.
* **later affine layers: hybrid diagonals with baby-step giant-step rotations** (Juvekar et al.
  2018, Halevi-Shoup). For an ``m x n`` matrix padded to powers of two ``m_p <= n_p`` and a
  ``n_p``-periodic input, ``sum_i diag_i * rot(v, i)`` over ``i < m_p`` (``2 sqrt(m_p)`` rotations),
  then ``log2(n_p / m_p)`` rotate-and-adds: the output is ``m_p``-periodic, ready for the next layer.
* **activations**: ``x^2 + (b/a) x`` on the whole ciphertext, ``a`` folded into the next layer.

Scales stay exact as in :mod:`veil.he.batched`. The client needs Galois keys for
:func:`rotation_steps` only (about 30 at MNIST size, a few MB each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from veil.he.batched import exact_scale, sum_of_products
from veil.he.keys import Keys
from veil.he.models import Activation, Affine, HEError, Plan


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@dataclass(frozen=True)
class InputLayout:
    """Public: how the client lays out one image (from the model's architecture, not its weights)."""

    gather: np.ndarray  # (outputs, taps) indices into the flattened input; -1 reads a zero (padding)
    period: int  # P: the first layer's outputs rounded up to a power of two
    per_ct: int  # R: taps per ciphertext

    @property
    def taps(self) -> int:
        return int(self.gather.shape[1])

    @property
    def ciphertexts(self) -> int:
        return -(-self.taps // self.per_ct)


def input_layout(plan: Plan, slots: int) -> InputLayout:
    first = plan.steps[0]
    assert isinstance(first, Affine)
    m, n = first.shape
    if first.conv is not None:
        gather = _conv_gather(first.conv)
    else:
        gather = np.tile(np.arange(n), (m, 1))
    if gather.shape[0] != m:
        raise HEError(f"{first.source}: the convolution's windows ({gather.shape[0]}) do not match its {m} outputs")
    period = _pow2(m)
    if period > slots:
        raise HEError(f"{first.source}: {m} outputs do not fit in {slots} slots: use a larger N or fewer channels")
    return InputLayout(gather, period, slots // period)


def _conv_gather(conv: dict) -> np.ndarray:
    cin, h, w = conv["in_shape"]
    kh, kw = conv["kernel"]
    sh, sw = conv["stride"]
    ph, pw = conv["padding"]
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    rows = []
    for _c in range(conv["channels"]):
        for i in range(oh):
            for j in range(ow):
                taps = []
                for ci in range(cin):
                    for a in range(kh):
                        for b in range(kw):
                            y, x = i * sh - ph + a, j * sw - pw + b
                            taps.append(ci * h * w + y * w + x if 0 <= y < h and 0 <= x < w else -1)
                rows.append(taps)
    return np.array(rows, dtype=np.int64)


def rotation_steps(plan: Plan, slots: int) -> list[int]:
    """The Galois steps :class:`LatencyEvaluator` rotates by (for :func:`veil.he.keys.keygen`)."""
    layout = input_layout(plan, slots)
    steps = {layout.period * 2 ** j for j in range(int(math.log2(layout.per_ct)))}
    period = layout.period
    for step in plan.steps[1:]:
        if isinstance(step, Affine):
            m_p = _pow2(step.shape[0])
            n_p = max(period, m_p)
            baby = _pow2(math.isqrt(m_p - 1) + 1) if m_p > 1 else 1
            steps |= set(range(1, min(baby, m_p)))
            steps |= set(range(baby, m_p, baby))
            steps |= {m_p * 2 ** j for j in range(int(math.log2(n_p // m_p)))}
            period = m_p
    return sorted(s for s in steps if s % slots)


def encrypt_image(keys: Keys, layout: InputLayout, x: torch.Tensor) -> list[Any]:
    """Client: one image (any shape, flattened) into ``layout.ciphertexts`` ciphertexts."""
    import tenseal.sealapi as seal

    flat = torch.as_tensor(x, dtype=torch.float64).reshape(-1).numpy()
    if not np.isfinite(flat).all():
        raise HEError("NaN or infinite values cannot be encrypted")
    if layout.gather.max() >= len(flat):
        raise HEError(f"the model reads {int(layout.gather.max()) + 1} input values, the image has {len(flat)}")
    values = np.where(layout.gather >= 0, flat[np.clip(layout.gather, 0, None)], 0.0)  # (outputs, taps)
    encoder = seal.CKKSEncoder(keys.context)
    encryptor = seal.Encryptor(keys.context, keys.public)
    scale = 2.0 ** keys.params.scale_bits
    cts = []
    for c in range(layout.ciphertexts):
        slots = np.zeros(keys.params.slots)
        for r in range(layout.per_ct):
            t = c * layout.per_ct + r
            if t < layout.taps:
                slots[r * layout.period:r * layout.period + len(values)] = values[:, t]
        pt = seal.Plaintext()
        encoder.encode(slots.tolist(), scale, pt)
        ct = seal.Ciphertext()
        encryptor.encrypt(pt, ct)
        cts.append(ct)
    return cts


def decrypt_logits(keys: Keys, ct: Any, outputs: int) -> torch.Tensor:
    import tenseal.sealapi as seal

    if not keys.is_private:
        raise HEError("decryption needs the client key file (the secret key)")
    pt = seal.Plaintext()
    seal.Decryptor(keys.context, keys.secret).decrypt(ct, pt)
    return torch.tensor(seal.CKKSEncoder(keys.context).decode_double(pt)[:outputs], dtype=torch.float64)


class LatencyEvaluator:
    """Server: a :class:`Plan` on one image's ciphertexts, with the server's keys (Galois keys of
    :func:`rotation_steps`)."""

    def __init__(self, keys: Keys, plan: Plan) -> None:
        import tenseal.sealapi as seal

        if plan.depth > keys.params.depth:
            raise HEError(f"the model needs {plan.depth} multiplicative levels, the parameters give "
                          f"{keys.params.depth}")
        slots = keys.params.slots
        missing = sorted(set(rotation_steps(plan, slots)) - set(keys.galois_steps))
        if missing:
            raise HEError(f"the server keys lack Galois keys for rotation steps {missing}: make the keys with "
                          "galois_steps=rotation_steps(plan, slots)")
        self.keys, self.plan, self.seal = keys, plan, seal
        self.slots = slots
        self.layout = input_layout(plan, slots)
        self.encoder = seal.CKKSEncoder(keys.context)
        self.ev = seal.Evaluator(keys.context)
        self.target = 2.0 ** keys.params.scale_bits
        self._first = self._first_weights(plan.steps[0])

    def _first_weights(self, first: Affine) -> np.ndarray:
        """Per ciphertext, the slot vector of first-layer weights; checks the layout covers W."""
        lay, w = self.layout, first.weight.numpy()
        rows = np.arange(w.shape[0])[:, None]
        taps = np.where(lay.gather >= 0, w[rows, np.clip(lay.gather, 0, None)], 0.0)
        covered = np.zeros_like(w)
        np.add.at(covered, (np.broadcast_to(rows, lay.gather.shape)[lay.gather >= 0], lay.gather[lay.gather >= 0]),
                  taps[lay.gather >= 0])
        if not np.allclose(covered, w):
            raise HEError(f"{first.source}: weights outside the convolution's windows (a layout mismatch)")
        out = np.zeros((lay.ciphertexts, self.slots))
        for t in range(lay.taps):
            c, r = divmod(t, lay.per_ct)
            out[c, r * lay.period:r * lay.period + len(taps)] = taps[:, t]
        return out

    def __call__(self, cts: list[Any]) -> Any:
        if len(cts) != self.layout.ciphertexts:
            raise HEError(f"the model takes {self.layout.ciphertexts} ciphertexts per image, got {len(cts)}")
        first = self.plan.steps[0]
        assert isinstance(first, Affine)
        h = self._sum_products(cts, list(self._first))
        for s in (self.layout.period * 2 ** j for j in range(int(math.log2(self.layout.per_ct)))):
            self._add_rotated(h, s)
        self._add_bias(h, first.bias.numpy(), self.layout.period)
        period, fold = self.layout.period, 1.0
        for step in self.plan.steps[1:]:
            if isinstance(step, Affine):
                h, period = self._hybrid(h, step.weight.numpy() * fold, step.bias.numpy(), period), _pow2(step.shape[0])
                fold = 1.0
            else:
                h, fold = self._activation(h, step)
        return h

    # -- pieces ---------------------------------------------------------------------------------
    def _encode(self, values: np.ndarray, ct: Any, scale: float) -> Any:
        pt = self.seal.Plaintext()
        self.encoder.encode(values.tolist(), ct.parms_id(), scale, pt)
        return pt

    def _sum_products(self, cts: list[Any], weights: list[np.ndarray]) -> Any:
        """``sum_k cts[k] * weights[k]``, rescaled once to the scale 2^s."""
        delta = exact_scale(self.keys, cts[0])
        acc = sum_of_products(self.ev, ((ct, self._encode(w, ct, delta)) for ct, w in zip(cts, weights, strict=True)
                                        if w.any()))
        if acc is None:
            raise HEError("a layer whose weights are all zero")
        self.ev.rescale_to_next_inplace(acc)
        acc.scale = self.target
        return acc

    def _rotated(self, ct: Any, step: int) -> Any:
        out = self.seal.Ciphertext()
        self.ev.rotate_vector(ct, step, self.keys.galois, out)
        return out

    def _add_rotated(self, ct: Any, step: int) -> None:
        self.ev.add_inplace(ct, self._rotated(ct, step))

    def _add_bias(self, ct: Any, bias: np.ndarray, period: int) -> None:
        tile = np.zeros(period)
        tile[:len(bias)] = bias
        self.ev.add_plain_inplace(ct, self._encode(np.tile(tile, self.slots // period), ct, ct.scale))

    def _hybrid(self, v: Any, w: np.ndarray, bias: np.ndarray, period: int) -> Any:
        m, n = w.shape
        m_p = _pow2(m)
        n_p = max(period, m_p)
        if n > period:
            raise HEError(f"a layer reads {n} values, its input has {period} slots per period")
        wp = np.zeros((m_p, n_p))
        wp[:m, :n] = w
        k = np.arange(n_p)
        baby = _pow2(math.isqrt(m_p - 1) + 1) if m_p > 1 else 1
        reps = self.slots // n_p
        rotated = {0: v}
        for a in range(1, min(baby, m_p)):
            rotated[a] = self._rotated(v, a)
        delta = exact_scale(self.keys, v)
        acc = None
        for g in range(0, m_p, baby):
            # diag_{g+a}[k] = wp[k, k + g + a], pre-rotated by -g
            pres = ((a, np.roll(np.tile(wp[k % m_p, (k + g + a) % n_p], reps), g)) for a in range(min(baby, m_p - g)))
            inner = sum_of_products(self.ev, ((rotated[a], self._encode(pre, v, delta)) for a, pre in pres
                                              if pre.any()))
            if inner is None:
                continue
            if g:
                inner = self._rotated(inner, g)
            if acc is None:
                acc = inner
            else:
                self.ev.add_inplace(acc, inner)
        if acc is None:
            raise HEError("a layer whose weights are all zero")
        self.ev.rescale_to_next_inplace(acc)
        acc.scale = self.target
        s = m_p
        while s < n_p:
            self._add_rotated(acc, s)
            s *= 2
        self._add_bias(acc, bias, m_p)
        return acc

    def _activation(self, ct: Any, step: Activation) -> tuple[Any, float]:
        if step.a == 0:
            raise HEError(f"{step.source}: a linear activation (a = 0) should be merged into its layers")
        sq = self.seal.Ciphertext()
        self.ev.square(ct, sq)
        self.ev.relinearize_inplace(sq, self.keys.relin)
        ratio = step.b / step.a
        if ratio != 0:
            lin = self.seal.Ciphertext()
            self.ev.multiply_plain(ct, self._encode(np.full(self.slots, ratio), ct, ct.scale), lin)
            self.ev.add_inplace(sq, lin)
        self.ev.rescale_to_next_inplace(sq)
        return sq, step.a
