"""``veil run``: run a secure program's ``main(session)`` in every party (see ``veil.mpc.runtime``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run", help="run SCRIPT's main(session) as a secure computation",
        description="Without --party: start every party of the session on this machine (alice, bob "
                    "and the dealer as separate processes talking mutual TLS on loopback) and print "
                    "each compute party's result. With --party NAME --peers FILE: run only party NAME "
                    "of a multi-host session (the dealer runs the same command with --party dealer).")
    p.add_argument("script", type=Path, help="a Python file defining main(session)")
    p.add_argument("--protocol", default="2pc", choices=["2pc"],
                   help="2pc: two compute parties and a dealer (the only protocol so far)")
    p.add_argument("--party", metavar="NAME", help="run only this party (needs --peers)")
    p.add_argument("--peers", type=Path, metavar="FILE", help="peers file (JSON): session, certs, addresses")
    p.add_argument("--certs", type=Path, metavar="DIR",
                   help="certificates for a local run (default: fresh ones for this run only)")
    p.add_argument("--precision", type=int, default=16, help="fractional bits of the fixed-point ring")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for a peer's message before giving up (default 60)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from veil.mpc.runtime import launch_script, run_party
    from veil.mpc.session import SessionOptions
    from veil.net.transport import PartyError

    if (args.party is None) != (args.peers is None):
        raise ValueError("--party and --peers go together (one party of a multi-host session)")
    options = SessionOptions().replace(precision=args.precision)
    try:
        if args.party is not None:
            result = run_party(args.script, party=args.party, peers_file=args.peers, timeout=args.timeout,
                               options=options)
            print(f"{args.party}: {result!r}")
        else:
            results = launch_script(args.script, timeout=args.timeout, certs_dir=args.certs, options=options)
            for party, result in results.items():
                print(f"{party}: {result!r}")
    except RuntimeError as e:  # PartyError (a party died, stalled or was refused) or the program's error
        kind = "a party failed" if isinstance(e, PartyError) else "the program failed"
        print(f"veil run: {kind}:\n{e}", file=sys.stderr)
        return 1
    return 0
