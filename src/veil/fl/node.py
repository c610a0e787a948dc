"""A client host of a deployed federation (``veil fl client``): Flower's SuperNode, run by :func:`join`.

The SuperNode checks the server's certificate against the federation's CA; with a ``name`` it also
proves the client's identity with the client's own Veil key (converted to the OpenSSH format
Flower's node authentication reads). See :mod:`veil.fl.deploy` for the whole picture.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from veil.files import write_atomic
from veil.fl.deploy import ClientPolicy
from veil.fl.hosts import flower_env, parse_address, stop_process
from veil.fl.task import FLError


@contextlib.contextmanager
def _openssh_private_key(key_path: Path) -> Iterator[Path]:
    """The client's Veil key (PEM) in the OpenSSH format Flower's SuperNode reads, in a private
    temporary file removed afterwards."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise FLError(f"{key_path}: cannot read the client's key ({e})") from None
    raw = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    with tempfile.TemporaryDirectory(prefix="veil-fl-") as d:
        path = Path(d) / "node.ssh"
        write_atomic(path, raw, mode=0o600)
        yield path


def join(server: str, *, certs: str | Path | None, partition_id: int = 0, data: str | None = None,
         name: str | None = None, policy: ClientPolicy | None = None, runtime_port: int | None = None,
         wait: float = 60.0, start_timeout: float = 600.0, home: str | Path | None = None, insecure: bool = False,
         echo: Any = sys.stderr) -> int:
    """Take part in the federation served at ``server`` (``HOST:PORT``): wait up to ``start_timeout``
    seconds for the server, then train whenever it asks, until it has been gone for ``wait`` seconds.
    Returns 0 after taking part, 1 if the SuperNode failed (e.g. refused by the server)."""
    host, port = parse_address(server)
    policy = policy or ClientPolicy()
    node: dict[str, Any] = {"partition-id": int(partition_id), **policy.node_config()}
    if data is not None:
        path = Path(data).resolve()
        from veil.fl.task import load_training_data

        load_training_data(str(path))  # a clear error now rather than in every round
        node["data"] = str(path)
    node_text = " ".join(f"{k}={json.dumps(v)}" for k, v in node.items())
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cmd = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", address, "--node-config", node_text,
           "--port", str(runtime_port or 9094 + int(partition_id))]
    ca = None
    if insecure:
        cmd.append("--insecure")
    else:
        if certs is None:
            raise FLError("the client needs --certs with the federation's ca.pem (or --insecure, for a test)")
        ca = Path(certs) / "ca.pem"
        if not ca.is_file():
            raise FLError(f"missing {ca}: the CA certificate that verifies the server")
        cmd += ["--root-certificates", str(ca)]
    home_dir = Path(home) if home else Path(tempfile.gettempdir()) / f"veil-fl-client-{os.getuid()}-{partition_id}"
    env = flower_env(home_dir)
    with contextlib.ExitStack() as stack:
        if name is not None:
            if ca is None:
                raise FLError("client authentication (--name) needs TLS: drop --insecure")
            key_file = stack.enter_context(_openssh_private_key(Path(certs) / f"{name}.key"))  # type: ignore[arg-type]
            cmd += ["--auth-supernode-private-key", str(key_file)]
        deadline = time.monotonic() + start_timeout
        while True:
            first_wait = max(1.0, min(wait, deadline - time.monotonic()))
            proc = subprocess.Popen([*cmd, "--max-wait-time", f"{first_wait:g}"], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                outcome, why = _watch_supernode(proc, echo)
            finally:
                stop_process(proc, group=True)  # type: ignore[arg-type]
            if outcome == "done":
                return 0
            if outcome == "failed":
                raise FLError(f"the SuperNode failed: {why or 'see its log above'}")
            if time.monotonic() >= deadline:
                raise FLError(f"no federation server answered at {address} within {start_timeout:g} s")


def _watch_supernode(proc: subprocess.Popen[bytes], echo: Any) -> tuple[str, str]:
    """Pass the SuperNode's log on until it gives up on an absent server (Flower logs that, and then
    keeps its process alive) or fails: (``done`` if the node took part in a round before,
    ``unreachable`` if not, or ``failed``; Flower's reason)."""
    took_part, failing, why = False, False, []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace")
        if echo is not None:
            echo.write(line)
            echo.flush()
        if "Sent successfully" in line:
            took_part = True
        if "Giving up reconnection" in line:
            return ("done" if took_part else "unreachable"), ""
        if "Exit Code:" in line:  # Flower's fatal error: the code, then its explanation
            failing = True
        if failing:
            text = line.strip()
            if text.startswith("For more information") or len(why) >= 4:
                break
            if text:
                why.append(text.replace("\x1b[91mERROR \x1b[0m:", "").strip())
    return ("failed" if failing or not took_part else "done"), " ".join(why)
