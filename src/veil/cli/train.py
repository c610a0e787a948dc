"""``veil train``: private training on secret-shared data files (see ``veil share``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from veil.cli.dp_train import add_dp_arguments, run_dp
from veil.cli.parties import add_party_arguments, check_party_arguments
from veil.cli.parties import run_job as run_parties


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on secret-shared data (inputs, labels, model all stay secret), or with "
                      "differential privacy on your own data (--dp)",
        description="Each party reads its own share files (DIR/NAME.PARTY.veilshares, written by `veil share`). "
                    "The model owner builds the architecture (and may load initial weights), shares it, and "
                    "the parties train on shares with checkpoints every epoch. The loss and test accuracy are "
                    "revealed only to --reveal-to, the final weights only to --weights-to. Without --party: all "
                    "parties on this machine; with --party NAME --peers FILE: one party of a multi-host run. "
                    "With --dp: DP-SGD (Opacus) on plaintext data you hold (--data), the noise calibrated to "
                    "--epsilon/--delta, the spent epsilon reported every epoch and saved with the model.")
    p.add_argument("--arch", required=True, help="architecture: lenet, mlp, small, or 'package.module:Class'; "
                                                  "with --dp also scatter-linear, scatter-cnn, tanh-cnn")
    p.add_argument("--init", metavar="FILE", help="model owner: initial weights (state_dict .pt)")
    p.add_argument("--model-owner", default="bob", help="party that holds the initial model (default bob)")
    p.add_argument("--shares", metavar="DIR", help="directory of the share files (required without --dp)")
    p.add_argument("--name", help="name of the training data's share files (required without --dp)")
    p.add_argument("--test-name", help="name of the test data's share files (accuracy after each epoch)")
    p.add_argument("--epochs", type=int, help="default 1 (--dp: the architecture's recipe)")
    p.add_argument("--batch-size", type=int, help="default 64 (--dp: expected Poisson batch, the recipe's)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--lr", type=float, help="learning rate (default 0.05; --dp: the recipe's)")
    p.add_argument("--momentum", type=float, help="default 0 (--dp: 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--loss", default="ce", choices=["ce", "mse", "bce", "bce-logits", "nll"])
    p.add_argument("--classes", type=int, help="number of classes when labels are indices (default: the "
                                                  "model's output width)")
    p.add_argument("--reveal-to", default="alice,bob", help="parties that see the loss and accuracy ('' for none)")
    p.add_argument("--weights-to", default="", help="parties that receive the trained weights (e.g. alice)")
    p.add_argument("--loss-every", type=int, default=20, help="reveal the loss every N batches")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoints of the shares every epoch")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint both parties have")
    p.add_argument("--seed", metavar="HEX", help="public seed of the batch order (32+ hex digits; default: fresh)")
    p.add_argument("--out", metavar="FILE.pt", help="where the --weights-to parties save the weights")
    p.add_argument("--plot", metavar="FILE.png", help="loss and accuracy curves (--reveal-to parties)")
    p.add_argument("--history", metavar="FILE.json", help="per-epoch figures (--reveal-to parties)")
    p.add_argument("--truncation", default="exact", choices=["exact", "local"],
                   help="exact (default): matmul/convolution outputs truncated with one more round, never a "
                        "large error; local: no round, a large error with probability ~|x| 2^-32 per element, "
                        "which a long training eventually meets")
    add_party_arguments(p, timeout=300.0)
    add_dp_arguments(p)
    p.set_defaults(func=run)


def _parties(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _print(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    for e in summary["epochs"]:
        loss = f"loss {e['loss']:.4f}" if e.get("loss") is not None else "loss hidden"
        acc = f", test accuracy {100 * e['test_accuracy']:.2f}%" if e.get("test_accuracy") is not None else ""
        print(f"{summary['party']}: epoch {e['epoch']}: {loss}{acc}; {e['seconds']:.1f} s, "
              f"{e['bytes_with_peer'] / 1e6:.1f} MB with the other party")
    if "weights" in summary:
        print(f"{summary['party']}: trained weights saved to {summary['weights']}")


def run(args: argparse.Namespace) -> int:
    from veil.mpc.session import SessionOptions
    from veil.nn.training_job import TrainingJob, run_training

    if args.dp:
        if args.party or args.peers or args.shares:
            raise ValueError("--dp trains here on plaintext data you hold: drop --party/--peers/--shares")
        return run_dp(args)
    if not (args.shares and args.name):
        raise ValueError("veil train needs --shares DIR and --name NAME (secret-shared data; see `veil share`), "
                         "or --dp --data ... for DP-SGD on your own data")
    local = check_party_arguments(args)
    from veil.files import missing_file_problem

    if args.init is not None and (problem := missing_file_problem(args.init, "weights file")):
        raise ValueError(f"--init {problem}")
    job = TrainingJob(arch=args.arch, shares=args.shares, name=args.name, test_name=args.test_name, init=args.init,
                      model_owner=args.model_owner, epochs=_given(args.epochs, 1),
                      batch_size=_given(args.batch_size, 64),
                      optimizer=args.optimizer, lr=_given(args.lr, 0.05), momentum=_given(args.momentum, 0.0),
                      weight_decay=args.weight_decay,
                      loss=args.loss, classes=args.classes, reveal_to=_parties(args.reveal_to),
                      weights_to=_parties(args.weights_to), loss_every=args.loss_every,
                      checkpoint_dir=args.checkpoint_dir, resume=args.resume, out=args.out, plot=args.plot,
                      history=args.history, progress=not args.no_progress,
                      progress_party=args.model_owner if local else None, seed=args.seed)
    job.check()
    return run_parties("train", run_training, job, args, show=lambda party, summary: _print(summary, args.json),
                       options=SessionOptions(truncation=args.truncation), failure="training failed")


def _given(value: Any, default: Any) -> Any:
    """The option's value, its default only when it was not given (0 is a value, refused by the job's check)."""
    return default if value is None else value
