"""Entry point of the ``veil`` command.

Each command group lives in its own module of ``veil.cli`` and exposes
``register(subparsers) -> None``, which adds its subcommand(s) and sets ``func`` (called with the
parsed arguments, returns the exit status) with ``parser.set_defaults(func=...)``. Modules stay thin:
parse, call the library, print. Import heavy libraries (torch) inside ``func``, not at module top,
so that ``veil --help`` and ``veil keygen`` stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from veil.cli import fl, he, infer, keygen, m209, run, semantic, share, train

# --- Registered command modules (add new ones here, in the order `veil --help` lists them) ---------
COMMANDS: tuple[ModuleType, ...] = (
    keygen,
    run,
    infer,
    share,
    train,
    m209,
    fl,
    semantic,
    he,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veil", description="Machine learning on data that nobody may see: secure multi-party "
                                 "computation on PyTorch.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit status.

    Expected failures (ValueError, OSError) print ``veil: error: ...`` and return 1; anything else is
    a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, OSError) as e:
        print(f"veil {args.command}: error: {_describe(e)}", file=sys.stderr)
        return 1


def _describe(e: BaseException) -> str:
    """An error's message; an OSError about a file as ``FILE: problem`` (not ``[Errno 21] ...``)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror[0].lower()}{e.strerror[1:]}"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
