"""Encrypted inference with homomorphic encryption (CKKS, Microsoft SEAL through TenSEAL): the client
keeps the secret key, one untrusted server evaluates an HE-friendly network on ciphertexts.

:mod:`veil.he.models` (what CKKS can evaluate, conversion from ``torch.nn.Module``),
:mod:`veil.he.keys` (parameters at 128-bit security, keys, key and ciphertext files),
:mod:`veil.he.batched` (one image per slot: many images at once), :mod:`veil.he.latency` (one image,
few ciphertexts, rotations).
"""

from veil.he.models import HEError, Plan, Poly, Square, he_lenet, run_plan, to_plan, train_he_model

__all__ = ["HEError", "Plan", "Poly", "Square", "he_lenet", "run_plan", "to_plan", "train_he_model"]
