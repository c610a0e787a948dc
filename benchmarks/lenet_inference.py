"""Private inference of the MPC benchmarks' LeNet on MNIST: bob's weights, alice's images, both secret.

One JSON object per line and per (batch, net):
    batch, net, images (batch x repeats), seconds (median of --repeats runs, the slower party),
    ms_per_image, rounds (per batch), bytes (largest compute party, sent + received with the other
    compute party, per batch), dealer_bytes (dealer <-> both compute parties, per batch),
    peak_rss_mb (largest party process, its whole life: set-up included), plaintext_seconds
    (the same batch through PyTorch, one thread), overhead (seconds / plaintext_seconds),
    agreement (fraction of argmax equal to plaintext), accuracy and plaintext_accuracy (on those images),
    setup_seconds (sharing the model, once per session).

    python benchmarks/lenet_inference.py                          # batches 1, 64, 1000 on loopback
    python benchmarks/lenet_inference.py --batches 1,64 --net wan  # parties in network namespaces
    python benchmarks/lenet_inference.py --test-set                # all 10,000 test images, batch 1000

Each batch size runs in a fresh session (fresh processes), so peak RSS is that batch's. ``--net lan``
/ ``wan`` run each party in its own network namespace with a shaped link (see netsim.py); where
namespaces cannot be made the script says so and runs on loopback, labelling lines ``loopback``.
Trained weights come from ``.cache/lenet-mnist.pt`` (``examples/train_lenet.py``; trained on the fly
when missing).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import veil
from veil.data import load_mnist
from veil.nn.infer import private_inference

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / ".cache" / "lenet-mnist.pt"
TEST_IMAGES = 10_000


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(start: int, size: int) -> slice:
    start %= TEST_IMAGES
    return slice(start, min(start + size, TEST_IMAGES))


def main(session: veil.Session, batch: Any, repeats: Any, weights: Any, full: Any = "0") -> dict[str, Any]:
    """A party's part (also the script's ``main`` for ``netsim``, which passes strings)."""
    from veil.nn.zoo import LeNet

    batch, repeats, full = int(batch), int(repeats), full in (True, "1", "True")
    model = None
    if session.party == "bob":
        model = LeNet()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    images = labels = None
    if session.party == "alice":
        images, labels = load_mnist("test")
    if full:
        r = private_inference(session, model, images, model_owner="bob", data_owner="alice", labels=labels,
                              batch_size=batch, progress=False)
        return {"seconds": [r.seconds], "traffic": r.traffic, "setup": r.setup, "peak_rss_mb": _peak_rss_mb(),
                "predictions": None if r.predictions is None else r.predictions.tolist()}
    from veil.nn.model import share_model

    times: list[float] = []
    preds: list[int] = []
    traffic: dict[str, Any] = {}

    t0 = time.perf_counter()
    net = share_model(session, model, owner="bob")  # once per session; private_inference reuses it below
    setup = {"seconds": round(time.perf_counter() - t0, 4)}
    for rep in range(repeats):
        part = _batch(rep * batch, batch)
        mine = images[part] if images is not None else None
        theirs = labels[part] if labels is not None else None
        r = private_inference(session, net, mine, model_owner="bob",
                              data_owner="alice", labels=theirs, batch_size=batch, progress=False)
        times.append(r.seconds)
        traffic = r.traffic
        if r.predictions is not None:
            preds.extend(r.predictions.tolist())
    return {"seconds": times, "traffic": traffic, "setup": setup, "peak_rss_mb": _peak_rss_mb(),
            "predictions": preds or None}


def _plaintext(weights: Path, batch: int, repeats: int, full: bool) -> dict[str, Any]:
    from veil.nn.zoo import LeNet

    torch.set_num_threads(1)  # like each party
    model = LeNet().eval()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    images, labels = load_mnist("test")
    parts = [slice(0, TEST_IMAGES)] if full else [_batch(r * batch, batch) for r in range(repeats)]
    preds, times = [], []
    with torch.no_grad():
        for part in parts:
            for _ in range(2 if full else 1):  # time the second pass of the full set: warm caches
                t0 = time.perf_counter()
                out = torch.cat([model(images[part][i:i + batch]) for i in range(0, len(images[part]), batch)])
                elapsed = time.perf_counter() - t0
            times.append(elapsed)
            preds.extend(out.argmax(1).tolist())
    ys = torch.cat([labels[p] for p in parts]).tolist()
    return {"seconds": statistics.median(times), "predictions": preds, "labels": ys}


def _run(net: str, batch: int, repeats: int, weights: Path, full: bool, timeout: float) -> tuple[str, dict]:
    if net == "loopback":
        return "loopback", veil.launch(main, batch, repeats, str(weights), full, timeout=timeout)
    import netsim

    shape = netsim.effective_shape(net)
    out = netsim.run_json(Path(__file__), [str(batch), str(repeats), str(weights), "1" if full else "0"], shape,
                          timeout=timeout)
    return shape.name, out


def measure(net: str, batch: int, repeats: int, weights: Path, full: bool, timeout: float) -> dict[str, Any]:
    label, res = _run(net, batch, repeats, weights, full, timeout)
    a, b = res["alice"], res["bob"]
    plain = _plaintext(weights, batch, repeats, full)
    secure_preds = a["predictions"]
    n = len(secure_preds)
    agree = sum(int(p == q) for p, q in zip(secure_preds, plain["predictions"])) / n
    acc = sum(int(p == y) for p, y in zip(secure_preds, plain["labels"])) / n
    plain_acc = sum(int(p == y) for p, y in zip(plain["predictions"], plain["labels"])) / n
    seconds = max(statistics.median(a["seconds"]), statistics.median(b["seconds"]))
    per = batch if not full else TEST_IMAGES
    rss = [a["peak_rss_mb"], b["peak_rss_mb"]] + ([res["dealer"]["peak_rss_mb"]] if "peak_rss_mb" in
                                                  res.get("dealer", {}) else [])
    return {"batch": batch, "net": label, "images": n, "seconds": round(seconds, 4),
            "ms_per_image": round(1000 * seconds / per, 3), "rounds": a["traffic"]["rounds"],
            "bytes": max(a["traffic"]["bytes_with_peer"], b["traffic"]["bytes_with_peer"]),
            "dealer_bytes": a["traffic"]["bytes_with_dealer"] + b["traffic"]["bytes_with_dealer"],
            "peak_rss_mb": round(max(rss), 1), "plaintext_seconds": round(plain["seconds"], 5),
            "overhead": round(seconds / plain["seconds"], 1), "agreement": agree, "accuracy": acc,
            "plaintext_accuracy": plain_acc, "setup_seconds": a["setup"].get("seconds")}


def _ensure_weights(path: Path) -> Path:
    if not path.is_file():
        from veil.nn.zoo import train_lenet

        print(f"no trained weights at {path}: training LeNet (a few minutes)", file=sys.stderr)
        train_lenet(path)
    return path


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,1000", help="comma-separated batch sizes (default 1,64,1000)")
    ap.add_argument("--net", default="loopback", help="loopback, lan, wan, or several comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches per size (median reported)")
    ap.add_argument("--test-set", action="store_true", help="instead: all 10,000 test images at batch 1000")
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args(argv)
    weights = _ensure_weights(args.weights)
    batches = [1000] if args.test_set else [int(b) for b in args.batches.split(",")]
    for net in args.net.split(","):
        if net not in ("loopback", "lan", "wan"):
            ap.error(f"--net must be loopback, lan or wan, got {net!r}")
        for batch in batches:
            print(json.dumps(measure(net, batch, args.repeats, weights, args.test_set, args.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
