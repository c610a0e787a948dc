"""What the party-running commands (``veil infer``, ``veil share``, ``veil train``) share: the
``--party/--peers/--precision/--timeout/--json`` options, and running a job in every party on this
machine or as one party of a multi-host run, with a party's failure turned into exit status 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def add_party_arguments(p: argparse.ArgumentParser, *, timeout: float, progress: bool = True) -> None:
    p.add_argument("--party", metavar="NAME", help="run only this party (needs --peers)")
    p.add_argument("--peers", type=Path, metavar="FILE", help="peers file (JSON): session, certs, addresses")
    p.add_argument("--precision", type=int, default=16, help="fractional bits of the fixed-point ring")
    p.add_argument("--timeout", type=float, default=timeout,
                   help=f"seconds to wait for a peer (default {timeout:g})")
    p.add_argument("--json", action="store_true", help="print each party's summary as one JSON line")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_party_arguments(args: argparse.Namespace) -> bool:
    """True for a local run (all parties here); ValueError if only one of --party/--peers is given."""
    if (args.party is None) != (args.peers is None):
        raise ValueError("--party and --peers go together (one party of a multi-host run)")
    return args.party is None


def run_job(command: str, program: Callable[..., Any], job: Any, args: argparse.Namespace, *,
            show: Callable[[str, Any], None], options: Any = None, parties: Sequence[str] | None = None,
            failure: str = "the job failed") -> int:
    """Run ``program(session, job)`` in every party here (``args.party`` None) or as ``args.party``;
    ``show(party, result)`` prints each compute party's result. Returns the exit status."""
    from veil.mpc.runtime import launch, run_program
    from veil.mpc.session import SessionOptions
    from veil.net.transport import PartyError

    options = (options or SessionOptions()).replace(precision=args.precision)
    try:
        if args.party is None:
            if parties:
                results = launch(program, job, parties=tuple(parties), options=options, timeout=args.timeout)
            else:
                results = launch(program, job, options=options, timeout=args.timeout)
            for party in (parties or results):
                show(party, results[party])
        elif args.party != "dealer":
            show(args.party, run_program(program, job, party=args.party, peers_file=args.peers,
                                         timeout=args.timeout, options=options))
        else:
            run_program(program, job, party=args.party, peers_file=args.peers, timeout=args.timeout,
                        options=options)
    except RuntimeError as e:  # PartyError (a party died, stalled or was refused) or the job's own error
        kind = "a party failed" if isinstance(e, PartyError) else failure
        print(f"veil {command}: {kind}:\n{e}", file=sys.stderr)
        return 1
    return 0
