"""Federated LeNet on MNIST with Flower: rounds and minutes to 98.5%, with and without secure aggregation.

10 clients, each with 1/10 of the 60,000 training images (IID, or Dirichlet alpha = 0.5 label
skew), 1 local epoch per round (batch 32, SGD lr 0.05, momentum 0.9), FedAvg, every client every
round; the global model is tested on the 10,000 test images after each round. Secure aggregation
is Flower's SecAgg+ (every client a neighbour of every other, half of them needed to unmask a
dropout).

One JSON object per line:

* one per run: ``partition``, ``secure_aggregation``, ``dp_level`` (null here), ``dp_epsilon``,
  ``rounds``, ``final_accuracy``, ``rounds_to_98_5`` (null if not reached), ``seconds_per_round``
  (mean over rounds 2.., round 1 also starts the clients), ``minutes`` (the whole run);
* with ``--dp`` (default ``record,client``): record-level DP (DP-SGD on each of the 10 clients,
  IID, epsilon 3 spent over 30 rounds, SecAgg+ on; by default on fixed ScatterNet features with a
  linear model, ``--record-model lenet`` for the LeNet; the line names ``model`` and ``features``)
  and client-level DP (100 clients, 10 per round,
  updates clipped, noise on the average, epsilon 8 over 30 rounds, SecAgg+ on), with ``dp_level``,
  ``dp_epsilon`` (spent, PRV accountant) and ``dp_delta``;
* ``what: secure-overhead`` per partition: seconds per round with SecAgg+ over plain FedAvg;
* ``what: centralised``: the same LeNet trained on all 60,000 images in one process, 5 epochs of
  batch 32 (the plaintext PyTorch figure for the same work). Its learning rate is 0.01, not the
  clients' 0.05: with momentum 0.9, lr 0.05 is unstable on one long run (loss spikes, 93-94% after
  an epoch, diverged within 5 in one run), while FedAvg's averaging of short runs tames it.

PNG: ``--plots`` (default ``.cache/fl``)/accuracy.png, accuracy per round of every run.

    python benchmarks/fl_mnist.py                       # iid and dirichlet0.5, plain and SecAgg+
    python benchmarks/fl_mnist.py --partitions iid --rounds 8
    python benchmarks/fl_mnist.py --quick               # 3 rounds on 10,000 images: a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from veil.fl import FLTask, ServerSettings, simulate
from veil.fl.plots import plot_accuracy_rounds
from veil.fl.privacy import ClientDP, RecordDP
from veil.fl.task import build_model, load_task_data
from veil.nn.zoo import evaluate

TARGET = 0.985


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _centralised(epochs: int, limit: int | None) -> dict:
    x, y, xt, yt = load_task_data("mnist")
    if limit:
        x, y = x[:limit], y[:limit]
    model = build_model("lenet")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    t0 = time.perf_counter()
    curve = []
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        curve.append(evaluate(model.eval(), xt, yt))
    return {"what": "centralised", "epochs": epochs, "lr": 0.01, "batch_size": 32, "final_accuracy": curve[-1],
            "epochs_to_98_5": next((i + 1 for i, a in enumerate(curve) if a >= TARGET), None),
            "minutes": round((time.perf_counter() - t0) / 60, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--partitions", default="iid,dirichlet0.5")
    ap.add_argument("--secure", default="off,on", help="off, on or off,on (default both)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--dp", default="record,client", help="DP runs: record, client, both (default) or none")
    ap.add_argument("--dp-rounds", type=int, default=30)
    ap.add_argument("--record-epsilon", type=float, default=3.0)
    ap.add_argument("--record-model", default="scatter",
                    help="scatter (ScatterNet features + linear, the default) or lenet, for the record-level DP run")
    ap.add_argument("--record-batch", type=int, default=None,
                    help="expected Poisson batch of each client's DP-SGD (default 1000 scatter, 256 lenet)")
    ap.add_argument("--record-lr", type=float, default=None, help="default 16 scatter, 0.25 lenet")
    ap.add_argument("--record-clip", type=float, default=None, help="default 0.1 scatter, 1.0 lenet")
    ap.add_argument("--client-epsilon", type=float, default=8.0)
    ap.add_argument("--client-clients", type=int, default=100)
    ap.add_argument("--client-per-round", type=int, default=10)
    ap.add_argument("--client-clip", type=float, default=0.5)
    ap.add_argument("--limit", type=int, help="train on the first N training images only")
    ap.add_argument("--plots", default=".cache/fl")
    ap.add_argument("--quick", action="store_true", help="3 rounds on 10,000 images")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.dp_rounds, args.limit = 3, 2, args.limit or 10_000
    runs, rows = {}, []
    for scheme in [p.strip() for p in args.partitions.split(",") if p.strip()]:
        for secure in [s.strip() == "on" for s in args.secure.split(",") if s.strip()]:
            task = FLTask(model="lenet", data="mnist", num_clients=args.clients, partition=scheme,
                          local_epochs=1, batch_size=32, lr=0.05, momentum=0.9, train_limit=args.limit)
            result = simulate(task, ServerSettings(rounds=args.rounds, secure=secure), progress=not args.no_progress)
            row = {"partition": scheme, "secure_aggregation": secure, "dp_level": None, "dp_epsilon": None,
                   "clients": args.clients, "rounds": len(result.rounds), "final_accuracy": result.final_accuracy,
                   "rounds_to_98_5": result.rounds_to(TARGET),
                   "seconds_per_round": round(result.seconds_per_round or 0.0, 3),
                   "minutes": round(result.seconds / 60, 3), "rejected_updates": len(result.rejected)}
            _emit(row)
            rows.append(row)
            runs[f"{scheme}{', SecAgg+' if secure else ''}"] = result
    dp_runs = {d.strip() for d in args.dp.split(",") if d.strip() and d.strip() != "none"}
    for level in [d for d in ("record", "client") if d in dp_runs]:
        if level == "record":
            scatter = args.record_model == "scatter"
            defaults = (1000, 16.0, 0.1) if scatter else (256, 0.25, 1.0)
            batch, lr, clip = (v if v is not None else d for v, d in
                               zip((args.record_batch, args.record_lr, args.record_clip), defaults))
            task = FLTask(model="veil.dp.models:scatter_linear" if scatter else args.record_model, data="mnist",
                          features="scatter" if scatter else None, num_clients=args.clients, partition="iid",
                          batch_size=batch, lr=lr, momentum=0.9, train_limit=args.limit,
                          record_dp=RecordDP(args.record_epsilon, rounds=args.dp_rounds, max_grad_norm=clip))
            settings = ServerSettings(rounds=args.dp_rounds, secure=True)
        else:
            task = FLTask(model="lenet", data="mnist", num_clients=args.client_clients, partition="iid",
                          batch_size=32, lr=0.05, momentum=0.9, train_limit=args.limit)
            settings = ServerSettings(rounds=args.dp_rounds, secure=True, clients_per_round=args.client_per_round,
                                      client_dp=ClientDP(args.client_epsilon, rounds=args.dp_rounds,
                                                         clipping_norm=args.client_clip))
        result = simulate(task, settings, progress=not args.no_progress)
        summary = result.summary()
        row = {"model": task.model, "features": task.features, "partition": "iid", "secure_aggregation": True,
               "dp_level": level, "dp_epsilon": summary["dp_epsilon"],
               "dp_delta": summary["dp_delta"], "clients": task.num_clients,
               "clients_per_round": settings.clients_per_round or task.num_clients, "rounds": len(result.rounds),
               "final_accuracy": result.final_accuracy, "rounds_to_98_5": result.rounds_to(TARGET),
               "seconds_per_round": round(result.seconds_per_round or 0.0, 3),
               "minutes": round(result.seconds / 60, 3)}
        _emit(row)
        runs[f"{level}-level DP, eps {row['dp_epsilon']:.2f}"] = result
    for scheme in {r["partition"] for r in rows}:
        plain = [r for r in rows if r["partition"] == scheme and not r["secure_aggregation"]]
        secure = [r for r in rows if r["partition"] == scheme and r["secure_aggregation"]]
        if plain and secure and plain[0]["seconds_per_round"]:
            _emit({"what": "secure-overhead", "partition": scheme,
                   "ratio": round(secure[0]["seconds_per_round"] / plain[0]["seconds_per_round"], 3),
                   "plain_seconds_per_round": plain[0]["seconds_per_round"],
                   "secure_seconds_per_round": secure[0]["seconds_per_round"]})
    _emit(_centralised(min(args.rounds, 5), args.limit))
    if runs:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        plot_accuracy_rounds(runs, Path(args.plots) / "accuracy.png", target=TARGET,
                             title=f"FedAvg LeNet on MNIST, {args.clients} clients")


if __name__ == "__main__":
    main()
