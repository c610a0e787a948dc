"""Starting Flower's processes for ``veil fl server``: the SuperLink and the run on the server host
(:func:`serve`); and the process helpers that :mod:`veil.fl.node` (a client host's SuperNode) shares.

What runs *inside* those processes (the apps, the run's configuration, the client's policy) is
:mod:`veil.fl.deploy`; this module starts, watches and stops the processes, submits the run over
loopback, follows its progress, and turns Veil's certificates into what Flower reads (server
certificate checks, node-authentication keys). See :mod:`veil.fl.deploy` for the whole picture.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from veil.fl.apps import RoundRecord, ServerSettings
from veil.fl.deploy import (
    DONE,
    FLOWER_ENV,
    INIT_KEY,
    OUT_KEY,
    PROGRESS,
    SPEC_KEY,
    VERSION_KEY,
    WEIGHTS,
    encode_spec,
    load_weights,
    save_weights,
    veil_version,
)
from veil.fl.superlink import READY_ENV
from veil.fl.task import FLError, FLTask

DEFAULT_PORT = 9093


# ---- processes ---------------------------------------------------------------------------------------
def flower_env(home: Path) -> dict[str, str]:
    """Environment of Flower's processes: its helpers found on PATH (this interpreter's bin first),
    a private FLWR_HOME, no telemetry, no update check, no dependency installs."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(home)
    env.update(FLOWER_ENV)
    return env


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    keys = ("FLWR_HOME", *FLOWER_ENV)
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: env[k] for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0, *, group: bool = False) -> None:
    """Stop a Flower process (SIGTERM, then SIGKILL): with ``group``, its whole process group (a
    SuperNode's helper may outlive it otherwise)."""
    def signal_it(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    if proc.poll() is None:
        signal_it(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            signal_it(signal.SIGKILL)
            proc.wait(timeout=grace)
    if group:
        signal_it(signal.SIGKILL)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[IPv6]:PORT`` -> (host, port)."""
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = int(p)
    if not host or not 0 < port < 65536:
        raise FLError(f"bad address {text!r}: expected HOST:PORT")
    return host, port


def _certificate_names(path: Path) -> set[str]:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise FLError(f"{path}: cannot read the certificate ({e})") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | \
        {str(n) for n in san.get_values_for_type(x509.IPAddress)}


@dataclass(frozen=True)
class ServerCredentials:
    ca: Path
    cert: Path
    key: Path

    @staticmethod
    def from_dir(certs: str | Path, name: str = "server") -> ServerCredentials:
        d = Path(certs)
        creds = ServerCredentials(d / "ca.pem", d / f"{name}.pem", d / f"{name}.key")
        missing = [str(p) for p in (creds.ca, creds.cert, creds.key) if not p.is_file()]
        if missing:
            raise FLError(f"missing TLS files: {', '.join(missing)} (make them with veil keygen --parties {name},... "
                          f"--san {name}=localhost,127.0.0.1,::1,HOSTNAME)")
        return creds


def _local_dial(host: str) -> str:
    """Where this host's own processes dial a SuperLink bound to ``host`` (a wildcard: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104


def _control_client(address: str, ca: Path | None) -> Any:
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    if ca is None:
        conn = SuperLinkConnection(name="veil", address=address, _insecure=True)
    else:
        # Flower wants an absolute path here (a relative one is refused as an invalid value)
        conn = SuperLinkConnection(name="veil", address=address, root_certificates=str(Path(ca).resolve()))
    with contextlib.redirect_stdout(io.StringIO()):  # Flower prints "Using SuperLink: ..." each time
        return init_http_client_from_connection(conn)


def pyproject(task: FLTask, settings: ServerSettings, out: Path, init: Path | None) -> bytes:
    """The app bundle's only file: components by reference, the run configuration as values."""
    config = {SPEC_KEY: encode_spec(task, settings), VERSION_KEY: veil_version(), OUT_KEY: str(out),
              INIT_KEY: str(init or "")}
    lines = ['[project]', 'name = "veil-fl"', f'version = "{veil_version()}"', 'dependencies = []', '',
             '[tool.flwr.app]', 'publisher = "veil"', '', '[tool.flwr.app.components]',
             'serverapp = "veil.fl.deploy:server_app"', 'clientapp = "veil.fl.deploy:client_app"', '',
             '[tool.flwr.app.config]']
    lines += [f"{k} = {json.dumps(v)}" for k, v in config.items()]
    return ("\n".join(lines) + "\n").encode()


@dataclass
class _Follower:
    """Reads the ServerApp's progress lines as they come."""

    path: Path
    offset: int = 0
    rounds: list[RoundRecord] = field(default_factory=list)

    def poll(self) -> list[RoundRecord]:
        try:
            with open(self.path) as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete = chunk[:chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        new = [RoundRecord(**json.loads(line)) for line in complete.splitlines() if line.strip()]
        self.rounds += new
        return new


def serve(task: FLTask, settings: ServerSettings, *, certs: str | Path | None, out: str | Path,
          listen: str = f"0.0.0.0:{DEFAULT_PORT}", name: str = "server", clients: Sequence[str] = (),
          initial_weights: list[np.ndarray] | None = None, progress: bool = True, start_timeout: float = 60.0,
          insecure: bool = False) -> Any:
    """Serve ``task`` to clients on other hosts for ``settings.rounds`` rounds; return its FLResult.

    ``certs`` holds ``ca.pem`` and ``NAME.pem``/``NAME.key`` (``veil keygen``; the certificate must
    name the address clients dial, and the loopback address the SuperLink's own helpers dial).
    ``clients``: names whose certificates in ``certs`` (``NAME.pem``, signed by the CA) are the only
    SuperNodes admitted (Flower's node authentication); empty admits any node that reaches the port.
    """
    from tqdm import tqdm

    from veil.fl.simulate import FLResult

    host, port = parse_address(listen)
    out = Path(out).resolve()
    server_dir = out / "server"
    server_dir.mkdir(parents=True, exist_ok=True)
    for stale in (PROGRESS, DONE, WEIGHTS):
        (server_dir / stale).unlink(missing_ok=True)
    dial = _local_dial(host)
    creds = None
    if not insecure:
        if certs is None:
            raise FLError("the server needs --certs (or --insecure, for a test on one host)")
        creds = ServerCredentials.from_dir(certs, name)
        names = _certificate_names(creds.cert)
        if dial not in names:
            raise FLError(f"{creds.cert} does not name {dial!r} (it names {', '.join(sorted(names)) or 'nothing'}): "
                          f"the SuperLink's own processes dial it; regenerate with veil keygen --san "
                          f"{name}=localhost,127.0.0.1,::1,<the host name clients dial>")
    elif clients:
        raise FLError("client authentication (--clients) needs TLS: drop --insecure")
    keys = [_client_public_key(Path(certs), c, creds.ca) for c in clients] if clients and creds else []
    init_path = None
    if initial_weights is not None:
        init_path = server_dir / "initial.npz"
        save_weights(init_path, initial_weights)
    env = flower_env(out / "flwr-home")
    ready_file = server_dir / "fleet-ready"
    ready_file.unlink(missing_ok=True)
    if keys:  # SuperNodes wait (503) until every admitted key is registered
        env[READY_ENV] = str(ready_file)
    cmd = [sys.executable, "-m", "veil.fl.superlink", "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if creds is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(creds.ca), "--ssl-certfile", str(creds.cert), "--ssl-keyfile", str(creds.key)]
    if keys:
        cmd.append("--enable-supernode-auth")
    log_path = out / "superlink.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log_file:
        # in this process's group: whatever kills `veil fl server` kills its SuperLink too
        link = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    bar = None
    try:
        with _environ(env):
            address = f"[{dial}]:{port}" if ":" in dial else f"{dial}:{port}"
            control = _wait_for_control(address, None if creds is None else creds.ca, link, log_path, start_timeout)
            for client_name, key in zip(clients, keys):
                _register(control, client_name, key)
            ready_file.write_bytes(b"")
            run_id = _submit(control, pyproject(task, settings, server_dir, init_path))
            bar = tqdm(total=settings.rounds, desc="federated rounds", unit="round", disable=not progress)
            follower = _Follower(server_dir / PROGRESS)
            try:
                status = _follow(control, run_id, follower, bar, link, log_path)
            except KeyboardInterrupt:
                _stop_run(control, run_id)
                raise
    finally:
        if bar is not None:
            bar.close()
        stop_process(link)
    done = _read_done(server_dir / DONE)
    if status[1] != "completed" or not done.get("ok"):
        why = done.get("error") or status[2] or status[1]
        raise FLError(f"the federated run did not complete ({status[1]}): {why}; see {log_path}")
    follower.poll()
    if not follower.rounds:
        raise FLError(f"the federated run completed no round; see {log_path}")
    weights = load_weights(server_dir / WEIGHTS) if (server_dir / WEIGHTS).exists() else None
    return FLResult(task, settings, follower.rounds, time.perf_counter() - t0, list(done.get("rejected", [])),
                    weights)


def _read_done(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _wait_for_control(address: str, ca: Path | None, link: subprocess.Popen[bytes], log_path: Path,
                      timeout: float) -> Any:
    from flwr.proto.control_pb2 import ListRunsRequest

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if link.poll() is not None:
            raise FLError(f"the SuperLink exited (code {link.returncode}) at start:\n{_tail(log_path)}")
        try:
            client = _control_client(address, ca)
            client.ListRuns(ListRunsRequest())
            return client
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.5)
    raise FLError(f"the SuperLink did not answer on {address} within {timeout:.0f} s ({last}):\n{_tail(log_path)}")


def _submit(control: Any, pyproject_bytes: bytes) -> int:
    from flwr.cli.build import build_fab_from_files
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab_bytes, _ = build_fab_from_files({"pyproject.toml": pyproject_bytes})
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    res = control.StartRun(StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto({}),
                                           federation=""))
    return int(res.run_id)


def _follow(control: Any, run_id: int, follower: _Follower, bar: Any, link: subprocess.Popen[bytes],
            log_path: Path) -> tuple[str, str, str]:
    from flwr.proto.control_pb2 import ListRunsRequest

    while True:
        for r in follower.poll():
            bar.set_postfix(accuracy=f"{r.accuracy:.4f}", clients=r.clients)
            bar.update(1)
        if link.poll() is not None:
            raise FLError(f"the SuperLink exited (code {link.returncode}) during the run:\n{_tail(log_path)}")
        run = control.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
        if run.status.status == "finished":
            bar.update(len(follower.poll()))
            return run.status.status, run.status.sub_status, run.status.details
        time.sleep(0.5)


def _stop_run(control: Any, run_id: int) -> None:
    from flwr.proto.control_pb2 import StopRunRequest

    with contextlib.suppress(Exception):
        control.StopRun(StopRunRequest(run_id=run_id))


# ---- client identity: Veil keys in Flower's SuperNode authentication ------------------------------
def _client_public_key(certs: Path, name: str, ca_path: Path) -> bytes:
    """Client ``name``'s public key (PEM), from its certificate after checking that the CA signed it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = certs / f"{name}.pem"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    except (OSError, ValueError) as e:
        raise FLError(f"client {name!r}: cannot read {path} ({e})") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as e:
        raise FLError(f"client {name!r}: {path} is not signed by {ca_path} ({e})") from None
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FLError(f"client {name!r}: Flower's node authentication needs an EC key")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _register(control: Any, name: str, public_key: bytes) -> None:
    from flwr.proto.control_pb2 import RegisterNodeRequest

    control.RegisterNode(RegisterNodeRequest(public_key=public_key, name=name))
