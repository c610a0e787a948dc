"""Peers file: who takes part in a session and where, for running one party per host.

Compatibility contract (JSON, UTF-8)::

    {"session": "<32 hex characters: the 16-byte session id>",
     "certs":   "<directory with ca.pem, NAME.pem, NAME.key; relative to the peers file>",
     "parties": {"alice": "host:port", "bob": "host:port", "dealer": "[::1]:port"}}

The order of ``parties`` is the party order (later parties connect to earlier ones). Every party of
a run must use the same file. The session id labels one run: frames and hellos of another session
are refused, so write a fresh peers file (``write_peers`` draws a new id) for each run. The file
holds no secret; the private keys stay in the certificate directory.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.files import write_atomic
from veil.net.certs import validate_party_names
from veil.net.transport import SESSION_ID_BYTES


@dataclass(frozen=True)
class PeersConfig:
    """A parsed peers file: session id, certificate directory, and each party's address in order."""

    session_id: bytes
    certs_dir: Path
    addresses: dict[str, tuple[str, int]]

    @property
    def parties(self) -> tuple[str, ...]:
        return tuple(self.addresses)


def parse_address(text: str, *, any_port: bool = False) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6addr]:port"`` to ``(host, port)``; ValueError when malformed.
    ``any_port``: also port 0 (a listener's "any free port")."""
    if not isinstance(text, str):
        raise ValueError(f"address must be a string 'host:port', got {text!r}")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or (":" in host and not text.startswith("[")):
        raise ValueError(f"address {text!r} is not 'host:port' (IPv6: '[addr]:port')")
    low = 0 if any_port else 1
    if not port.isdigit() or not low <= int(port) <= 65535:
        raise ValueError(f"address {text!r} has port {port!r}; expected a number in {low}..65535")
    return host, int(port)


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_peers(path: Path) -> PeersConfig:
    """Read and validate a peers file; ValueError naming the file and the faulty key."""
    path = Path(path)
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"peers file {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON peers file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with keys 'session', 'certs', 'parties'")
    missing = [k for k in ("session", "certs", "parties") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    unknown = sorted(set(data) - {"session", "certs", "parties"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}")
    session = data["session"]
    try:
        if not isinstance(session, str) or len(session) != 2 * SESSION_ID_BYTES:
            raise ValueError
        session_id = bytes.fromhex(session)
    except ValueError:
        raise ValueError(f"{path}: key 'session' must be {2 * SESSION_ID_BYTES} hex characters, "
                         f"got {session!r}") from None
    certs = data["certs"]
    if not isinstance(certs, str) or not certs:
        raise ValueError(f"{path}: key 'certs' must be a directory name, got {certs!r}")
    parties = data["parties"]
    if not isinstance(parties, dict) or len(parties) < 2:
        raise ValueError(f"{path}: key 'parties' must map at least two party names to 'host:port'")
    try:
        validate_party_names(list(parties))
    except ValueError as e:
        raise ValueError(f"{path}: key 'parties': {e}") from None
    addresses: dict[str, tuple[str, int]] = {}
    for name, text in parties.items():
        try:
            addresses[name] = parse_address(text)
        except ValueError as e:
            raise ValueError(f"{path}: key 'parties.{name}': {e}") from None
    return PeersConfig(session_id, (path.parent / certs).resolve(), addresses)


def write_peers(path: Path, addresses: Mapping[str, tuple[str, int]], *, certs_dir: Path,
                session_id: bytes | None = None) -> PeersConfig:
    """Write a peers file atomically (a fresh random session id unless given); return its config.

    ``certs_dir`` is stored relative to the peers file's directory (absolute only where no relative
    path exists, as across Windows drives).
    """
    path = Path(path)
    validate_party_names(list(addresses))
    if len(addresses) < 2:
        raise ValueError("a peers file needs at least two parties")
    sid = secrets.token_bytes(SESSION_ID_BYTES) if session_id is None else session_id
    if len(sid) != SESSION_ID_BYTES:
        raise ValueError(f"session id must be {SESSION_ID_BYTES} bytes, got {len(sid)}")
    parsed = {name: parse_address(format_address((str(h), int(p)))) for name, (h, p) in addresses.items()}
    certs_abs = Path(certs_dir).resolve()
    try:
        certs = os.path.relpath(certs_abs, path.parent.resolve())
    except ValueError:  # another drive (Windows)
        certs = str(certs_abs)
    doc = {"session": sid.hex(), "certs": certs,
           "parties": {name: format_address(a) for name, a in parsed.items()}}
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"), 0o644)
    return PeersConfig(sid, certs_abs, parsed)
