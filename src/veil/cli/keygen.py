"""``veil keygen``: make a CA and one TLS key + certificate per party (see ``veil.net.certs``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from veil.net.certs import generate_certificates, validate_party_names


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "keygen", help="make a CA and a TLS certificate and key for each party",
        description="Write ca.pem, ca.key and NAME.pem, NAME.key for each party into DIR (keys mode "
                    "0600). Copy ca.pem, NAME.pem and NAME.key to the host of party NAME; keep ca.key "
                    "off the compute hosts. Existing files in DIR are replaced.")
    p.add_argument("--parties", required=True, metavar="A,B,...",
                   help="comma-separated party names, in party order (e.g. alice,bob,dealer)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write into")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")
    p.add_argument("--san", action="append", default=[], metavar="NAME=HOST[,HOST...]",
                   help="also certify host names / IP addresses for party NAME: a federated-learning server "
                        "(veil fl server) needs the names clients dial and localhost,127.0.0.1,::1; repeatable")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    parties = validate_party_names([s.strip() for s in args.parties.split(",")])
    extra: dict[str, list[str]] = {}
    for item in args.san:
        name, sep, hosts = item.partition("=")
        if not sep or not hosts.strip():
            raise ValueError(f"--san {item!r}: expected NAME=HOST[,HOST...], e.g. server=localhost,127.0.0.1")
        extra.setdefault(name.strip(), []).extend(h.strip() for h in hosts.split(",") if h.strip())
    generate_certificates(parties, args.out, days=args.days, extra_names=extra)
    out: Path = args.out
    rows = [("ca.pem", "CA certificate (copy to every host)"),
            ("ca.key", "CA private key (keep it off the compute hosts: it can mint identities)")]
    rows += [(f"{n}.pem, {n}.key", f"certificate and key of party {n!r} (copy to its host only)")
             for n in parties]
    width = max(len(f) for f, _ in rows)
    print(f"wrote to {out}:")
    for files, what in rows:
        print(f"  {files:<{width}}  {what}")
    return 0
