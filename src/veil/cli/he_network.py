"""``veil he serve | client | demo | bench``: the network route of :mod:`veil.cli.he` and its measurements."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from veil.cli.he import data_args, emit, model_args, model_plan, predictions


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("serve", help="server: answer encrypted requests over mutual TLS")
    model_args(s)
    s.add_argument("--listen", default="127.0.0.1:7100", metavar="HOST:PORT", help="(port 0: any free port)")
    s.add_argument("--certs", required=True, type=Path, metavar="DIR", help="ca.pem, NAME.pem, NAME.key (veil keygen)")
    s.add_argument("--name", default="server", help="the server's certificate name (default server)")
    s.add_argument("--admit", metavar="A,B", help="only these client certificate names (default: any the CA signed)")
    s.add_argument("--user", metavar="NAME",
                   help="after reading the model and TLS files, run as this user (needs root), e.g. nobody")
    s.add_argument("--unreadable", action="append", default=[], type=Path, metavar="FILE",
                   help="refuse to serve if this process can read FILE (e.g. the client's key file); repeatable")
    s.add_argument("--sessions", type=int, metavar="N", help="exit after N client sessions (default: serve forever)")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds a client may stay silent (default 600)")
    s.set_defaults(func=_serve)

    n = sub.add_parser("client", help="client: encrypt, send to a `veil he serve`, decrypt the answers")
    n.add_argument("--connect", required=True, metavar="HOST:PORT")
    n.add_argument("--certs", required=True, type=Path, metavar="DIR", help="ca.pem, NAME.pem, NAME.key")
    n.add_argument("--name", default="client", help="this client's certificate name (default client)")
    n.add_argument("--server-name", default="server", help="the name the server must prove (default server)")
    n.add_argument("--keys", type=Path, metavar="DIR",
                   help="client.key and server.key of `veil he keygen` (default: fresh keys for this session)")
    data_args(n, split="test")
    n.add_argument("--mode", choices=["batched", "latency"], default="batched")
    n.add_argument("--out", type=Path, metavar="FILE.npy", help="save the predicted classes here")
    n.set_defaults(func=_client)

    m = sub.add_parser("demo", help="a server (as another user, if root) and a client on this machine, over TLS")
    m.add_argument("--model", type=Path, metavar="FILE",
                   help="a `veil he train` model (default: he_lenet trained on MNIST, cached in .cache/he)")
    m.add_argument("--data", default="mnist", metavar="SOURCE")
    m.add_argument("--images", type=int, default=4096, help="images in batched mode (default 4096: one full batch)")
    m.add_argument("--latency-images", type=int, default=5, help="images in latency mode (default 5)")
    m.add_argument("--server-user", default="nobody", help="the server's user when run as root (default nobody)")
    m.add_argument("--workdir", type=Path, metavar="DIR", help="keep certificates and keys here (default: temporary)")
    m.set_defaults(func=_demo)

    b = sub.add_parser("bench", help="measure both modes in one process: JSON lines as benchmarks/he_inference.py")
    b.add_argument("--model", type=Path, metavar="FILE", help="default: he_lenet trained on MNIST (cached)")
    b.add_argument("--data", default="mnist", metavar="SOURCE")
    b.add_argument("--mnist-path", metavar="PATH")
    b.add_argument("--images", type=int, default=4096, help="images in batched mode (default 4096)")
    b.add_argument("--latency-images", type=int, default=10, help="images in latency mode (default 10)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_bench)


def _serve(args: argparse.Namespace) -> int:
    from veil.he.service import HEServer, assert_unreadable, drop_privileges
    from veil.net.peers import parse_address

    plan = model_plan(args)
    admit = tuple(a.strip() for a in args.admit.split(",")) if args.admit else None
    server = HEServer(plan, parse_address(args.listen, any_port=True), args.certs, name=args.name, admit=admit,
                      timeout=args.timeout)
    try:
        if args.user:
            drop_privileges(args.user)
        assert_unreadable(args.unreadable)
    except BaseException:
        server.close()
        raise
    host, port = server.address
    emit({"listening": f"{host}:{port}", "uid": os.getuid(), "depth": plan.depth,
            "unreadable": [str(p) for p in args.unreadable]})
    stats = server.serve(args.sessions)
    emit({"sessions": stats.sessions, "requests": stats.requests, "images": stats.images,
            "refused": stats.refused})
    return 0


def _client(args: argparse.Namespace) -> int:
    import time

    from veil.data.images import load_pixels
    from veil.he import ciphertexts
    from veil.he.keys import HEParams, keygen, load_keys
    from veil.he.latency import rotation_steps
    from veil.he.models import HEError
    from veil.he.service import HEClient
    from veil.net.peers import parse_address

    x, y = load_pixels(args.data, args.split, args.limit, mnist_path=args.mnist_path)
    t = time.perf_counter()
    with HEClient(parse_address(args.connect), args.certs, args.name, server_name=args.server_name) as client:
        if args.keys is None:
            params = HEParams()
            keys = keygen(params, rotation_steps(client.plan, params.slots) if args.mode == "latency" else ())
        else:
            keys, public = load_keys(args.keys / "client.key"), load_keys(args.keys / "server.key")
            if public.key_id != keys.key_id:
                raise HEError(f"{args.keys}: client.key and server.key are of different key pairs")
            keys.relin, keys.galois, keys.galois_steps = public.relin, public.galois, public.galois_steps
        client.open(keys)
        logits = ciphertexts.decrypt(keys, client.infer(ciphertexts.encrypt(keys, x, args.mode, client.plan)))
        sent, received = client.bytes_sent, client.bytes_received
    seconds = time.perf_counter() - t
    summary = predictions(logits, args.out, y)
    emit({"mode": args.mode, **summary, "seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / len(x), 4), "bytes_sent": sent, "bytes_received": received,
            "key_id": keys.key_id})
    return 0


def _demo(args: argparse.Namespace) -> int:
    from veil.he.demo import run_demo

    for line in run_demo(model=args.model, data=args.data, images=args.images, latency_images=args.latency_images,
                         server_user=args.server_user, workdir=args.workdir):
        emit(line)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from veil.data.images import load_pixels
    from veil.he.bench import default_model, measure
    from veil.he.keys import HEParams, keygen
    from veil.he.latency import rotation_steps
    from veil.he.models import load_he_model, to_plan

    if args.model is None:
        model, _ = default_model(Path(".cache/he"), progress=not args.no_progress)
        shape: tuple[int, ...] = (1, 28, 28)
    else:
        model, shape, _ = load_he_model(args.model)
    plan = to_plan(model, shape)
    x, y = load_pixels(args.data, "test", mnist_path=args.mnist_path)
    if y is None:
        raise ValueError(f"{args.data}: has no labels, which the accuracy needs")
    params = HEParams()
    keys = keygen(params, rotation_steps(plan, params.slots))
    for mode, n in (("batched", args.images), ("latency", args.latency_images)):
        if n:
            n = min(n, len(x))
            emit(measure(keys, plan, model, x[:n], y[:n], mode, progress=not args.no_progress))
    return 0

