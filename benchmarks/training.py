"""Private training: alice's data, bob's initial model, both secret-shared throughout training.

2 compute parties + dealer as 3 OS processes (``veil.launch``, TLS on loopback). Models (``--model``):

* ``mlp``: ``veil.nn.zoo.MLP``, Linear(784, 128)-ReLU-Linear(128, 128)-ReLU-Linear(128, 10) on
  flattened MNIST, batch 64, SGD lr 0.05, cross-entropy.
* ``lenet``: ``veil.nn.zoo.LeNet`` on MNIST, batch 64, SGD lr 0.05 with momentum 0.9, cross-entropy.
* ``small``: ``veil.nn.zoo.SmallNet``, Linear(3, 10)-ReLU-Linear(10, 1)-Sigmoid, BCELoss, SGD lr 0.1,
  batch 64, on a synthetic two-owner dataset: ``--samples`` rows (default 6,400) of 3 standard-normal
  features, alice owns the first half, bob the second (each generates and shares only its own half;
  the halves are joined on shares with ``veil.cat``), label ``1[1.5 x0 - 2 x1 + x2 + 0.5 + N(0, 0.5^2)
  > 0]``; the test set (``--test-samples`` rows) is made and owned the same way.

Alice owns the MNIST images and labels (training and test subsets); bob owns the initial weights
(PyTorch's default initialisation under a fixed seed). Labels are shared as one-hot rows by default
(``--labels onehot``: no comparison on shares per batch), or as class indices (``--labels index``:
``fit`` turns them into one-hot rows on shares with one equality call per batch, 5 rounds). Each
epoch is one call of ``veil.nn.fit(..., epochs=1, test_data=..., reveal_to=["alice"], loss_every=50)``
and a batch order of its own: from a fixed public seed by default (``--order fixed``: the same
batches in every run, so runs compare), or agreed afresh by ``fit`` (``--order fresh``). The batches
visited are recorded (their indices are public to both parties anyway) and the plaintext reference
replays exactly those batches.

``--frac-bits`` sets the session's fixed point (default 16). At 16 bits the gradients of LeNet's
first layers are 15-25% (relative, L2) off PyTorch's, those of the MLP 2-3%: gradients shrink as they
flow back (LeNet's conv1 gradient terms are ~1e-5, the resolution is 1.5e-5). 20 bits brings conv1
under 2%, but every truncation is then 256 times likelier to wrap (README, Precision): with the
~10^6 truncations of a LeNet batch, one 50-batch run in two got a 2^24-sized error and lost its
model. Training at 20 bits is for experiments, not results.

One JSON object per line and per (model, epoch):
    model, epoch, samples (training rows), batch_size, batches, labels (onehot, index; binary for
    small), order, frac_bits,
    seconds (the epoch's training time in fit, the slower party; loss reveals included, test
    evaluation excluded), seconds_per_batch, bytes (the larger compute party, sent + received with the
    other compute party, during the epoch's training), dealer_bytes (dealer <-> both compute parties,
    same span), rounds (same span), loss (mean of the training losses revealed to alice),
    test_samples, test_accuracy (after the epoch, computed on shares, only the count revealed to alice),
    eval_seconds (that evaluation, the slower party), plaintext_seconds (the same epoch in PyTorch:
    one thread, same initial weights, optimizer and batches), plaintext_loss (at the same batches),
    plaintext_test_accuracy, overhead (seconds / plaintext_seconds), setup_seconds (sharing the data
    and the model, the slower party), peak_rss_mb (the larger compute party process).

The small network's test accuracy is computed here, not by ``fit``: ``veil.nn.evaluate`` takes the
argmax of each output row, which for a single sigmoid output is always 0 (every prediction "right").
Here: ``[p > 1/2]`` on shares (5 rounds), compared with the secret label by a product, summed, the
count revealed to alice.

``--profile`` instead times single batches (after one untimed batch): one JSON object per (model,
part) with part in targets (index labels only), forward, loss, backward, step, reveal_loss, total:
seconds (median of ``--profile-batches`` batches, the slower party), rounds, bytes, dealer_bytes.

    python benchmarks/training.py                               # mlp, lenet, small: 1 epoch each
    python benchmarks/training.py --model small --epochs 2
    python benchmarks/training.py --model mlp --samples 6400
    python benchmarks/training.py --model mlp --profile
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

import veil
from veil.nn import BCELoss, CrossEntropyLoss, TensorDataset, fit, share_model
from veil.nn.optim import SGD
from veil.nn.train import one_hot

MODELS = ("mlp", "lenet", "small")
MNIST_TRAIN, MNIST_TEST = 60_000, 10_000
SMALL_SAMPLES = 6_400
LOSS_EVERY = 50
INIT_SEED = 20240611  # bob's initial weights; the plaintext reference builds the same ones
SMALL_W = (1.5, -2.0, 1.0)
SMALL_BIAS, SMALL_NOISE = 0.5, 0.5


# ---- models, data, optimizers (the same for the parties and the plaintext reference) ---------
def build_model(name: str) -> nn.Module:
    """``veil.nn.zoo``'s MLP, LeNet or SmallNet, initialised under a fixed seed."""
    from veil.nn.zoo import ARCHITECTURES

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {list(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return ARCHITECTURES[name]()


def optimizer_args(name: str, override: str = "") -> dict[str, float]:
    """SGD's hyperparameters for ``name``; ``override`` (JSON, from --lr/--momentum) replaces some."""
    args = {"mlp": {"lr": 0.05}, "lenet": {"lr": 0.05, "momentum": 0.9}, "small": {"lr": 0.1}}[name]
    extra = {k: v for k, v in (json.loads(override) if override else {}).items() if k != "schedule"}
    return {**args, **extra}


def lr_for_epoch(override: str, epoch: int) -> float | None:
    """The learning rate of ``epoch`` (1-based) from --lr-schedule, or None (keep the optimizer's)."""
    schedule = json.loads(override).get("schedule") if override else None
    return float(schedule[min(epoch, len(schedule)) - 1]) if schedule else None


def small_rows(owner: str, n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One owner's half of the synthetic set: ``(n, 3)`` features and ``(n, 1)`` 0/1 labels."""
    seed = {"alice": 11, "bob": 12}[owner] + {"train": 0, "test": 100}[split]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    logit = x @ torch.tensor(SMALL_W, dtype=torch.float64) + SMALL_BIAS + SMALL_NOISE * torch.randn(
        n, generator=g, dtype=torch.float64)
    return x, (logit > 0).to(torch.float64).unsqueeze(1)


def small_halves(n: int) -> tuple[int, int]:
    return n // 2, n - n // 2


def mnist_subset(name: str, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from veil.data import load_mnist

    x, y = load_mnist(split)  # normalised
    x, y = x[:n], y[:n]
    return (x.reshape(len(x), -1) if name == "mlp" else x), y


class RecordingDataset(TensorDataset):
    """A TensorDataset that remembers which rows each batch took (public to both parties)."""

    def __init__(self, session: veil.Session, x: veil.SecretTensor, y: veil.SecretTensor) -> None:
        super().__init__(session, x, y)
        self.visited: list[torch.Tensor] = []

    def get(self, index: Any) -> dict[str, veil.SecretTensor]:
        if isinstance(index, slice):
            self.visited.append(torch.arange(len(self))[index])
        else:
            self.visited.append(torch.as_tensor(index).clone())
        return super().get(index)


# ---- the parties' program -----------------------------------------------------------------------
def _barrier(session: veil.Session) -> None:
    session.transport.send(session.peer, b"\x00")
    session.transport.recv(session.peer)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _share_data(session: veil.Session, name: str, samples: int, test_samples: int, labels: str
                ) -> tuple[RecordingDataset, TensorDataset]:
    me = session.party
    if name == "small":
        out = []
        for split, n in (("train", samples), ("test", test_samples)):
            parts_x, parts_y = [], []
            for owner, rows in zip(("alice", "bob"), small_halves(n)):
                x, y = small_rows(owner, rows, split) if me == owner else (None, None)
                parts_x.append(session.share(x, owner=owner))
                parts_y.append(session.share(y, owner=owner))
            out.append((veil.cat(parts_x), veil.cat(parts_y)))
        (x, y), (xt, yt) = out
        return RecordingDataset(session, x, y), TensorDataset(session, xt, yt)
    sets = []
    for split, n in (("train", samples), ("test", test_samples)):
        x = y = None
        if me == "alice":
            x, idx = mnist_subset(name, split, n)
            y = nn.functional.one_hot(idx, 10).double() if labels == "onehot" else idx.double()
        sets.append((session.share(x, owner="alice"), session.share(y, owner="alice")))
    (x, y), (xt, yt) = sets
    return RecordingDataset(session, x, y), TensorDataset(session, xt, yt)


def binary_accuracy(session: veil.Session, net: veil.nn.SecureModel, data: TensorDataset,
                    reveal_to: list[str]) -> float | None:
    """Accuracy of a one-output sigmoid model on shares: ``[p > 1/2]`` against the secret 0/1 label;
    only the count of hits is revealed."""
    was = net.training
    net.eval()
    pred = net(data.x) > 0.5
    mismatches = (pred + data.y - pred * data.y * 2.0).sum()  # [pred != y] = pred + y - 2 pred y
    net.train(was)
    opened = (len(data) - mismatches).reveal(to=reveal_to)
    return None if opened is None else float(opened) / len(data)


def epoch_seed(order: str, epoch: int) -> bytes | None:
    """The public seed of an epoch's batch order (None: fit agrees on a fresh one)."""
    if order == "fresh":
        return None
    return hashlib.sha256(b"veil benchmarks/training.py order\x00" + epoch.to_bytes(8, "little")).digest()


def program(session: veil.Session, name: str, epochs: int, samples: int, test_samples: int, batch_size: int,
            labels: str, order: str, profile_batches: int, sgd: str = "") -> dict[str, Any]:
    t0 = time.perf_counter()
    train, test = _share_data(session, name, samples, test_samples, labels)
    net = share_model(session, build_model(name) if session.party == "bob" else None, owner="bob", training=True)
    optimizer = SGD(net.parameters(), **optimizer_args(name, sgd))
    loss_fn = BCELoss() if name == "small" else CrossEntropyLoss()
    classes = None if name == "small" else 10
    setup = time.perf_counter() - t0
    if profile_batches:
        return {"profile": _profile(session, net, optimizer, loss_fn, train, batch_size, classes, profile_batches),
                "peak_rss_mb": _peak_rss_mb()}
    rows = []
    for epoch in range(1, epochs + 1):
        train.visited = []
        lr = lr_for_epoch(sgd, epoch)
        if lr is not None:
            optimizer.lr = lr
        _barrier(session)
        t1 = time.perf_counter()
        history = fit(session, net, train, epochs=1, batch_size=batch_size, optimizer=optimizer, loss_fn=loss_fn,
                      test_data=None if name == "small" else test, classes=classes, reveal_to=["alice"],
                      loss_every=LOSS_EVERY, progress=False, seed=epoch_seed(order, epoch))
        rec = history.epochs[-1]
        acc = rec.test_accuracy
        if name == "small":
            acc = binary_accuracy(session, net, test, ["alice"])
        eval_seconds = time.perf_counter() - t1 - rec.seconds
        rows.append({"epoch": epoch, "seconds": rec.seconds, "batches": rec.batches, "loss": rec.loss,
                     "test_accuracy": acc, "eval_seconds": eval_seconds, "bytes_with_peer": rec.bytes_with_peer,
                     "bytes_with_dealer": rec.bytes_with_dealer, "rounds": rec.rounds,
                     "visited": train.visited if session.party == "alice" else None})
    return {"setup_seconds": setup, "epochs": rows, "peak_rss_mb": _peak_rss_mb()}


def _profile(session: veil.Session, net: veil.nn.SecureModel, optimizer: SGD, loss_fn: Any, train: TensorDataset,
             batch_size: int, classes: int | None, n: int) -> dict[str, list[dict[str, Any]]]:
    """Per part of a training step: seconds, rounds, bytes of ``n`` batches (after an untimed one)."""
    parts: dict[str, list[dict[str, Any]]] = {}

    def timed(part: str, fn: Any) -> Any:
        with session.measure() as m:
            t = time.perf_counter()
            out = fn()
            m["seconds"] = time.perf_counter() - t
        parts.setdefault(part, []).append(m)
        return out

    net.train()
    for i in range(n + 1):
        if i == 1:
            parts.clear()  # the first batch warms buffers and the dealer
        batch = train.get(slice(i * batch_size, (i + 1) * batch_size))
        _barrier(session)
        t = time.perf_counter()
        y = batch["y"]
        if classes is not None and y.dim() == 1:
            y = timed("targets", lambda y=y: one_hot(y, classes))
        optimizer.zero_grad()
        out = timed("forward", lambda b=batch: net(b["x"]))
        loss = timed("loss", lambda o=out, y=y: loss_fn(o, y))
        timed("backward", loss.backward)
        timed("step", optimizer.step)
        timed("reveal_loss", lambda loss=loss: loss.reveal(to=["alice"]))
        parts.setdefault("total", []).append({"seconds": time.perf_counter() - t})
    return parts


# ---- plaintext reference ------------------------------------------------------------------------
def plaintext(name: str, samples: int, test_samples: int, visited: list[list[torch.Tensor]], sgd: str = ""
              ) -> list[dict[str, Any]]:
    """The same epochs in PyTorch (one thread): same initial weights, optimizer and batches."""
    torch.set_num_threads(1)  # like each party
    if name == "small":
        halves = [small_rows(o, r, "train") for o, r in zip(("alice", "bob"), small_halves(samples))]
        thalves = [small_rows(o, r, "test") for o, r in zip(("alice", "bob"), small_halves(test_samples))]
        x, y = torch.cat([h[0] for h in halves]).float(), torch.cat([h[1] for h in halves]).float()
        xt, yt = torch.cat([h[0] for h in thalves]).float(), torch.cat([h[1] for h in thalves]).float()
        loss_fn: nn.Module = nn.BCELoss()
    else:
        x, y = mnist_subset(name, "train", samples)
        xt, yt = mnist_subset(name, "test", test_samples)
        loss_fn = nn.CrossEntropyLoss()
    model = build_model(name)
    opt = torch.optim.SGD(model.parameters(), **optimizer_args(name, sgd))
    rows = []
    for epoch, batches in enumerate(visited, start=1):
        lr = lr_for_epoch(sgd, epoch)
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        model.train()
        losses = []
        t0 = time.perf_counter()
        for step, idx in enumerate(batches):
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if (step + 1) % LOSS_EVERY == 0 or step == len(batches) - 1:
                losses.append(loss.item())
        seconds = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            out = model(xt)
            pred = (out > 0.5).float() if name == "small" else out.argmax(1)
            acc = int((pred == yt).sum()) / len(yt)
        rows.append({"seconds": seconds, "loss": sum(losses) / len(losses), "test_accuracy": acc})
    return rows


# ---- driver ---------------------------------------------------------------------------------------
TRUNCATION = {"mode": "local"}  # set from --truncation in main(), before any launch


def _options(frac_bits: int) -> veil.SessionOptions:
    return veil.SessionOptions(fixed_point=veil.FixedPoint(frac_bits), truncation=TRUNCATION["mode"])


def run(name: str, epochs: int, samples: int, test_samples: int, batch_size: int, labels: str, order: str,
        frac_bits: int, timeout: float, sgd: str = "") -> list[dict[str, Any]]:
    res = veil.launch(program, name, epochs, samples, test_samples, batch_size, labels, order, 0, sgd,
                      timeout=timeout, options=_options(frac_bits))
    a, b = res["alice"], res["bob"]
    plain = plaintext(name, samples, test_samples, [e["visited"] for e in a["epochs"]], sgd)
    lines = []
    for ea, eb, p in zip(a["epochs"], b["epochs"], plain):
        seconds = max(ea["seconds"], eb["seconds"])
        lines.append({
            "model": name, "epoch": ea["epoch"], "samples": samples, "batch_size": batch_size,
            "batches": ea["batches"], "labels": "binary" if name == "small" else labels, "order": order,
            "frac_bits": frac_bits,
            "seconds": round(seconds, 3), "seconds_per_batch": round(seconds / ea["batches"], 4),
            "bytes": max(ea["bytes_with_peer"], eb["bytes_with_peer"]),
            "dealer_bytes": ea["bytes_with_dealer"] + eb["bytes_with_dealer"], "rounds": ea["rounds"],
            "loss": None if ea["loss"] is None else round(ea["loss"], 4),
            "test_samples": test_samples, "test_accuracy": ea["test_accuracy"],
            "eval_seconds": round(max(ea["eval_seconds"], eb["eval_seconds"]), 3),
            "plaintext_seconds": round(p["seconds"], 4), "plaintext_loss": round(p["loss"], 4),
            "plaintext_test_accuracy": p["test_accuracy"], "overhead": round(seconds / p["seconds"], 1),
            "setup_seconds": round(max(a["setup_seconds"], b["setup_seconds"]), 3),
            "peak_rss_mb": round(max(a["peak_rss_mb"], b["peak_rss_mb"]), 1),
            "optimizer": {"sgd": optimizer_args(name, sgd), "lr": lr_for_epoch(sgd, ea["epoch"])},
            "truncation": TRUNCATION["mode"],
        })
    return lines


def profile(name: str, samples: int, batch_size: int, labels: str, batches: int, frac_bits: int, timeout: float
            ) -> list[dict[str, Any]]:
    need = (batches + 1) * batch_size
    res = veil.launch(program, name, 1, max(samples, need) if name == "small" else need, 2, batch_size, labels,
                      "fixed", batches, timeout=timeout, options=_options(frac_bits))
    a, b = res["alice"]["profile"], res["bob"]["profile"]
    lines = []
    for part, ms in a.items():
        row: dict[str, Any] = {"model": name, "part": part, "batch_size": batch_size,
                               "labels": "binary" if name == "small" else labels,
                               "frac_bits": frac_bits,
                               "seconds": round(statistics.median(max(x["seconds"], y["seconds"])
                                                                  for x, y in zip(ms, b[part])), 5)}
        if "rounds" in ms[0]:
            row.update(rounds=ms[-1]["rounds"], bytes=max(ms[-1]["bytes_with_peer"], b[part][-1]["bytes_with_peer"]),
                       dealer_bytes=ms[-1]["bytes_with_dealer"] + b[part][-1]["bytes_with_dealer"])
        lines.append(row)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=",".join(MODELS), help="comma-separated subset of mlp,lenet,small "
                    "(default all three, in that order)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--samples", type=int, default=None,
                    help=f"training rows (default: all {MNIST_TRAIN:,} for MNIST, {SMALL_SAMPLES:,} for small)")
    ap.add_argument("--test-samples", type=int, default=MNIST_TEST)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--labels", choices=("onehot", "index"), default="onehot",
                    help="MNIST labels shared as one-hot rows or as class indices (one-hot made on shares)")
    ap.add_argument("--order", choices=("fixed", "fresh"), default="fixed",
                    help="batch order from a fixed public seed (default) or a fresh one agreed per epoch")
    ap.add_argument("--frac-bits", type=int, default=16,
                    help="fixed-point fractional bits of the session (default 16; see the docstring)")
    ap.add_argument("--profile", action="store_true", help="time the parts of single training steps instead")
    ap.add_argument("--profile-batches", type=int, default=5)
    ap.add_argument("--truncation", choices=("local", "exact"), default="local",
                    help="truncation of products (SessionOptions.truncation; exact: one more round per "
                         "matmul/convolution, never a large error)")
    ap.add_argument("--lr", type=float, help="SGD learning rate (default per model, see above)")
    ap.add_argument("--momentum", type=float, help="SGD momentum (default per model, see above)")
    ap.add_argument("--lr-schedule", help="comma-separated learning rate per epoch (the last one repeats)")
    ap.add_argument("--timeout", type=float, default=7200.0)
    args = ap.parse_args(argv)
    TRUNCATION["mode"] = args.truncation
    names = args.model.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    if args.epochs < 1 or args.batch_size < 1 or args.test_samples < 2 or args.profile_batches < 1:
        ap.error("--epochs, --batch-size and --profile-batches must be positive, --test-samples at least 2")
    for name in names:
        limit = None if name == "small" else MNIST_TRAIN
        samples = args.samples or (SMALL_SAMPLES if name == "small" else MNIST_TRAIN)
        if samples < 2 or (limit is not None and samples > limit):
            ap.error(f"--samples for {name} must be in [2, {limit or 'inf'}], got {samples}")
        if name != "small" and args.test_samples > MNIST_TEST:
            ap.error(f"--test-samples for {name} must be at most {MNIST_TEST:,}")
        if args.profile:
            lines = profile(name, samples, args.batch_size, args.labels, args.profile_batches, args.frac_bits,
                            args.timeout)
        else:
            schedule = [float(v) for v in args.lr_schedule.split(",")] if args.lr_schedule else None
            sgd = json.dumps({k: v for k, v in (("lr", args.lr), ("momentum", args.momentum), ("schedule", schedule))
                              if v is not None})
            lines = run(name, args.epochs, samples, args.test_samples, args.batch_size, args.labels, args.order,
                        args.frac_bits, args.timeout, sgd if sgd != "{}" else "")
        for line in lines:
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
