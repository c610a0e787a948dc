"""Encrypted MNIST inference with CKKS (``veil.he``): batched and single-image latency modes.

Trains the HE-friendly LeNet (``he_lenet``: conv 8@5x5 stride 2, square, fc 100, square, fc 10;
cached in ``--cache``), makes keys at 128-bit security, and measures on the MNIST test set:

* ``mode: batched``: one image per slot, batches of up to 4,096 images (``--batched-images``, default
  all 10,000);
* ``mode: latency``: one image at a time (``--latency-images``, default 20).

One JSON line per mode, with the keys of :func:`veil.he.bench.measure` (``veil he bench`` runs the
same code): ``images``, ``seconds`` (client encryption + server + client decryption),
``seconds_per_image``, ``accuracy`` (decrypted), ``plaintext_accuracy`` and ``plaintext_seconds``
(the same network in PyTorch), ``ciphertext_bytes_in`` / ``_out`` (per image), ``max_abs_error``,
``security_bits``, ...

    python benchmarks/he_inference.py                      # both modes (about 5 minutes on 2 cores)
    python benchmarks/he_inference.py --batched-images 512 --latency-images 5    # a smoke run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from veil.data.mnist import load_mnist
from veil.he.bench import default_model, measure
from veil.he.keys import HEParams, keygen
from veil.he.latency import rotation_steps
from veil.he.models import to_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batched-images", type=int, default=10000)
    ap.add_argument("--latency-images", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=Path(".cache/he"))
    args = ap.parse_args()
    model, _ = default_model(args.cache, epochs=args.epochs)
    plan = to_plan(model, (1, 28, 28))
    xt, yt = load_mnist("test", normalize=False)
    params = HEParams()
    keys = keygen(params, rotation_steps(plan, params.slots))
    for mode, n in (("batched", args.batched_images), ("latency", args.latency_images)):
        if n:
            n = min(n, len(xt))
            print(json.dumps(measure(keys, plan, model, xt[:n], yt[:n], mode)), flush=True)


if __name__ == "__main__":
    main()
