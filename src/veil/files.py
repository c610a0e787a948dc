"""Files that are never half-written: every writer goes through a temporary file in the target's
directory, ``fsync``, then ``os.replace`` (atomic on POSIX). A crash leaves the old file or none."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """``with atomic_writer(path) as f: f.write(...)``: ``path`` appears, complete, when the block ends
    without an error; on an error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, mode) as f:
        f.write(data)


# ---- sealed files: magic, version, JSON header, int64 payload, SHA-256 ------------------------------
SEALED_PREAMBLE = struct.Struct("<8sII")
SEALED_DIGEST_BYTES = 32
SEALED_MAX_HEADER_BYTES = 1 << 20
_LE_INT64 = np.dtype("<i8")


def write_sealed(path: str | Path, magic: bytes, version: int, header: dict[str, Any], chunks: Iterable[np.ndarray],
                 payload_bytes: int) -> None:
    """Write ``magic | version | H | header (JSON, padded to 8) | int64 chunks | SHA-256`` atomically.

    The layout of share files and checkpoints (their modules state their own header keys):
    offset 0, 8 bytes magic; 8, uint32 LE version; 12, uint32 LE header length H (a multiple of 8, at
    most 1 MiB); 16, H bytes of UTF-8 JSON padded with spaces; then ``payload_bytes`` of little-endian
    int64; then the SHA-256 of everything before it."""
    path = Path(path)
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    if len(body) > SEALED_MAX_HEADER_BYTES:
        raise ValueError(f"{path}: the header would take {len(body)} bytes, more than {SEALED_MAX_HEADER_BYTES}")
    digest = hashlib.sha256()
    written = 0
    with atomic_writer(path) as f:
        for part in (SEALED_PREAMBLE.pack(magic, version, len(body)), body):
            digest.update(part)
            f.write(part)
        for arr in chunks:
            view = np.ascontiguousarray(arr, dtype=_LE_INT64).data.cast("B")
            digest.update(view)
            f.write(view)
            written += len(view)
        if written != payload_bytes:
            raise AssertionError(f"wrote {written} payload bytes, the header says {payload_bytes}")
        f.write(digest.digest())


def _sha256_prefix(f: Any, n: int) -> bytes:
    digest, buf = hashlib.sha256(), bytearray(1 << 23)
    view = memoryview(buf)
    f.seek(0)
    while n > 0:
        k = f.readinto(view[:min(n, len(buf))])
        if not k:
            break
        digest.update(view[:k])
        n -= k
    return digest.digest()


@dataclass(frozen=True)
class SealedFile:
    """What :func:`read_sealed` checked: the raw header (None if unreadable, with ``problem``), the
    payload's offset, the file size and whether the digest matched."""

    header: dict[str, Any] | None
    problem: str
    offset: int
    size: int
    digest_ok: bool

    @property
    def payload_bytes(self) -> int:
        return self.size - self.offset - SEALED_DIGEST_BYTES


def read_sealed(path: str | Path, magic: bytes, version: int, *, what: str,
                error: type[Exception] = ValueError) -> SealedFile:
    """Check magic, version and size, hash the file once, and parse its JSON header; ``error`` names
    the file and the problem for what cannot be read at all (the caller judges header and digest)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            pre = f.read(SEALED_PREAMBLE.size)
            if len(pre) < SEALED_PREAMBLE.size:
                raise error(f"{path}: truncated: {size} bytes, less than the {SEALED_PREAMBLE.size}-byte preamble")
            got_magic, got_version, hlen = SEALED_PREAMBLE.unpack(pre)
            if got_magic != magic:
                raise error(f"{path}: not a Veil {what} (magic {got_magic!r}, expected {magic!r})")
            if got_version != version:
                raise error(f"{path}: {what} format version {got_version}; this Veil reads version {version} only")
            if size < SEALED_PREAMBLE.size + SEALED_DIGEST_BYTES:
                raise error(f"{path}: truncated: {size} bytes, too short for a {what}")
            ok = _sha256_prefix(f, size - SEALED_DIGEST_BYTES) == f.read(SEALED_DIGEST_BYTES)
            header, problem = None, ""
            if hlen % 8 or hlen > SEALED_MAX_HEADER_BYTES or SEALED_PREAMBLE.size + hlen > size - SEALED_DIGEST_BYTES:
                problem = f"impossible header length {hlen}"
            else:
                f.seek(SEALED_PREAMBLE.size)
                try:
                    header = json.loads(f.read(hlen).decode())
                    if not isinstance(header, dict):
                        header, problem = None, "malformed header: not a JSON object"
                except (ValueError, UnicodeDecodeError) as e:
                    problem = f"malformed header: {e}"
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {e}") from None
    return SealedFile(header, problem, SEALED_PREAMBLE.size + hlen, size, ok)


def torch_load_problem(e: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused a file, without torch's advice to
    turn the safe loader off (which would run code from the file)."""
    text = str(e).strip()
    if "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0] if (
            "WeightsUnpickler error:" in text) else ""
        return "not a file written by torch.save, or a damaged one" + (f" ({detail})" if detail else "")
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_digest(obj: Any) -> str:
    """Hex SHA-256 of a checkpoint-like object (dicts, lists, tensors, numbers, strings), independent of
    how ``torch.save`` laid it out: a checkpoint stores it and checks it on loading, so that a bit flipped
    inside a tensor (which ``torch.load`` does not notice) is caught."""
    import torch

    digest = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            digest.update(b"{%d" % len(v))
            for k in sorted(v, key=repr):
                digest.update(repr(k).encode())
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            digest.update(b"[%d" % len(v))
            for x in v:
                walk(x)
        elif isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(v).encode())

    walk(obj)
    return digest.hexdigest()


def missing_file_problem(path: str | Path, what: str) -> str | None:
    """Why ``path`` cannot be read as a ``what`` file (missing, or a directory), or None if it is a file."""
    path = Path(path)
    if path.is_file():
        return None
    return f"{path}: is a directory, not a {what}" if path.is_dir() else f"{path}: no such {what}"


def check_output(path: str | Path | None, *, directory: bool = False, flag: str = "--out") -> None:
    """Refuse an output path that cannot be written, before any work: a directory where a file goes
    (or the reverse), or a parent that is a file. ValueError naming ``flag`` and the path."""
    if path is None:
        return
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a directory")
    if not directory and path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
            break
