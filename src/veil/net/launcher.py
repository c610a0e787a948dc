"""Run all parties of a session on this machine, each in its own OS process, over mutual TLS.

Security: the parties talk only through :class:`~veil.net.tls.TLSTransport` on 127.0.0.1 (TLS 1.3,
certificates from one CA, a fresh random session id per launch). Without ``certs_dir`` the CA and
party keys are made for this launch in a private temporary directory (mode 0700) that is deleted
at the end. The launcher and its children exchange only their own data over multiprocessing pipes
(listening ports, the address map, each target's result or error): those are pickled, but they
never come from a peer.

Failure handling: a party that raises or dies makes the others fail quickly (their connections
drop); the launcher waits for them at most ``timeout`` + 10 s, hard-kills what is left, and raises
an error naming the party at the root of the failure, with its message (and its traceback, unless
the error was a ValueError or OSError: bad input or a missing file, which the message explains).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import pickle
import secrets
import shutil
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from veil.net.certs import generate_certificates, load_credentials, validate_party_names
from veil.net.tls import TLSTransport
from veil.net.transport import DEFAULT_TIMEOUT_S, SESSION_ID_BYTES, PartyError, Transport

GRACE_S = 10.0


def _child(party: str, target_pickle: bytes, conn: mpc.Connection, certs_dir: Path, session_id: bytes,
           timeout: float, connect_timeout: float) -> None:
    """Body of one party's process: listen, report the port, get the address map, run the target."""
    try:
        target = pickle.loads(target_pickle)  # noqa: S301 - pickled by our parent process
        listener = socket.create_server(("127.0.0.1", 0))
        _report(conn, ("port", listener.getsockname()[1]))
        if not conn.poll(connect_timeout):
            raise PartyError(f"{party}: no address map from the launcher within {connect_timeout:g} s")
        addresses = conn.recv()
        transport = TLSTransport.connect(party, addresses, certs_dir, session_id, timeout=timeout,
                                         listen_socket=listener, connect_timeout=connect_timeout)
        try:
            result = target(transport)
        finally:
            transport.close()
        _report(conn, ("ok", result))
    except BaseException as e:
        kind = "party" if isinstance(e, PartyError) else "error"
        summary = str(e) if kind == "party" else f"{type(e).__name__}: {e}"
        # A ValueError or OSError is a refusal of bad input or a missing file: its message says
        # what is wrong, a traceback from deep inside would only bury it. Anything else is a bug.
        expected = isinstance(e, ValueError | OSError | PartyError)
        _report(conn, ("error", kind, summary, "" if expected else "".join(traceback.format_exception(e))))


def _report(conn: mpc.Connection, msg: tuple[Any, ...]) -> None:
    """Send a message to the launcher as plain pickle bytes: multiprocessing's own pickler would
    pass torch tensors through shared memory that vanishes when this process exits."""
    conn.send_bytes(pickle.dumps(msg))


def _death(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"died: killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"died: killed by signal {-code}"
    return f"exited with code {code} without reporting a result"


# Root causes first: a target's own error, then a death, then the network errors they caused.
_RANK = {"error": 0, "died": 1, "party": 2, "stalled": 3}


@dataclass(frozen=True)
class _Failure:
    """Why one party failed: ``kind`` is a key of ``_RANK``; ``detail`` a traceback, if any."""

    party: str
    kind: str
    summary: str
    detail: str = ""


def launch_local(targets: Mapping[str, Callable[[Transport], Any]], *, timeout: float = DEFAULT_TIMEOUT_S,
                 certs_dir: Path | None = None, connect_timeout: float = 30.0) -> dict[str, Any]:
    """Run ``targets[name](transport)`` for every party in its own process; return their results.

    Party order is the order of ``targets``. Targets must be picklable (module-level functions or
    ``functools.partial`` of them); so must their results. Children are started with 'spawn', which
    imports the main module again: call this under ``if __name__ == "__main__":`` in scripts.

    Raises :class:`PartyError` when a party died or failed on the network, RuntimeError when a
    target raised; the message names the party at the root of the failure and gives its error.
    """
    parties = validate_party_names(list(targets))
    if len(parties) < 2:
        raise ValueError(f"a session needs at least two parties, got {list(parties)}")
    tmp: str | None = None
    try:
        if certs_dir is None:
            tmp = tempfile.mkdtemp(prefix="veil-certs-")  # mode 0700
            certs_dir = Path(tmp)
            generate_certificates(parties, certs_dir)
        for p in parties:  # fail here, naming the missing file, rather than in a child
            load_credentials(Path(certs_dir), p)
        return _run(parties, targets, Path(certs_dir), timeout, connect_timeout)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(parties: tuple[str, ...], targets: Mapping[str, Callable[[Transport], Any]], certs_dir: Path,
         timeout: float, connect_timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    session_id = secrets.token_bytes(SESSION_ID_BYTES)
    procs: dict[str, BaseProcess] = {}
    conns: dict[str, mpc.Connection] = {}
    ports: dict[str, int] = {}
    results: dict[str, Any] = {}
    failures: list[_Failure] = []
    deadline: float | None = None  # set at the first failure: wait this long for the others
    addresses_sent = False

    def handle(p: str, msg: tuple[Any, ...]) -> None:
        nonlocal addresses_sent
        if msg[0] == "port":
            ports[p] = msg[1]
            if len(ports) == len(parties) and not failures:
                addresses = {q: ("127.0.0.1", ports[q]) for q in parties}
                for q in parties:
                    try:
                        conns[q].send(addresses)
                    except OSError:
                        pass  # that child died; its exit is reported below
                addresses_sent = True
        elif msg[0] == "ok":
            results[p] = msg[1]
        else:
            failures.append(_Failure(p, msg[1], msg[2], msg[3]))

    try:
        for p in parties:
            try:
                blob = pickle.dumps(targets[p])
            except Exception as e:
                raise TypeError(f"the target of party {p!r} cannot be sent to its process ({e}); use a "
                                f"module-level function or a functools.partial of one") from e
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_child, name=f"veil-{p}", args=(
                p, blob, child_end, certs_dir, session_id, timeout, connect_timeout))
            proc.start()
            child_end.close()
            procs[p], conns[p] = proc, parent_end
        running = set(parties)
        while running:
            if failures and deadline is None:
                deadline = time.monotonic() + (timeout + GRACE_S if addresses_sent else 0.0)
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            by_obj: dict[Any, tuple[str, str]] = {}
            for p in running:
                by_obj[conns[p]] = (p, "conn")
                by_obj[procs[p].sentinel] = (p, "exit")
            ready = mpc.wait(list(by_obj), timeout=wait)
            if not ready and deadline is not None and time.monotonic() >= deadline:
                for p in sorted(running):
                    procs[p].kill()
                    failures.append(_Failure(p, "stalled", "had not finished well after the first "
                                             "failure; killed by the launcher"))
                break
            for obj in ready:
                p, what = by_obj[obj]
                if p not in running:
                    continue
                conn = conns[p]
                try:
                    while conn.poll():  # after an exit, drain what the child sent before it
                        handle(p, pickle.loads(conn.recv_bytes()))  # noqa: S301 - our own child
                        if what == "conn":
                            break
                except (EOFError, OSError):
                    what = "exit"
                if what == "exit":
                    procs[p].join(timeout=GRACE_S)
                    running.discard(p)
                    if p not in results and not any(f.party == p for f in failures):
                        failures.append(_Failure(p, "died", _death(procs[p].exitcode)))
    finally:
        for child in procs.values():
            if child.is_alive():
                child.kill()
            child.join()
        for conn in conns.values():
            conn.close()
    if failures:
        _raise(failures)
    return {p: results[p] for p in parties}


def _raise(failures: list[_Failure]) -> None:
    root = min(failures, key=lambda f: _RANK[f.kind])
    others = [f"  {line}" if line.startswith(f"{f.party}:") else f"  {f.party}: {line}"
              for f in failures if f is not root for line in [f.summary.partition(chr(10))[0]]]
    message = f"party {root.party!r} {'failed: ' if root.kind != 'died' else ''}{root.summary}"
    if others:
        message += "\nthe other parties then reported:\n" + "\n".join(others)
    if root.detail:
        message += f"\n--- traceback in party {root.party!r} ---\n{root.detail.rstrip()}"
    raise (RuntimeError if root.kind == "error" else PartyError)(message)
