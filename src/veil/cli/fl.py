"""``veil fl``: federated learning on Flower. ``simulate`` runs every client on this machine; ``server`` and
``client`` run one process per host (Flower's deployment engine, over TLS)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fl", help="federated learning on Flower (simulation, or across hosts over TLS; SecAgg+)",
        description="Federated learning with Flower: each client trains on its own part of the data and only "
                    "model updates travel; with --secure the server learns only their sum (SecAgg+).")
    steps = p.add_subparsers(dest="fl_step", metavar="STEP", required=True)
    s = steps.add_parser("simulate", help="run all clients on this machine (Flower's simulation engine)",
                         description="Writes OUT/summary.json (accuracy per round), OUT/accuracy.png and "
                                     "OUT/model.pt (the final global model's state_dict).")
    _task_arguments(s)
    s.add_argument("--out", default="fl-run", help="output directory (default fl-run)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    s.set_defaults(func=_simulate)

    v = steps.add_parser(
        "server", help="serve a federated run to clients on other hosts (Flower's deployment engine, TLS)",
        description="Start Flower's SuperLink on --listen with the server's TLS certificate (veil keygen "
                    "--parties server,client0,... --san server=localhost,127.0.0.1,::1,HOSTNAME), submit the run, "
                    "wait for --clients clients (veil fl client on each host), and write OUT/summary.json, "
                    "OUT/accuracy.png and OUT/model.pt as simulate does. Only the Fleet API is served to other "
                    "hosts; firewall the port to the clients' addresses all the same.")
    _task_arguments(v)
    v.add_argument("--listen", default="0.0.0.0:9093", metavar="HOST:PORT", help="default 0.0.0.0:9093")
    v.add_argument("--certs", type=Path, default=None, help="directory with ca.pem, NAME.pem, NAME.key")
    v.add_argument("--name", default="server", help="the server's name in --certs (default server)")
    v.add_argument("--admit", default="", metavar="C1,C2,...",
                   help="admit only these clients, by their certificates in --certs (Flower node authentication)")
    v.add_argument("--max-client-records", type=int, default=None,
                   help="with --secure: the most training records a client may have (default: the largest "
                        "partition of --data, for clients that use it)")
    v.add_argument("--insecure", action="store_true", help="no TLS (a test on one host only)")
    v.add_argument("--out", default="fl-run", help="output directory (default fl-run)")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=_server)

    c = steps.add_parser(
        "client", help="take part in a federated run served by veil fl server",
        description="Run Flower's SuperNode against the server (its certificate checked against ca.pem in "
                    "--certs) and train on this host's data whenever the server asks, until the server has been "
                    "gone for --wait seconds.")
    c.add_argument("--server", required=True, metavar="HOST:PORT")
    c.add_argument("--certs", type=Path, default=None, help="directory with ca.pem (and NAME.key with --name)")
    c.add_argument("--name", default=None, help="prove this identity (NAME.key in --certs) to a server that --admit's")
    c.add_argument("--partition-id", type=int, default=0,
                   help="this client's part of the run's data set (without --data); default 0")
    c.add_argument("--data", default=None, help="train on this .npz (x_train, y_train) instead: this host's own data")
    c.add_argument("--require-secure", action="store_true", help="refuse runs without secure aggregation")
    c.add_argument("--max-epsilon", type=float, default=None,
                   help="refuse runs without record-level DP at most this epsilon")
    c.add_argument("--allow-model", action="append", default=[], metavar="PKG.MOD:FACTORY",
                   help="accept this model import path (by default only Veil's named models); repeatable")
    c.add_argument("--runtime-port", type=int, default=None, help="local port of the SuperNode (default 9094+ID)")
    c.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for the server once it has gone away: the run is over (default 60)")
    c.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds to wait for the server to come up at the start (default 600)")
    c.add_argument("--insecure", action="store_true", help="no TLS (a test on one host only)")
    c.set_defaults(func=_client)


def _task_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lenet", help="lenet, mlp, digits-mlp or package.module:factory")
    p.add_argument("--data", default="mnist", help="mnist, digits or an .npz with x_train, y_train, x_test, y_test")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--partition", default="iid", help="iid, dirichlet<alpha> (e.g. dirichlet0.5) or shards<k>")
    p.add_argument("--partition-seed", type=int, default=0, help="the split is reproducible, not secret")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox", "fedadam"])
    p.add_argument("--clients-per-round", type=int, default=None, help="default: every client")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--mu", type=float, default=0.01, help="FedProx proximal coefficient")
    p.add_argument("--server-lr", type=float, default=0.01, help="FedAdam server learning rate")
    p.add_argument("--secure", action="store_true", help="secure aggregation (Flower's SecAgg+)")
    p.add_argument("--secagg-threshold", type=float, default=0.5,
                   help="fraction of a client's neighbours needed to unmask it if it drops out")
    p.add_argument("--fault", action="append", default=[], metavar="CLIENT:KIND[@ROUND]",
                   help="rehearse a fault: drop, nan or shape (e.g. 3:drop@2); repeatable")
    p.add_argument("--dp", choices=["record", "client"], default=None,
                   help="record: DP-SGD on every client; client: clipped updates, noise on the server's average")
    p.add_argument("--epsilon", type=float, default=None, help="DP budget, spent by the last round (with --dp)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--features", choices=["scatter"], default=None,
                   help="train on fixed ScatterNet features of the images (for DP: e.g. with --model "
                        "veil.dp.models:scatter_linear)")
    p.add_argument("--clip", type=float, default=1.0,
                   help="DP clipping norm: per example (record) or per client update (client); default 1.0")
    p.add_argument("--accountant", choices=["prv", "rdp"], default="prv")
    p.add_argument("--target", type=float, default=None, help="report the first round reaching this accuracy")
    p.add_argument("--init", default=None, metavar="MODEL.pt",
                   help="start from these weights (a state_dict of --model) instead of a fresh model")


def _task_from(args: argparse.Namespace) -> tuple[Any, Any]:
    from veil.fl import FLTask, ServerSettings
    from veil.fl.privacy import ClientDP, RecordDP

    if args.dp and args.epsilon is None:
        raise ValueError("--dp needs --epsilon, the budget to spend over the run")
    record = RecordDP(args.epsilon, rounds=args.rounds, delta=args.delta, max_grad_norm=args.clip,
                      accountant=args.accountant) if args.dp == "record" else None
    client = ClientDP(args.epsilon, rounds=args.rounds, delta=args.delta, clipping_norm=args.clip,
                      accountant=args.accountant) if args.dp == "client" else None
    task = FLTask(model=args.model, data=args.data, num_clients=args.clients, partition=args.partition,
                  partition_seed=args.partition_seed, local_epochs=args.local_epochs, batch_size=args.batch_size,
                  lr=args.lr, momentum=args.momentum, faults=tuple(args.fault), record_dp=record,
                  features=args.features)
    settings = ServerSettings(rounds=args.rounds, strategy=args.strategy, clients_per_round=args.clients_per_round,
                              proximal_mu=args.mu, server_lr=args.server_lr, secure=args.secure,
                              secagg_threshold=args.secagg_threshold, client_dp=client,
                              max_client_records=getattr(args, "max_client_records", None))
    return task, settings


def _initial_weights(args: argparse.Namespace, task: Any) -> Any:
    if args.init is None:
        return None
    import torch

    from veil.fl.task import FLError, build_model, get_weights

    model = build_model(task.model)
    try:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError) as e:
        raise FLError(f"--init {args.init}: not a state_dict of {task.model!r} ({e})") from None
    return get_weights(model)


def _simulate(args: argparse.Namespace) -> int:
    from veil.fl import simulate

    task, settings = _task_from(args)
    result = simulate(task, settings, initial_weights=_initial_weights(args, task), progress=not args.no_progress,
                      verbose=args.verbose)
    return _report(args, result)


def _server(args: argparse.Namespace) -> int:
    from veil.fl.hosts import serve

    task, settings = _task_from(args)
    admit = [n.strip() for n in args.admit.split(",") if n.strip()]
    result = serve(task, settings, certs=args.certs, out=args.out, listen=args.listen, name=args.name, clients=admit,
                   initial_weights=_initial_weights(args, task), progress=not args.no_progress,
                   insecure=args.insecure)
    return _report(args, result)


def _client(args: argparse.Namespace) -> int:
    from veil.fl.deploy import ClientPolicy
    from veil.fl.node import join

    policy = ClientPolicy(require_secure=args.require_secure, max_epsilon=args.max_epsilon,
                          allowed_models=tuple(args.allow_model))
    return join(args.server, certs=args.certs, partition_id=args.partition_id, data=args.data, name=args.name,
                policy=policy, runtime_port=args.runtime_port, wait=args.wait, start_timeout=args.start_timeout,
                insecure=args.insecure)


def _report(args: argparse.Namespace, result: Any) -> int:
    import torch

    from veil.files import atomic_writer
    from veil.fl.plots import plot_accuracy_rounds

    task, settings = result.task, result.settings
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
