"""Share files: the on-disk format of one compute party's shares of a dataset (see
:mod:`veil.data.shares` for sharing and loading).

Share-file format, version 1 (one file per compute party, ``NAME.PARTY.veilshares``)::

    offset      size  content
    0           8     magic b"VEILSHRS"
    8           4     format version, little-endian uint32: 1
    12          4     header length H, little-endian uint32, a multiple of 8, at most 1 MiB
    16          H     header: one UTF-8 JSON object, padded with spaces to H bytes
    16 + H      P     payload: the fields of header["fields"], in that order, each as this party's shares:
                      little-endian int64 elements of Z_2^64 (two's complement), C order, no padding;
                      P = 8 * (sum of the fields' element counts)
    16 + H + P  32    SHA-256 of bytes [0, 16 + H + P)

Header keys: ``name``; ``dataset_id`` (32 hex digits: 128 bits drawn with ``secrets`` by the first
compute party, once per sharing, the same in both files); ``party`` (whose share this file holds);
``parties`` (the two compute parties, in session order); ``split`` ("horizontal" or "vertical");
``owners``; ``frac_bits`` (fixed-point fractional bits); ``fields`` (list of ``{"name", "shape",
"dtype"}``, every shape starting with the same number of rows N; dtype "int64" if every owner's
plaintext of that field was integral, else "float32"); ``contributions`` (list of ``{"owner", "field",
"rows": [start, stop], "columns": [start, stop] or null}``: which owner's data sits where, columns
meaning dimension 1 and null meaning all of them); ``created`` (UTC, ISO 8601, the first party's clock).

Compatibility contract: a reader of version 1 ignores header keys it does not know; any change a
version-1 reader would misread (payload layout, the meaning of a key) takes a new version number, and
readers refuse versions they do not know. The two files of one sharing have identical headers but for
``party``, and the two shares of an element add up to its fixed-point encoding mod 2^64.

Checks on load (each a :class:`ShareFileError` naming the file): magic, version, truncation, digest,
header against payload size, the party (alice may not load bob's file), and, with the peer (one
message each way), that both files come from one sharing: same header but for ``party``, hence the
same ``dataset_id``, shapes and precision. The digest detects damage and modification; it is not
keyed, so whoever can write a file can also rewrite its digest (semi-honest parties; see README).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from veil.files import SEALED_DIGEST_BYTES, SEALED_PREAMBLE, read_sealed, write_sealed

MAGIC = b"VEILSHRS"
VERSION = 1
DIGEST_BYTES = SEALED_DIGEST_BYTES
PREAMBLE = SEALED_PREAMBLE
MAX_ELEMENTS = 1 << 40
SUFFIX = ".veilshares"
SPLITS = ("horizontal", "vertical")
SEED_BYTES = 16
CHUNK_ELEMENTS = 1 << 21  # elements shared (and written) at a time: bounded memory
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_LE_INT64 = np.dtype("<i8")


class ShareFileError(ValueError):
    """A share file that cannot be used: not a share file, damaged or altered, another party's, or not
    the partner of the peer's file."""


# ---- the header ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldSpec:
    """A field of the dataset: its name, full shape (rows first) and the kind of its plaintext."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "int64": the kind of the owners' plaintext

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Contribution:
    """Where one owner's part of a field sits: rows [start, stop) and columns (dimension 1)."""

    owner: str
    field: str
    rows: tuple[int, int]
    columns: tuple[int, int] | None  # None: all of dimension 1


@dataclass(frozen=True)
class ShareHeader:
    """The JSON header of a share file (see the module docstring for each key)."""

    name: str
    dataset_id: str
    party: str
    parties: tuple[str, ...]
    split: str
    owners: tuple[str, ...]
    frac_bits: int
    fields: tuple[FieldSpec, ...]
    contributions: tuple[Contribution, ...]
    created: str

    @property
    def rows(self) -> int:
        return self.fields[0].shape[0]

    @property
    def payload_bytes(self) -> int:
        return 8 * sum(f.numel for f in self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dataset_id": self.dataset_id, "party": self.party, "parties": list(self.parties),
                "split": self.split, "owners": list(self.owners), "frac_bits": self.frac_bits,
                "fields": [{"name": f.name, "shape": list(f.shape), "dtype": f.dtype} for f in self.fields],
                "contributions": [{"owner": c.owner, "field": c.field, "rows": list(c.rows),
                                   "columns": None if c.columns is None else list(c.columns)}
                                  for c in self.contributions],
                "created": self.created}

    def common(self) -> dict[str, Any]:
        """The header but ``party``: equal in both files of one sharing."""
        d = self.to_dict()
        del d["party"]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ShareHeader:
        """Parse a header object strictly (ValueError naming the first bad key)."""
        if not isinstance(d, dict):
            raise ValueError("the header is not a JSON object")
        fields = tuple(FieldSpec(_name(f, "name"), _shape(_get(f, "shape", list)), _get(f, "dtype", str))
                       for f in _get(d, "fields", list))
        contributions = tuple(Contribution(_name(c, "owner"), _name(c, "field"), _range(_get(c, "rows", list)),
                                           None if _get(c, "columns", object) is None
                                           else _range(_get(c, "columns", list)))
                              for c in _get(d, "contributions", list))
        h = cls(name=_name(d, "name"), dataset_id=_get(d, "dataset_id", str), party=_name(d, "party"),
                parties=tuple(_name_list(d, "parties")), split=_get(d, "split", str),
                owners=tuple(_name_list(d, "owners")), frac_bits=_get(d, "frac_bits", int), fields=fields,
                contributions=contributions, created=_get(d, "created", str))
        if not re.fullmatch(r"[0-9a-f]{32}", h.dataset_id):
            raise ValueError(f"dataset_id {h.dataset_id!r} is not 32 hex digits")
        if h.split not in SPLITS or len(h.parties) != 2 or h.party not in h.parties:
            raise ValueError(f"split {h.split!r}, parties {list(h.parties)} or party {h.party!r} is invalid")
        if not fields or any(f.dtype not in ("float32", "int64") for f in fields):
            raise ValueError("fields must be a non-empty list with dtypes 'float32' or 'int64'")
        if len({f.name for f in fields}) != len(fields) or len({f.shape[0] for f in fields}) != 1:
            raise ValueError("fields must have distinct names and the same number of rows")
        if any(c.field not in {f.name for f in fields} or c.owner not in h.owners for c in contributions):
            raise ValueError("a contribution names an unknown field or owner")
        if sum(f.numel for f in fields) > MAX_ELEMENTS:
            raise ValueError("the fields hold more than 2^40 elements")
        return h


def _get(d: Any, key: str, kind: type) -> Any:
    v = d.get(key, ...) if isinstance(d, dict) else ...
    if v is ... or not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ValueError(f"key {key!r} is missing or not a {kind.__name__}")
    return v


def _name(d: Any, key: str) -> str:
    v = _get(d, key, str)
    if not NAME_PATTERN.fullmatch(v):
        raise ValueError(f"{key} {v!r} is not a name (letters, digits, '_', '.', '-'; at most 100)")
    return str(v)


def _name_list(d: Any, key: str) -> list[str]:
    return [_name({key: v}, key) for v in _get(d, key, list)]


def _shape(v: list[Any]) -> tuple[int, ...]:
    if not v or any(not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_ELEMENTS for n in v):
        raise ValueError(f"shape {v!r} is not a list of positive integers")
    return tuple(v)


def _range(v: list[Any]) -> tuple[int, int]:
    if len(v) != 2 or any(not isinstance(n, int) or isinstance(n, bool) for n in v) or not 0 <= v[0] < v[1]:
        raise ValueError(f"range {v!r} is not [start, stop] with 0 <= start < stop")
    return v[0], v[1]


# ---- reading and writing files ------------------------------------------------------------------
def _write(path: Path, header: ShareHeader, chunks: Iterator[np.ndarray]) -> None:
    write_sealed(path, MAGIC, VERSION, header.to_dict(), chunks, header.payload_bytes)


def verify_file(path: str | Path) -> tuple[ShareHeader, int]:
    """Check a share file (magic, version, size, digest: reads it once) and return its header and the
    offset of its payload. Raises :class:`ShareFileError` naming the file and the problem."""
    path = Path(path)
    sealed = read_sealed(path, MAGIC, VERSION, what="share file", error=ShareFileError)
    header, problem = None, sealed.problem
    if sealed.header is not None:
        try:
            header = ShareHeader.from_dict(sealed.header)
        except ValueError as e:
            problem = f"malformed header: {e}"
    size = sealed.size
    expected = None if header is None else sealed.offset + header.payload_bytes + DIGEST_BYTES
    if not sealed.digest_ok:
        if expected is not None and size < expected:
            raise ShareFileError(f"{path}: truncated: {size} bytes, its header describes {expected}")
        raise ShareFileError(f"{path}: SHA-256 digest mismatch: the file was altered or damaged after it was "
                             f"written (share the data again, or restore the file)")
    if header is None:
        raise ShareFileError(f"{path}: {problem}")
    if size != expected:
        raise ShareFileError(f"{path}: header/payload size mismatch: the header describes {header.payload_bytes} "
                             f"payload bytes ({', '.join(f'{f.name} {f.shape}' for f in header.fields)}), the file "
                             f"holds {sealed.payload_bytes}")
    return header, sealed.offset


