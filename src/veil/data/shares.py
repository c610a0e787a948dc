"""Secret-shared dataset files: each data owner shares its data once, training reads batches.

Several data owners pool a dataset without showing it to anyone: :func:`share_dataset` (a collective
call in both compute parties) secret-shares every owner's part and each compute party writes its own
share file; later runs open them with :func:`load_shares` and read :class:`SharedDataset` batches as
``SecretTensor`` s, in the same order in both parties.

The file format, its checks and its header live in :mod:`veil.data.sharefile`.

What is public: the name, the field shapes, each owner's number of rows (horizontal) or columns
(vertical), which owner holds which field, and the order of batches. Each file alone is uniformly
random (the peer's share is a pseudo-random mask from the pair PRG): it tells nothing of the values.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from veil.data.peer import _local_error, _swap_checked, agree_seed, shuffle_order  # noqa: F401 - re-exported
from veil.data.sharefile import (  # noqa: F401 - re-exported: the file format's names
    _LE_INT64,
    CHUNK_ELEMENTS,
    DIGEST_BYTES,
    MAGIC,
    NAME_PATTERN,
    PREAMBLE,
    SEED_BYTES,
    SPLITS,
    SUFFIX,
    VERSION,
    Contribution,
    FieldSpec,
    ShareFileError,
    ShareHeader,
    _get,
    _name,
    _shape,
    _write,
    verify_file,
)
from veil.files import check_output
from veil.mpc.tensor import SecretTensor
from veil.net.transport import PartyError

if TYPE_CHECKING:
    from veil.mpc.session import Session

# ---- sharing --------------------------------------------------------------------------------------
def share_dataset(session: Session, data: Mapping[str, Any] | None, *, split: str = "horizontal",
                  owners: Sequence[str] = ("alice", "bob"), out: str | Path, name: str) -> Path:
    """Secret-share the owners' data into one share file per compute party; return this party's path,
    ``out/NAME.PARTY.veilshares``. A collective call: both compute parties call it with the same
    ``split``, ``owners`` and ``name``; an owner passes ``data`` (a dict of field name to tensor), a
    party that owns nothing passes None.

    * ``split="horizontal"``: every owner passes the same fields (e.g. ``{"x": x_i, "y": y_i}``) for
      its own rows; the result holds each field concatenated along dim 0 in ``owners`` order. Each
      owner's number of rows becomes public.
    * ``split="vertical"``: the owners hold different columns of the same N rows, *aligned by index*
      (row i of every owner is the same record: the owners agree on an order, e.g. sorted by a common
      id, before sharing). A field several owners pass (``"x"``: each its own features) is concatenated
      along dim 1 in ``owners`` order; a field one owner passes (``"y"``, by the label owner) is kept.

    Steps: (1) each party checks its arguments and data locally (NaN, inf or out-of-range values give
    ``veil.ring.EncodingError``); (2) one message each way: shapes, dtypes and options (the first party
    adds the random ``dataset_id`` and the time), so that both parties fail together, with the same
    error, if either's check failed or the shapes do not line up (ValueError naming owners and shapes);
    (3) every owner's data is shared with ``session.share`` in chunks of rows (no round: the pair PRG)
    and each party streams its shares into its file, written atomically.
    """
    tensors: dict[str, torch.Tensor] = {}
    mine: dict[str, Any] | Exception
    try:
        _check_args(session, split, owners, name)
        tensors = _check_data(session, data, tuple(owners))
        check_output(out, directory=True)  # created once both parties' checks passed: no empty leftover
        plan: dict[str, Any] = {
            "name": name, "split": split, "owners": list(owners), "frac_bits": session.fixed_point.frac_bits,
            "fields": {k: {"shape": list(t.shape), "dtype": _kind(t)} for k, t in tensors.items()} or None}
        if session.index == 0:
            plan["dataset_id"] = secrets.token_hex(16)
            plan["created"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        mine = plan
    except Exception as e:
        mine = _local_error(e)
    theirs = _swap_checked(session, mine, "cannot share its data")
    assert isinstance(mine, dict)
    plans = {session.party: mine, session.peer: theirs}
    for key in ("name", "split", "owners", "frac_bits"):
        if theirs.get(key) != mine[key]:
            a, b = (plans[p].get(key) for p in session.parties)
            raise ValueError(f"{session.parties[0]} and {session.parties[1]} called share_dataset with different "
                             f"{key}: {a!r} and {b!r}")
    fields, contributions = _layout(split, tuple(owners), {o: _peer_fields(plans[o], o) for o in owners})
    first = plans[session.parties[0]]
    header = ShareHeader(name=name, dataset_id=_get(first, "dataset_id", str), party=session.party,
                         parties=session.parties, split=split, owners=tuple(owners),
                         frac_bits=session.fixed_point.frac_bits, fields=fields, contributions=contributions,
                         created=_get(first, "created", str))
    header = ShareHeader.from_dict(header.to_dict())  # exactly what a reader accepts
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / f"{name}.{session.party}{SUFFIX}"
    _write(path, header, _share_chunks(session, header, tensors))
    return path


def _check_args(session: Session, split: str, owners: Sequence[str], name: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"name {name!r} must be 1 to 100 letters, digits, '_', '.' or '-' (it names the files)")
    if (isinstance(owners, str) or not owners or len(set(owners)) != len(owners)
            or any(o not in session.parties for o in owners)):
        raise ValueError(f"owners must be distinct compute parties of the session {list(session.parties)}, "
                         f"got {owners!r}")


def _check_data(session: Session, data: Mapping[str, Any] | None, owners: tuple[str, ...]) -> dict[str, torch.Tensor]:
    me = session.party
    if me not in owners:
        if data is not None:
            raise ValueError(f"{me} is not one of the owners {list(owners)} but passed data; pass None")
        return {}
    if not isinstance(data, Mapping) or not data:
        raise TypeError(f"{me} is an owner: data must be a non-empty dict of field name to tensor, got "
                        f"{type(data).__name__}")
    out = {}
    fp = session.fixed_point
    for key, value in data.items():
        if not isinstance(key, str) or not NAME_PATTERN.fullmatch(key):
            raise ValueError(f"{me}: field name {key!r} must be letters, digits, '_', '.' or '-'")
        t = torch.as_tensor(value).detach().cpu()
        if t.is_complex() or t.dim() == 0 or t.numel() == 0:
            raise ValueError(f"{me}: field {key!r} must be a real tensor of shape (N, ...) with no empty "
                             f"dimension, got {t.dtype} of shape {tuple(t.shape)}")
        step = max(1, CHUNK_ELEMENTS // max(1, t[0].numel()))
        for a in range(0, len(t), step):  # refuse NaN, inf, overflow before anything is sent
            fp.encode(t[a:a + step], what=f"{me}'s field {key!r}")
        out[key] = t
    return out


def _kind(t: torch.Tensor) -> str:
    return "float32" if t.is_floating_point() else "int64"


def _peer_fields(plan: Mapping[str, Any], owner: str) -> dict[str, FieldSpec]:
    """An owner's fields from its plan, checked by an allowlist (the peer's plan comes off the wire)."""
    try:
        fields = _get(plan, "fields", dict)
        return {k: FieldSpec(_name({"field": k}, "field"), _shape(_get(v, "shape", list)), _get(v, "dtype", str))
                for k, v in fields.items()}
    except ValueError as e:
        raise PartyError(f"malformed share_dataset plan of {owner!r}: {e}") from None


def _layout(split: str, owners: tuple[str, ...], given: dict[str, dict[str, FieldSpec]]
            ) -> tuple[tuple[FieldSpec, ...], tuple[Contribution, ...]]:
    """Shapes of the shared fields and who contributed what; the same ValueError in both parties."""
    names = list(dict.fromkeys(k for o in owners for k in given[o]))
    dtypes = {k: "int64" if all(given[o][k].dtype == "int64" for o in owners if k in given[o]) else "float32"
              for k in names}
    fields, contributions = [], []
    if split == "horizontal":
        names = list(given[owners[0]])
        for o in owners:
            if set(given[o]) != set(names):
                raise ValueError(f"in a horizontal split every owner shares the same fields: {owners[0]} has "
                                 f"{sorted(names)}, {o} has {sorted(given[o])}")
            counts = {k: f.shape[0] for k, f in given[o].items()}
            if len(set(counts.values())) != 1:
                raise ValueError(f"{o}'s fields must have the same number of rows, got {counts}")
        start = 0
        for o in owners:
            n = given[o][names[0]].shape[0]
            contributions += [Contribution(o, k, (start, start + n), None) for k in names]
            start += n
        for k in names:
            tails = {o: given[o][k].shape for o in owners}
            if len({s[1:] for s in tails.values()}) != 1:
                raise ValueError(f"field {k!r}: the owners' rows do not line up: "
                                 f"{', '.join(f'{o} has shape {s}' for o, s in tails.items())}; in a horizontal "
                                 f"split every owner's rows must have the same shape after dimension 0")
            fields.append(FieldSpec(k, (start, *given[owners[0]][k].shape[1:]), dtypes[k]))
        return tuple(fields), tuple(contributions)
    rows = {(o, k): f.shape[0] for o in owners for k, f in given[o].items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"in a vertical split rows are aligned by index, so every owner's fields need the same "
                         f"number of rows, got {', '.join(f'{o} {k!r} {n}' for (o, k), n in rows.items())}")
    n = next(iter(rows.values()))
    for k in names:
        parts = [(o, given[o][k].shape) for o in owners if k in given[o]]
        if len(parts) == 1:
            contributions.append(Contribution(parts[0][0], k, (0, n), None))
            fields.append(FieldSpec(k, parts[0][1], dtypes[k]))
            continue
        if any(len(s) < 2 for _, s in parts) or len({s[2:] for _, s in parts}) != 1:
            raise ValueError(f"field {k!r} is split by columns (dimension 1) between "
                             f"{', '.join(f'{o} {s}' for o, s in parts)}: each part needs at least 2 dimensions "
                             f"and the same shape beyond dimension 1 (a field that one owner holds, like the "
                             f"labels, is passed by that owner alone)")
        col = 0
        for o, s in parts:
            contributions.append(Contribution(o, k, (0, n), (col, col + s[1])))
            col += s[1]
        fields.append(FieldSpec(k, (n, col, *parts[0][1][2:]), dtypes[k]))
    return tuple(fields), tuple(contributions)


def _share_chunks(session: Session, header: ShareHeader, tensors: dict[str, torch.Tensor]) -> Iterator[np.ndarray]:
    """This party's shares of every field, in file order, a chunk of rows at a time. Both parties run
    the same sequence of ``session.share`` calls."""

    def share(owner: str, field: str, a: int, b: int, shape: tuple[int, ...]) -> np.ndarray:
        value = tensors[field][a:b] if session.party == owner else None
        return session.share(value, owner=owner, shape=shape).share.cpu().numpy()

    for f in header.fields:
        parts = [c for c in header.contributions if c.field == f.name]
        step = max(1, CHUNK_ELEMENTS // math.prod(f.shape[1:]))
        if header.split == "horizontal":
            for c in parts:
                for a in range(c.rows[0], c.rows[1], step):
                    b = min(a + step, c.rows[1])
                    yield share(c.owner, f.name, a - c.rows[0], b - c.rows[0], (b - a, *f.shape[1:]))
            continue
        for a in range(0, f.shape[0], step):
            b = min(a + step, f.shape[0])
            chunks = [share(c.owner, f.name, a, b, (b - a, *f.shape[1:]) if c.columns is None
                            else (b - a, c.columns[1] - c.columns[0], *f.shape[2:])) for c in parts]
            yield chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=1)


# ---- loading and reading ------------------------------------------------------------------------------
def load_shares(session: Session, path: str | Path) -> SharedDataset:
    """Open this party's share file. A collective call: both compute parties load their own files,
    then swap headers (one message each way) and refuse files that are not two halves of one sharing;
    any problem on either side raises :class:`ShareFileError` in both parties."""
    path = Path(path)
    try:
        header, offset = verify_file(path)
        if header.party != session.party:
            raise ShareFileError(f"{path}: this is {header.party}'s share file; {session.party} must load its own "
                                 f"({header.name}.{session.party}{SUFFIX})")
        if header.parties != session.parties:
            raise ShareFileError(f"{path}: written for compute parties {list(header.parties)}, this session has "
                                 f"{list(session.parties)}")
        if header.frac_bits != session.fixed_point.frac_bits:
            raise ShareFileError(f"{path}: shares with {header.frac_bits} fractional bits, the session uses "
                                 f"{session.fixed_point.frac_bits}: use session.replace(precision={header.frac_bits})")
        mine: dict[str, Any] | Exception = {"file": str(path), "common": header.common()}
    except Exception as e:
        mine = _local_error(e)
    theirs = _swap_checked(session, mine, "cannot use its share file")
    assert isinstance(mine, dict)
    ours, other = mine["common"], theirs.get("common")
    if not isinstance(other, dict) or _canonical(ours) != _canonical(other):
        keys = [k for k in ours if not isinstance(other, dict) or _canonical(ours[k]) != _canonical(other.get(k))]
        diffs = "; ".join(f"{k}: {_short(ours[k])} here, {_short(other.get(k) if isinstance(other, dict) else None)} "
                          f"there" for k in keys)
        raise ShareFileError(f"{path} and {session.peer}'s file {str(theirs.get('file'))[:300]} are not two halves "
                             f"of one sharing ({diffs}); load the files that one share_dataset run wrote")
    return SharedDataset(session, path, header, offset)


def _canonical(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def _short(v: Any) -> str:
    s = _canonical(v)
    return s if len(s) <= 120 else s[:117] + "..."


class SharedDataset:
    """This party's shares of a dataset, read from its share file (open it with :func:`load_shares`).

    The payload is memory-mapped: a batch reads only its rows. Every method that returns shares must be
    called by both compute parties with the same arguments (indices, batch size, seed).
    """

    def __init__(self, session: Session, path: Path, header: ShareHeader, payload_offset: int) -> None:
        self.session, self.path, self.header = session, path, header
        self._arrays: dict[str, np.memmap[Any, np.dtype[np.int64]]] = {}
        offset = payload_offset
        for f in header.fields:
            self._arrays[f.name] = np.memmap(path, dtype=_LE_INT64, mode="r", offset=offset, shape=f.shape)
            offset += 8 * f.numel

    def __len__(self) -> int:
        return self.header.rows

    @property
    def name(self) -> str:
        return self.header.name

    @property
    def dataset_id(self) -> str:
        return self.header.dataset_id

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.header.fields)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {f.name: f.shape for f in self.header.fields}

    def get(self, indices: Sequence[int] | torch.Tensor | np.ndarray | slice) -> dict[str, SecretTensor]:
        """The rows ``indices`` (a slice or a 1-D sequence of row numbers; negative ones count from the
        end) of every field, as SecretTensors of this session. Local: no message."""
        n = len(self)
        if isinstance(indices, slice):
            idx: slice | np.ndarray = indices
        else:
            idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
            if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
                raise IndexError(f"indices must be a slice or a 1-D sequence of integers, got shape "
                                 f"{idx.shape} of {idx.dtype}")
            idx = idx.astype(np.int64)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"row index out of range for {self.name!r} with {n} rows "
                                 f"(got {int(idx.min())}..{int(idx.max())})")
        out = {}
        for name, arr in self._arrays.items():
            rows = arr[idx]  # a view of the file for a slice, a copy in memory for indices
            rows = np.array(rows, dtype=np.int64) if isinstance(idx, slice) else np.asarray(rows, dtype=np.int64)
            out[name] = SecretTensor(torch.from_numpy(rows).to(self.session.device), self.session,
                                     dtype=torch.float32)
        return out

    def batches(self, batch_size: int, *, shuffle_seed: bytes | None, drop_last: bool = False
                ) -> Iterator[dict[str, SecretTensor]]:
        """Batches of ``batch_size`` rows of every field, in file order (``shuffle_seed=None``) or in the
        order :func:`shuffle_order` gives for the seed (get one with :func:`agree_seed`; a new seed per
        epoch gives a new order). Both parties first swap a digest of their options and seed (one
        message each way) and fail together if they would iterate differently; the order is then public
        to both, the rows stay secret."""
        try:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
            if shuffle_seed is not None and (not isinstance(shuffle_seed, bytes) or len(shuffle_seed) < SEED_BYTES):
                raise ValueError(f"shuffle_seed must be None or at least {SEED_BYTES} bytes agreed by both "
                                 f"parties (see agree_seed), got {shuffle_seed!r}")
            seed_check = None if shuffle_seed is None else hashlib.sha256(b"veil seed check" + shuffle_seed).hexdigest()
            mine: dict[str, Any] | Exception = {"dataset_id": self.header.dataset_id, "batch_size": batch_size,
                                                "drop_last": bool(drop_last), "seed": seed_check}
        except Exception as e:
            mine = _local_error(e)
        theirs = _swap_checked(self.session, mine, "cannot iterate over the shared dataset")
        assert isinstance(mine, dict)
        diffs = [k for k in mine if theirs.get(k) != mine[k]]
        if diffs:
            raise ValueError(f"{self.session.party} and {self.session.peer} would read different batches of "
                             f"{self.name!r}: their {', '.join(diffs)} differ (seeds compared by digest)")
        order = None if shuffle_seed is None else shuffle_order(shuffle_seed, len(self)).numpy()
        return self._iterate(order, batch_size, drop_last)

    def _iterate(self, order: np.ndarray | None, batch_size: int, drop_last: bool) -> Iterator[dict[str, SecretTensor]]:
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        for a in range(0, stop, batch_size):
            yield self.get(slice(a, min(a + batch_size, n)) if order is None else order[a:a + batch_size])

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={s}" for k, s in self.shapes.items())
        return (f"SharedDataset({self.name!r}, party={self.session.party!r}, rows={len(self)}, {shapes}, "
                f"file={str(self.path)!r})")
