"""Encrypted inference over the network: one untrusted server, clients that keep their secret keys.

The server holds a model and no key at all. A client connects over mutual TLS 1.3 (certificates of
``veil keygen``: the server proves its name, the client its own, both signed by the deployment's CA)
and the conversation is:

1. server -> client: the model's public description (:func:`veil.he.models.describe`: layer shapes,
   no weights), from which the client lays out its images and knows the rotation steps it must give;
2. client -> server: its **server key file** (public, relinearisation and Galois keys). The server
   refuses anything holding a secret key (:func:`veil.he.keys.load_server_keys`);
3. client -> server: encrypted inputs (:class:`~veil.he.ciphertexts.CiphertextSet`), server ->
   client: encrypted logits; repeated as often as the client likes;
4. client -> server: goodbye.

Every message is a Veil HE container (the bytes of the matching file), preceded by its length; a
server-side failure comes back as an error message naming the problem, and the server goes on with
the next client. TLS protects the ciphertexts' integrity on the way and authenticates both ends; the
ciphertexts themselves are what keeps the inputs and logits from the server.

On one machine the server can be run as another user (:func:`drop_privileges`, ``veil he serve
--user nobody``) after it has read its model and TLS files, and can check that it cannot read a
given file (:func:`assert_unreadable`: the client's key file in the demo).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.he import ciphertexts
from veil.he.keys import Keys, container_kind, load_server_keys, pack_container, server_key_bytes, unpack_container
from veil.he.models import HEError, Plan, describe, skeleton

LENGTH = struct.Struct(">Q")
MAX_MESSAGE_BYTES = 1 << 32  # a full batch of MNIST images is ~440 MB; Galois keys ~100 MB
DEFAULT_TIMEOUT_S = 600.0


class HEServiceError(HEError):
    """The other end refused a request, broke the protocol, died or timed out."""


# ---- framing --------------------------------------------------------------------------------------
def send_message(sock: ssl.SSLSocket, data: bytes) -> int:
    sock.sendall(LENGTH.pack(len(data)))
    sock.sendall(data)
    return LENGTH.size + len(data)


def recv_message(sock: ssl.SSLSocket, who: str, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    head = _recv_exact(sock, LENGTH.size, who)
    (n,) = LENGTH.unpack(head)
    if n > limit:
        raise HEServiceError(f"{who} announced a message of {n} bytes (limit {limit}): not a Veil HE peer?")
    return _recv_exact(sock, n, who)


def _recv_exact(sock: ssl.SSLSocket, n: int, who: str) -> bytes:
    buf = bytearray(n)
    view, pos = memoryview(buf), 0
    while pos < n:
        try:
            got = sock.recv_into(view[pos:], n - pos)
        except ssl.SSLZeroReturnError:
            got = 0
        except TimeoutError:
            raise HEServiceError(f"{who} sent nothing for {sock.gettimeout():.0f} s (stalled or gone)") from None
        except (ConnectionError, ssl.SSLError) as e:
            raise HEServiceError(f"{who} broke the connection ({e})") from None
        if got == 0:
            raise HEServiceError(f"{who} closed the connection")
        pos += got
    return bytes(buf)


def _control(kind: str, **fields: Any) -> bytes:
    return pack_container({"kind": kind, **fields}, {})


def _names(tls: ssl.SSLSocket) -> frozenset[str]:
    from veil.net.tlschannel import identity

    return identity(tls)


def _contexts(certs: str | Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from veil.net.certs import load_credentials
    from veil.net.tls import tls_contexts

    return tls_contexts(load_credentials(Path(certs), name))


# ---- server ---------------------------------------------------------------------------------------
@dataclass
class ServerStats:
    sessions: int = 0
    requests: int = 0
    images: int = 0
    refused: list[str] = field(default_factory=list)


class HEServer:
    """A model behind a TLS listener. Bind (and read every file) in the constructor; :meth:`serve`
    then needs no file access but a temporary directory (privileges can be dropped in between)."""

    def __init__(self, plan: Plan, listen: tuple[str, int], certs: str | Path, *, name: str = "server",
                 admit: tuple[str, ...] | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 log: Callable[[str], None] | None = None) -> None:
        import tenseal.sealapi  # noqa: F401 - loaded now: after a privilege drop the venv may be unreadable

        import veil.he.batched
        import veil.he.latency  # noqa: F401

        self.plan, self.admit, self.timeout = plan, admit, timeout
        self.description = describe(plan)
        self.ctx, _ = _contexts(certs, name)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stats = ServerStats()
        self._closed = False
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(listen)
        self.listener.listen(8)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop listening (from any thread: a :meth:`serve` waiting for a client returns)."""
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
        except OSError:
            pass
        self.listener.close()

    def serve(self, sessions: int | None = None) -> ServerStats:
        """Serve clients one after another; return after ``sessions`` of them (None: forever)."""
        try:
            while sessions is None or self.stats.sessions < sessions:
                try:
                    raw, peer = self.listener.accept()
                except OSError:
                    if self._closed:
                        break
                    raise
                who = f"client at {peer[0]}:{peer[1]}"
                try:
                    self._session(raw, who)
                except (HEError, OSError, ValueError) as e:
                    self.stats.refused.append(str(e))
                    self.log(f"veil he serve: {who}: {e}")
                finally:
                    self.stats.sessions += 1
        finally:
            self.close()
        return self.stats

    def _session(self, raw: socket.socket, who: str) -> None:
        raw.settimeout(self.timeout)
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            raw.close()
            raise HEServiceError(f"TLS handshake failed ({getattr(e, 'reason', None) or e}): not a client of "
                                 "this deployment's CA?") from None
        with tls:
            names = _names(tls)
            if self.admit is not None and not names & set(self.admit):
                send_message(tls, _control("he-error", message=f"certificate {sorted(names)} is not admitted"))
                raise HEServiceError(f"refused: certificate {sorted(names)} is not among --admit {list(self.admit)}")
            who = f"client {sorted(names)[0] if names else '?'!r}"
            send_message(tls, _control("he-model", description=self.description))
            keys = self._keys(tls, who)
            while True:
                data = recv_message(tls, who)
                if container_kind(data) == "he-bye":
                    return
                try:
                    cset = ciphertexts.unpack(data, keys, f"request from {who}")
                    t = time.perf_counter()
                    out = ciphertexts.evaluate(keys, self.plan, cset)
                    reply = ciphertexts.pack(out)
                except HEError as e:
                    send_message(tls, _control("he-error", message=str(e)))
                    self.log(f"veil he serve: {who}: refused a request: {e}")
                    continue
                self.stats.requests += 1  # before the reply: a client that has it may read the stats
                self.stats.images += cset.images
                send_message(tls, reply)
                self.log(json.dumps({"client": who, "mode": cset.mode, "images": cset.images,
                                     "server_seconds": round(time.perf_counter() - t, 3)}))

    def _keys(self, tls: ssl.SSLSocket, who: str) -> Keys:
        data = recv_message(tls, who)
        try:
            keys = load_server_keys(data, f"keys from {who}")
            if self.plan.depth > keys.params.depth:
                raise HEError(f"the model needs {self.plan.depth} multiplicative levels, the client's parameters "
                              f"give {keys.params.depth}")
        except HEError as e:
            send_message(tls, _control("he-error", message=str(e)))
            raise
        send_message(tls, _control("he-ready", key_id=keys.key_id))
        return keys


# ---- client ---------------------------------------------------------------------------------------
class HEClient:
    """The client's end: ``with HEClient(address, certs, name) as c: c.open(keys); c.infer(cset)``.
    Only the server key file's content (never the secret key) leaves this process."""

    def __init__(self, address: tuple[str, int], certs: str | Path, name: str, *, server_name: str = "server",
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        _, ctx = _contexts(certs, name)
        self.bytes_sent = self.bytes_received = 0
        self.key_id: str | None = None
        where = f"{address[0]}:{address[1]}"
        try:
            raw = socket.create_connection(address, timeout=timeout)
        except OSError as e:
            raise HEServiceError(f"cannot reach the HE server at {where} ({e.strerror or e})") from None
        try:
            self.tls = ctx.wrap_socket(raw, server_side=False)
        except ssl.SSLCertVerificationError as e:
            raw.close()
            raise HEServiceError(f"the server at {where} has a certificate this deployment's CA did not sign "
                                 f"({e.verify_message})") from None
        except (ssl.SSLError, OSError) as e:
            raw.close()
            raise HEServiceError(f"TLS handshake with {where} failed ({e}): certificates of another "
                                 "`veil keygen`?") from None
        names = _names(self.tls)
        if server_name not in names:
            self.tls.close()
            raise HEServiceError(f"{where} is {sorted(names)}, not the server {server_name!r}")
        self.who = f"server {server_name!r}"
        header = self._receive("he-model")
        self.description: dict[str, Any] = header["description"]
        self.plan = skeleton(self.description)

    def _receive(self, kind: str) -> dict[str, Any]:
        data = recv_message(self.tls, self.who)
        self.bytes_received += LENGTH.size + len(data)
        header, _ = unpack_container(data, (kind, "he-error"), f"reply of {self.who}")
        if header["kind"] == "he-error":
            raise HEServiceError(f"{self.who} refused: {header.get('message')}")
        return header

    def _send(self, data: bytes) -> None:
        try:
            self.bytes_sent += send_message(self.tls, data)
        except OSError as e:
            raise HEServiceError(f"{self.who} closed the connection ({e})") from None

    def open(self, keys: Keys) -> None:
        """Give the server the evaluation keys of ``keys`` (the server key file's content)."""
        self._send(server_key_bytes(keys))
        self.key_id = self._receive("he-ready")["key_id"]
        self.keys = keys

    def infer(self, cset: ciphertexts.CiphertextSet) -> ciphertexts.CiphertextSet:
        if self.key_id is None:
            raise HEServiceError("open(keys) first: the server has no evaluation keys yet")
        self._send(ciphertexts.pack(cset))
        data = recv_message(self.tls, self.who)
        self.bytes_received += LENGTH.size + len(data)
        header, _ = unpack_container(data, ("ciphertexts", "he-error"), f"reply of {self.who}")
        if header["kind"] == "he-error":
            raise HEServiceError(f"{self.who} refused: {header.get('message')}")
        return ciphertexts.unpack(data, self.keys, f"reply of {self.who}")

    def close(self) -> None:
        try:
            self._send(_control("he-bye"))
        except HEError:
            pass
        self.tls.close()

    def __enter__(self) -> HEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- confinement on one machine ---------------------------------------------------------------------
def drop_privileges(user: str) -> tuple[int, int]:
    """Become ``user`` (uid, gid and no supplementary groups) for good; needs root. Returns (uid, gid)."""
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise HEError(f"no user {user!r} on this machine") from None
    if os.geteuid() != 0:
        raise HEError(f"running as another user ({user}) needs root; this process runs as uid {os.geteuid()}")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid:
        raise HEError(f"could not drop privileges to {user}")
    try:  # SEAL's temporary files
        import tempfile

        tempfile.tempdir = None
        tempfile.gettempdir()
    except OSError as e:
        raise HEError(f"user {user} has no writable temporary directory ({e})") from None
    return entry.pw_uid, entry.pw_gid


def assert_unreadable(paths: list[str | Path]) -> None:
    """Refuse to go on if this process can read any of ``paths``: a file it can open, or a directory
    it can list (e.g. the client's key directory)."""
    for path in paths:
        try:
            if Path(path).is_dir():
                os.listdir(path)
            else:
                with open(path, "rb"):
                    pass
        except FileNotFoundError:
            raise HEError(f"{path}: no such file, so the check that the server cannot read it proves nothing") \
                from None
        except PermissionError:
            continue
        raise HEError(f"this server process can read {path}, which must stay with the client: run the server as "
                      "another user (--user) or on another host")
