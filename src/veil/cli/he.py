"""``veil he``: encrypted inference with CKKS, one untrusted server, the secret key with the client.

File route (the client and the server exchange files)::

    veil he train --out model.pt                                   # anyone: an HE-friendly network
    veil he describe --model model.pt --out model.json             # server: the public architecture
    veil he keygen --model-description model.json --out keys/      # client: client.key (secret), server.key
    veil he encrypt --keys keys/client.key --data mnist --limit 100 --out x.veilct
    veil he infer --keys keys/server.key --model model.pt --in x.veilct --out y.veilct   # server
    veil he decrypt --keys keys/client.key --in y.veilct --labels mnist --limit 100       # client

Network route: ``veil he serve`` and ``veil he client`` (mutual TLS with ``veil keygen``
certificates); ``veil he demo`` runs both on this machine, the server as another user.
``veil he bench`` measures both modes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    from veil.cli import he_network  # it imports this module's helpers: import it once this one is loaded

    p = subparsers.add_parser(
        "he", help="encrypted inference with homomorphic encryption (CKKS): one untrusted server",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="he_command", metavar="STEP", required=True)

    t = sub.add_parser("train", help="train an HE-friendly network (he_lenet: conv, square, fc, square, fc)")
    data_args(t, split="train")
    t.add_argument("--out", required=True, type=Path, metavar="FILE", help="the model file to write")
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--channels", type=int, default=8)
    t.add_argument("--hidden", type=int, default=100)
    t.add_argument("--activation", choices=["square", "poly"], default="square",
                   help="square: x^2; poly: a x^2 + b x with trained a, b (default square)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)

    d = sub.add_parser("describe", help="server: the model's public architecture (no weights), for the client")
    model_args(d)
    d.add_argument("--out", required=True, type=Path, metavar="FILE.json")
    d.set_defaults(func=_describe)

    k = sub.add_parser("keygen", help="client: the secret key (client.key, 0600) and the server's keys (server.key)")
    k.add_argument("--out", required=True, type=Path, metavar="DIR", help="writes DIR/client.key and DIR/server.key")
    k.add_argument("--model-description", type=Path, metavar="FILE.json",
                   help="from `veil he describe`: makes the rotation keys latency mode needs for this model "
                        "(without it: keys for batched mode only)")
    k.add_argument("--poly-modulus-degree", type=int, default=8192, help="ring dimension N (default 8192)")
    k.add_argument("--coeff-mod-bits", default="38,28,28,28,28,28,38", metavar="B,B,...",
                   help="prime sizes of the coefficient modulus (default 38,28,28,28,28,28,38: 5 levels)")
    k.add_argument("--scale-bits", type=int, default=28, help="log2 of the CKKS scale (default 28)")
    k.set_defaults(func=_keygen)

    e = sub.add_parser("encrypt", help="client: encrypt images into a ciphertext file")
    e.add_argument("--keys", required=True, type=Path, metavar="FILE", help="the client key file")
    data_args(e, split="test")
    e.add_argument("--mode", choices=["batched", "latency"], default="batched",
                   help="batched: up to N/2 images per ciphertext; latency: a few ciphertexts per image")
    e.add_argument("--model-description", type=Path, metavar="FILE.json",
                   help="the server's `veil he describe` (needed for latency mode; checks the input shape)")
    e.add_argument("--out", required=True, type=Path, metavar="FILE")
    e.set_defaults(func=_encrypt)

    i = sub.add_parser("infer", help="server: run the model on a ciphertext file (no secret key involved)")
    i.add_argument("--keys", required=True, type=Path, metavar="FILE", help="the server key file")
    model_args(i)
    i.add_argument("--in", dest="inp", required=True, type=Path, metavar="FILE")
    i.add_argument("--out", required=True, type=Path, metavar="FILE")
    i.add_argument("--no-progress", action="store_true")
    i.set_defaults(func=_infer)

    c = sub.add_parser("decrypt", help="client: decrypt the server's reply into predictions")
    c.add_argument("--keys", required=True, type=Path, metavar="FILE", help="the client key file")
    c.add_argument("--in", dest="inp", required=True, type=Path, metavar="FILE")
    c.add_argument("--out", type=Path, metavar="FILE.npy", help="save the predicted classes here")
    c.add_argument("--logits", type=Path, metavar="FILE.npy", help="save the decrypted logits here")
    c.add_argument("--labels", metavar="SOURCE", help="the images' source (as given to encrypt): prints the accuracy")
    c.add_argument("--split", default="test", choices=["train", "test"])
    c.add_argument("--limit", type=int, metavar="N")
    c.add_argument("--mnist-path", metavar="PATH")
    c.set_defaults(func=_decrypt)

    he_network.add_parsers(sub)


def data_args(p: argparse.ArgumentParser, *, split: str) -> None:
    p.add_argument("--data", default="mnist", metavar="SOURCE", help="mnist, digits or a .npz/.npy/.pt file")
    p.add_argument("--split", default=split, choices=["train", "test"])
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    p.add_argument("--mnist-path", metavar="PATH", help="mnist.npz or a directory of IDX files")


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, metavar="FILE", help="a `veil he train` file or a state_dict")
    p.add_argument("--arch", metavar="package.module:Class", help="the architecture of a plain state_dict")
    p.add_argument("--input-shape", metavar="C,H,W", help="the input shape of a plain state_dict, e.g. 1,28,28")


def model_plan(args: argparse.Namespace) -> Any:
    from veil.he.models import load_he_model, to_plan

    shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
    model, input_shape, _ = load_he_model(args.model, architecture=args.arch, input_shape=shape)
    return to_plan(model, input_shape)


def _read_description(path: Path) -> Any:
    from veil.he.models import HEError, skeleton

    try:
        return skeleton(json.loads(path.read_text()))
    except FileNotFoundError:
        raise HEError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise HEError(f"{path}: not a model description (JSON: {e})") from None


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# ---- steps ------------------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    import time

    import torch

    from veil.data.images import load_pixels
    from veil.he.models import he_lenet, save_he_model, to_plan, train_he_model

    x, y = load_pixels(args.data, args.split, args.limit, mnist_path=args.mnist_path)
    if y is None:
        raise ValueError(f"{args.data}: has no labels, which training needs")
    if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]:
        raise ValueError(f"he_lenet takes square one-channel images (N, 1, S, S), got {tuple(x.shape)}")
    side = int(x.shape[-1])
    kernel, stride = (5, 2) if side >= 20 else (3, 1)
    config = {"channels": args.channels, "hidden": args.hidden, "activation": args.activation, "side": side,
              "classes": int(y.max()) + 1, "kernel": kernel, "stride": stride}
    t = time.perf_counter()
    model = train_he_model(he_lenet(**config), x, y, epochs=args.epochs, progress=not args.no_progress)
    minutes = (time.perf_counter() - t) / 60
    xt, yt = load_pixels(args.data, "test", mnist_path=args.mnist_path) if args.data in ("mnist", "digits") \
        else (x, y)
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    what = "test_accuracy" if args.data in ("mnist", "digits") else "train_accuracy"
    save_he_model(model, args.out, input_shape=tuple(x.shape[1:]), config=config,
                  metrics={what: accuracy, "epochs": args.epochs})
    emit({"model": str(args.out), what: round(accuracy, 4), "epochs": args.epochs, "minutes": round(minutes, 2),
            "depth": to_plan(model, tuple(x.shape[1:])).depth})
    return 0


def _describe(args: argparse.Namespace) -> int:
    from veil.files import write_atomic
    from veil.he.models import describe

    description = describe(model_plan(args))
    write_atomic(args.out, json.dumps(description, indent=1).encode())
    emit({"description": str(args.out), "input_shape": description["input_shape"], "depth": description["depth"],
            "outputs": description["outputs"]})
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from veil.he.keys import HEParams, keygen, save_keys, server_key_bytes
    from veil.he.latency import rotation_steps
    from veil.he.models import HEError

    try:
        bits = tuple(int(b) for b in args.coeff_mod_bits.split(","))
    except ValueError:
        raise HEError(f"--coeff-mod-bits {args.coeff_mod_bits!r}: expected comma-separated integers") from None
    params = HEParams(args.poly_modulus_degree, bits, args.scale_bits)
    steps: list[int] = []
    if args.model_description is not None:
        plan = _read_description(args.model_description)
        if plan.depth > params.depth:
            raise HEError(f"the model needs {plan.depth} multiplicative levels, these parameters give {params.depth}: "
                          "use more primes (and a larger N for the budget)")
        steps = rotation_steps(plan, params.slots)
    keys = keygen(params, steps)
    client, server = save_keys(keys, args.out / "client.key", args.out / "server.key")
    emit({"client_key": str(client), "server_key": str(server), "key_id": keys.key_id,
            "security_bits": params.security_bits, "poly_modulus_degree": params.poly_modulus_degree,
            "levels": params.depth, "rotation_steps": len(steps), "server_key_bytes": len(server_key_bytes(keys)),
            "modes": ["batched", "latency"] if steps else ["batched"]})
    return 0


def _encrypt(args: argparse.Namespace) -> int:
    import time

    from veil.data.images import load_pixels
    from veil.he import ciphertexts
    from veil.he.keys import load_keys

    keys = load_keys(args.keys)
    plan = _read_description(args.model_description) if args.model_description else None
    x, _ = load_pixels(args.data, args.split, args.limit, mnist_path=args.mnist_path)
    t = time.perf_counter()
    cset = ciphertexts.encrypt(keys, x, args.mode, plan)
    path = ciphertexts.save(cset, args.out)
    emit({"ciphertexts": str(path), "mode": args.mode, "images": cset.images, "bytes": path.stat().st_size,
            "seconds": round(time.perf_counter() - t, 3)})
    return 0


def _infer(args: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    from veil.he import ciphertexts
    from veil.he.keys import load_server_keys

    keys = load_server_keys(args.keys)
    plan = model_plan(args)
    cset = ciphertexts.load(args.inp, keys)
    t = time.perf_counter()
    with tqdm(total=cset.images, desc="encrypted inference", unit="image", disable=args.no_progress) as bar:
        out = ciphertexts.evaluate(keys, plan, cset, progress=bar.update)
    seconds = time.perf_counter() - t
    path = ciphertexts.save(out, args.out)
    emit({"ciphertexts": str(path), "mode": out.mode, "images": out.images, "seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / out.images, 4), "bytes": path.stat().st_size})
    return 0


def _decrypt(args: argparse.Namespace) -> int:
    from veil.files import check_output
    from veil.he import ciphertexts
    from veil.he.keys import load_keys

    check_output(args.out)
    keys = load_keys(args.keys)
    logits = ciphertexts.decrypt(keys, ciphertexts.load(args.inp, keys))
    labels = None
    if args.labels is not None:
        from veil.data.images import load_pixels

        _, labels = load_pixels(args.labels, args.split, args.limit, mnist_path=args.mnist_path)
        if labels is None:
            raise ValueError(f"{args.labels}: has no labels")
        if len(labels) != len(logits):
            raise ValueError(f"{args.labels}: {len(labels)} labels for {len(logits)} predictions (give the same "
                             "--split and --limit as to encrypt)")
    summary = predictions(logits, args.out, labels)
    if args.logits is not None:
        import numpy as np

        from veil.files import atomic_writer

        with atomic_writer(args.logits, mode=0o600) as f:
            np.save(f, logits.numpy())
    emit(summary)
    return 0


def predictions(logits: Any, out: Path | None, labels: Any | None) -> dict[str, Any]:
    """Save the predicted classes (0600: they are the client's secret); the accuracy if ``labels``."""
    import numpy as np

    from veil.files import atomic_writer

    preds = logits.argmax(1)
    summary: dict[str, Any] = {"images": len(preds)}
    if out is not None:
        with atomic_writer(out, mode=0o600) as f:
            np.save(f, preds.numpy())
        summary["predictions"] = str(out)
    if labels is not None:
        summary["accuracy"] = round(float((preds == labels).float().mean()), 4)
    return summary
