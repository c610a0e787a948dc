"""Encrypted MNIST inference with CKKS (``veil.he``): batched and single-image latency modes.

Trains the HE-friendly LeNet (``he_lenet``: conv 8@5x5 stride 2, square, fc 100, square, fc 10;
cached in ``--cache``), makes keys at 128-bit security, and measures on the MNIST test set:

* ``mode: batched``: one image per slot, batches of up to 4,096 images (``--batched-images``, default
  all 10,000);
* ``mode: latency``: one image at a time (``--latency-images``, default 20).

One JSON line per mode: ``images``, ``seconds`` (client encryption + server + client decryption),
``seconds_per_image``, ``server_seconds``, ``encrypt_seconds``, ``decrypt_seconds``, ``accuracy``
(decrypted), ``plaintext_accuracy`` (the same images, the same network in plaintext),
``plaintext_seconds`` (PyTorch on the same images), ``ciphertext_bytes_in`` / ``_out`` (per image;
per batch for batched mode, divided by its images), ``server_key_bytes``, ``max_abs_error`` (decrypted
logits against plaintext), ``security_bits``, ``poly_modulus_degree``.

    python benchmarks/he_inference.py                      # both modes (about 5 minutes on 2 cores)
    python benchmarks/he_inference.py --batched-images 512 --latency-images 5    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from veil.data.mnist import load_mnist
from veil.he.batched import BatchedEvaluator, decrypt_batch, encrypt_batch
from veil.he.keys import HEParams, keygen, to_bytes
from veil.he.latency import LatencyEvaluator, decrypt_logits, encrypt_image, rotation_steps
from veil.he.models import he_lenet, run_plan, to_plan, train_he_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batched-images", type=int, default=10000)
    ap.add_argument("--latency-images", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=Path(".cache/he"))
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    x, y = load_mnist("train", normalize=False)
    xt, yt = load_mnist("test", normalize=False)
    weights = args.cache / f"he_lenet-{args.epochs}ep.pt"
    model = he_lenet()
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
    else:
        train_he_model(model, x, y, epochs=args.epochs)
        torch.save(model.state_dict(), weights)
    model.eval()
    plan = to_plan(model, (1, 28, 28))
    params = HEParams()
    keys = keygen(params, rotation_steps(plan, params.slots))
    common = {"security_bits": params.security_bits, "poly_modulus_degree": params.poly_modulus_degree,
              "server_key_bytes": len(to_bytes(keys.public)) + len(to_bytes(keys.relin)) + len(to_bytes(keys.galois))}

    if args.batched_images:
        n = min(args.batched_images, len(xt))
        server = BatchedEvaluator(keys, plan)
        enc_s = srv_s = dec_s = 0.0
        bytes_in = bytes_out = 0
        preds, errors = [], []
        for start in range(0, n, params.slots):
            xb = xt[start:min(n, start + params.slots)]
            t = time.perf_counter()
            enc = encrypt_batch(keys, xb)
            enc_s += time.perf_counter() - t
            bytes_in += sum(len(to_bytes(ct)) for ct in enc.cts)
            t = time.perf_counter()
            out = server(enc)
            srv_s += time.perf_counter() - t
            bytes_out += sum(len(to_bytes(ct)) for ct in out.cts)
            t = time.perf_counter()
            logits = decrypt_batch(keys, out)
            dec_s += time.perf_counter() - t
            preds.append(logits.argmax(1))
            errors.append(float((logits - run_plan(plan, xb)).abs().max()))
        _emit("batched", n, enc_s, srv_s, dec_s, torch.cat(preds), xt[:n], yt[:n], model, plan,
              bytes_in / n, bytes_out / n, max(errors), common)

    if args.latency_images:
        n = min(args.latency_images, len(xt))
        server = LatencyEvaluator(keys, plan)
        enc_s = srv_s = dec_s = 0.0
        bytes_in = bytes_out = 0
        preds, errors = [], []
        for i in range(n):
            t = time.perf_counter()
            cts = encrypt_image(keys, server.layout, xt[i])
            enc_s += time.perf_counter() - t
            bytes_in += sum(len(to_bytes(ct)) for ct in cts)
            t = time.perf_counter()
            out = server(cts)
            srv_s += time.perf_counter() - t
            bytes_out += len(to_bytes(out))
            t = time.perf_counter()
            logits = decrypt_logits(keys, out, 10)
            dec_s += time.perf_counter() - t
            preds.append(int(logits.argmax()))
            errors.append(float((logits - run_plan(plan, xt[i:i + 1])[0]).abs().max()))
        _emit("latency", n, enc_s, srv_s, dec_s, torch.tensor(preds), xt[:n], yt[:n], model, plan,
              bytes_in / n, bytes_out / n, max(errors), common)


@torch.no_grad()
def _emit(mode, n, enc_s, srv_s, dec_s, preds, x, y, model, plan, b_in, b_out, err, common) -> None:
    t = time.perf_counter()
    plain = model(x).argmax(1)
    plain_s = time.perf_counter() - t
    total = enc_s + srv_s + dec_s
    print(json.dumps({
        "mode": mode, "images": n, "seconds": round(total, 3), "seconds_per_image": round(total / n, 4),
        "server_seconds": round(srv_s, 3), "encrypt_seconds": round(enc_s, 3), "decrypt_seconds": round(dec_s, 4),
        "accuracy": round(float((preds == y).float().mean()), 4),
        "plaintext_accuracy": round(float((plain == y).float().mean()), 4), "plaintext_seconds": round(plain_s, 4),
        "agreement_with_plaintext": round(float((preds == plain).float().mean()), 4),
        "ciphertext_bytes_in": int(b_in), "ciphertext_bytes_out": int(b_out), "max_abs_error": round(err, 6),
        **common}), flush=True)


if __name__ == "__main__":
    main()
