"""Running a secure computation: every party of a session, on one machine or one per host.

A *program* is a function ``main(session, *args)`` that every compute party runs (same code, its
own data); the dealer runs :func:`veil.mpc.dealer.serve` and never sees the program's data.

- :func:`launch` runs all parties of a session on this machine: as OS processes over TCP with
  mutual TLS (default), or as threads over the in-process transport (``transport="local"``, tests).
- :func:`run_party` / :func:`run_program` run one party of a multi-host session from a peers file.
- :func:`load_program` loads ``main`` from a script path (``veil run script.py``).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from veil.mpc import dealer as dealer_mod
from veil.mpc.session import Session, SessionOptions
from veil.net.transport import DEFAULT_TIMEOUT_S, Transport

COMPUTE_PARTIES = ("alice", "bob")
DEALER = "dealer"


def _tune_allocator() -> None:
    """Keep freed memory for reuse instead of returning it to the kernel: MPC allocates and frees
    megabyte tensors every round, and fresh pages cost a page fault each (glibc only; else no-op)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # the largest glibc accepts
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)


def _party_main(program: Callable[..., Any], args: Sequence[Any], parties: Sequence[str], dealer: str,
                options: SessionOptions | None, threads: int | None, transport: Transport) -> Any:
    if threads is not None:  # a process of its own
        torch.set_num_threads(threads)
        _tune_allocator()
    if transport.party == dealer:
        return {"requests": dealer_mod.serve(transport, (parties[0], parties[1])),
                "traffic": transport.stats.as_dict()}
    session = Session(transport, parties=parties, dealer=dealer, options=options)
    try:
        result = program(session, *args)
    except BaseException:
        session.close(abandon=True)  # report the error now, not after waiting on a dealer that may have failed
        raise
    session.close()
    return result


def _script_program(path: str, session: Session, *args: Any) -> Any:
    return load_program(Path(path))(session, *args)


def load_program(path: Path) -> Callable[..., Any]:
    """The ``main(session)`` function of a script."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is a directory, not a script" if path.is_dir() else f"no such script: {path}")
    spec = importlib.util.spec_from_file_location(f"veil_program_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {path} as a Python script")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"{path} line {e.lineno}: {e.msg} (the script does not parse)") from None
    fn = getattr(module, "main", None)
    if not callable(fn):
        raise ValueError(f"{path} defines no function main(session): veil run calls main(session) in "
                             f"every compute party")
    return fn


def _targets(program: Callable[..., Any], args: Sequence[Any], parties: Sequence[str], dealer: str,
             options: SessionOptions | None, separate_processes: bool) -> dict[str, Callable[[Transport], Any]]:
    names = [*parties, dealer]
    # Parties of one machine share its cores: one torch thread each avoids oversubscription.
    threads = 1 if separate_processes else None
    return {n: functools.partial(_party_main, program, tuple(args), tuple(parties), dealer, options, threads)
            for n in names}


def launch(program: Callable[..., Any], *args: Any, protocol: str = "2pc", transport: str = "tcp",
           parties: Sequence[str] = COMPUTE_PARTIES, dealer: str = DEALER,
           options: SessionOptions | None = None, timeout: float = DEFAULT_TIMEOUT_S,
           certs_dir: Path | None = None) -> dict[str, Any]:
    """Run ``program(session, *args)`` in every compute party; return ``{party: result}``.

    ``transport="tcp"`` starts one OS process per party (alice, bob, dealer) talking TLS on
    loopback; ``program`` and ``args`` must then be picklable (a module-level function).
    ``transport="local"`` runs the parties as threads of this process (for tests).
    """
    if protocol != "2pc":
        raise ValueError(f"unknown protocol {protocol!r}; available: ['2pc']")
    targets = _targets(program, args, parties, dealer, options, separate_processes=transport == "tcp")
    if transport == "local":
        from veil.net.local import run_threads

        results = run_threads(targets, timeout=timeout)
    elif transport == "tcp":
        from veil.net.launcher import launch_local

        results = launch_local(targets, timeout=timeout, certs_dir=certs_dir)
    else:
        raise ValueError(f"unknown transport {transport!r}; use 'tcp' or 'local'")
    return {p: results[p] for p in parties}


def launch_script(path: Path, *, timeout: float = DEFAULT_TIMEOUT_S, certs_dir: Path | None = None,
                  options: SessionOptions | None = None) -> dict[str, Any]:
    """``veil run script.py``: all parties of the script's ``main`` on this machine."""
    load_program(path)  # fail early, in the launcher, if the script is broken
    program = functools.partial(_script_program, str(path.resolve()))
    return launch(program, timeout=timeout, certs_dir=certs_dir, options=options)


def run_party(path: Path, *, party: str, peers_file: Path, timeout: float = DEFAULT_TIMEOUT_S,
              options: SessionOptions | None = None) -> Any:
    """One party of a multi-host session: ``veil run script.py --party NAME --peers FILE``."""
    program = (lambda s: None) if party == DEALER else load_program(path)
    return run_program(program, party=party, peers_file=peers_file, timeout=timeout, options=options)


def run_program(program: Callable[..., Any], *args: Any, party: str, peers_file: Path,
                timeout: float = DEFAULT_TIMEOUT_S, options: SessionOptions | None = None) -> Any:
    """Run ``program(session, *args)`` as party ``party`` of a multi-host session (the dealer
    serves instead); the peers file names every party's address, the certificates and the session."""
    from veil.net.peers import load_peers
    from veil.net.tls import TLSTransport

    cfg = load_peers(peers_file)
    names = list(cfg.addresses)
    if party not in names:
        raise ValueError(f"party {party!r} is not in {peers_file} (parties: {names})")
    compute = [n for n in names if n != DEALER]
    if DEALER not in names or len(compute) != 2:
        raise ValueError(f"{peers_file} must list two compute parties and {DEALER!r}, got {names}")
    _tune_allocator()  # this process is the party
    transport = TLSTransport.connect(party, cfg.addresses, cfg.certs_dir, cfg.session_id, timeout=timeout)
    try:
        return _party_main(program, args, compute, DEALER, options, None, transport)
    finally:
        transport.close()
