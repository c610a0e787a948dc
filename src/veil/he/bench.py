"""Measurements of encrypted inference (``veil he bench``, ``benchmarks/he_inference.py``).

:func:`measure` runs one mode on images with labels, in one process (client and server alike; the
network demo is ``veil he demo``), and returns one JSON-ready dict: ``images``, ``seconds`` (client
encryption + server + client decryption), ``seconds_per_image``, ``server_seconds``,
``encrypt_seconds``, ``decrypt_seconds``, ``accuracy`` (decrypted), ``plaintext_accuracy`` and
``plaintext_seconds`` (the same network in PyTorch on the same images), ``agreement_with_plaintext``,
``ciphertext_bytes_in`` / ``_out`` (per image: the bytes of the request and reply messages, which are
also the ciphertext files' sizes), ``max_abs_error`` (decrypted logits against the plaintext plan),
``security_bits``, ``poly_modulus_degree``, ``server_key_bytes``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from veil.he import ciphertexts
from veil.he.keys import Keys, server_key_bytes
from veil.he.models import Plan, he_lenet, run_plan, save_he_model, train_he_model


def default_model(cache: str | Path, *, epochs: int = 8, progress: bool = True) -> tuple[nn.Module, Path]:
    """The benchmark network: :func:`~veil.he.models.he_lenet` trained on MNIST for ``epochs``,
    cached as a model file in ``cache`` (trained once, about 20 s per epoch here)."""
    from veil.data.mnist import load_mnist
    from veil.he.models import load_he_model

    path = Path(cache) / f"he_lenet-{epochs}ep.model.pt"
    if path.exists():
        return load_he_model(path)[0], path
    x, y = load_mnist("train", normalize=False)
    model = train_he_model(he_lenet(), x, y, epochs=epochs, progress=progress)
    xt, yt = load_mnist("test", normalize=False)
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    save_he_model(model, path, input_shape=(1, 28, 28), config={}, metrics={"test_accuracy": accuracy,
                                                                            "epochs": epochs})
    return model, path


def measure(keys: Keys, plan: Plan, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, *,
            progress: bool = True) -> dict[str, Any]:
    """One mode on ``x`` (client keys: they hold the secret key and the evaluation keys)."""
    chunk = keys.params.slots if mode == "batched" else 1
    enc_s = srv_s = dec_s = 0.0
    bytes_in = bytes_out = 0
    logits = []
    bar = tqdm(total=len(x), desc=f"encrypted inference ({mode})", unit="image", disable=not progress, leave=False)
    for start in range(0, len(x), chunk):
        xb = x[start:start + chunk]
        t = time.perf_counter()
        request = ciphertexts.encrypt(keys, xb, mode, plan)
        enc_s += time.perf_counter() - t
        bytes_in += len(ciphertexts.pack(request))
        t = time.perf_counter()
        reply = ciphertexts.evaluate(keys, plan, request)
        srv_s += time.perf_counter() - t
        bytes_out += len(ciphertexts.pack(reply))
        t = time.perf_counter()
        logits.append(ciphertexts.decrypt(keys, reply))
        dec_s += time.perf_counter() - t
        bar.update(len(xb))
    bar.close()
    got = torch.cat(logits)
    with torch.no_grad():
        t = time.perf_counter()
        plain = model.eval()(x)
        plain_s = time.perf_counter() - t
    n, total = len(x), enc_s + srv_s + dec_s
    preds, plain_preds = got.argmax(1), plain.argmax(1)
    return {
        "mode": mode, "images": n, "seconds": round(total, 3), "seconds_per_image": round(total / n, 4),
        "server_seconds": round(srv_s, 3), "encrypt_seconds": round(enc_s, 3), "decrypt_seconds": round(dec_s, 4),
        "accuracy": round(float((preds == y).float().mean()), 4),
        "plaintext_accuracy": round(float((plain_preds == y).float().mean()), 4),
        "plaintext_seconds": round(plain_s, 4),
        "agreement_with_plaintext": round(float((preds == plain_preds).float().mean()), 4),
        "ciphertext_bytes_in": bytes_in // n, "ciphertext_bytes_out": bytes_out // n,
        "max_abs_error": round(float((got - run_plan(plan, x)).abs().max()), 6),
        "security_bits": keys.params.security_bits, "poly_modulus_degree": keys.params.poly_modulus_degree,
        "server_key_bytes": len(server_key_bytes(keys)),
    }
