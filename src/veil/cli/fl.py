"""``veil fl``: federated learning on Flower. ``simulate`` runs every client on this machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fl", help="federated learning on Flower (simulation; secure aggregation with SecAgg+)",
        description="Federated learning with Flower: each client trains on its own part of the data and only "
                    "model updates travel; with --secure the server learns only their sum (SecAgg+).")
    steps = p.add_subparsers(dest="fl_step", metavar="STEP", required=True)
    s = steps.add_parser("simulate", help="run all clients on this machine (Flower's simulation engine)",
                         description="Writes OUT/summary.json (accuracy per round), OUT/accuracy.png and "
                                     "OUT/model.pt (the final global model's state_dict).")
    s.add_argument("--model", default="lenet", help="lenet, mlp, digits-mlp or package.module:factory")
    s.add_argument("--data", default="mnist", help="mnist, digits or an .npz with x_train, y_train, x_test, y_test")
    s.add_argument("--clients", type=int, default=10)
    s.add_argument("--partition", default="iid", help="iid, dirichlet<alpha> (e.g. dirichlet0.5) or shards<k>")
    s.add_argument("--partition-seed", type=int, default=0, help="the split is reproducible, not secret")
    s.add_argument("--rounds", type=int, default=10)
    s.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox", "fedadam"])
    s.add_argument("--clients-per-round", type=int, default=None, help="default: every client")
    s.add_argument("--local-epochs", type=int, default=1)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--momentum", type=float, default=0.9)
    s.add_argument("--mu", type=float, default=0.01, help="FedProx proximal coefficient")
    s.add_argument("--server-lr", type=float, default=0.01, help="FedAdam server learning rate")
    s.add_argument("--secure", action="store_true", help="secure aggregation (Flower's SecAgg+)")
    s.add_argument("--secagg-threshold", type=float, default=0.5,
                   help="fraction of a client's neighbours needed to unmask it if it drops out")
    s.add_argument("--fault", action="append", default=[], metavar="CLIENT:KIND[@ROUND]",
                   help="rehearse a fault: drop, nan or shape (e.g. 3:drop@2); repeatable")
    s.add_argument("--dp", choices=["record", "client"], default=None,
                   help="record: DP-SGD on every client; client: clipped updates, noise on the server's average")
    s.add_argument("--epsilon", type=float, default=None, help="DP budget, spent by the last round (with --dp)")
    s.add_argument("--delta", type=float, default=1e-5)
    s.add_argument("--clip", type=float, default=1.0,
                   help="DP clipping norm: per example (record) or per client update (client); default 1.0")
    s.add_argument("--accountant", choices=["prv", "rdp"], default="prv")
    s.add_argument("--target", type=float, default=None, help="report the first round reaching this accuracy")
    s.add_argument("--out", default="fl-run", help="output directory (default fl-run)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    s.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    import torch

    from veil.files import atomic_writer
    from veil.fl import FLTask, ServerSettings, simulate
    from veil.fl.plots import plot_accuracy_rounds
    from veil.fl.privacy import ClientDP, RecordDP

    if args.dp and args.epsilon is None:
        raise ValueError("--dp needs --epsilon, the budget to spend over the run")
    record = RecordDP(args.epsilon, rounds=args.rounds, delta=args.delta, max_grad_norm=args.clip,
                      accountant=args.accountant) if args.dp == "record" else None
    client = ClientDP(args.epsilon, rounds=args.rounds, delta=args.delta, clipping_norm=args.clip,
                      accountant=args.accountant) if args.dp == "client" else None
    task = FLTask(model=args.model, data=args.data, num_clients=args.clients, partition=args.partition,
                  partition_seed=args.partition_seed, local_epochs=args.local_epochs, batch_size=args.batch_size,
                  lr=args.lr, momentum=args.momentum, faults=tuple(args.fault), record_dp=record)
    settings = ServerSettings(rounds=args.rounds, strategy=args.strategy, clients_per_round=args.clients_per_round,
                              proximal_mu=args.mu, server_lr=args.server_lr, secure=args.secure,
                              secagg_threshold=args.secagg_threshold, client_dp=client)
    result = simulate(task, settings, progress=not args.no_progress, verbose=args.verbose)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.save(out / "summary.json", target=args.target)
    with atomic_writer(out / "model.pt") as f:
        torch.save(result.model().state_dict(), f)
    label = f"{task.partition}, {settings.strategy}" + (", SecAgg+" if settings.secure else "")
    plot_accuracy_rounds({label: result}, out / "accuracy.png", target=args.target)
    brief = {k: summary[k] for k in ("partition", "strategy", "secure_aggregation", "dp_level", "dp_epsilon",
                                     "rounds", "final_accuracy", "seconds_per_round", "minutes", "rejected_updates")}
    if args.target is not None:
        brief["rounds_to_target"] = summary["rounds_to_target"]
    print(json.dumps(brief))
    for reason in result.rejected:
        print(f"rejected: {reason}")
    print(f"wrote {out / 'summary.json'}, {out / 'accuracy.png'}, {out / 'model.pt'}")
    return 0
