"""``veil he demo``: a client and an untrusted server on this machine, talking over mutual TLS.

The server is a separate process (``veil he serve``) that gets the model and its TLS identity, and
nothing else. Run as root, it drops to another user (``nobody``) once it has read its files, and
before serving it checks that it cannot read the client's directory (the client's TLS key and the
CKKS secret key): it refuses to serve otherwise. The client connects, receives the model's public
description, makes its keys, sends the server key file's content, and runs batched and latency
requests; only it can decrypt the answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from veil.he.models import HEError


def run_demo(*, model: str | Path | None = None, data: str = "mnist", images: int = 4096, latency_images: int = 5,
             server_user: str = "nobody", workdir: str | Path | None = None, timeout: float = 600.0
             ) -> Iterator[dict[str, Any]]:
    """Yields one dict per mode (the client's figures) and one about the server's confinement."""
    from veil.data.images import load_pixels
    from veil.he import ciphertexts
    from veil.he.bench import default_model
    from veil.he.keys import HEParams, keygen, save_keys, server_key_bytes
    from veil.he.latency import rotation_steps
    from veil.he.service import HEClient
    from veil.net.certs import generate_certificates

    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="veil-he-demo-"))
    pki, client_dir, server_dir = work / "pki", work / "client", work / "server"
    for d in (client_dir, server_dir):
        d.mkdir(parents=True, exist_ok=True)
    client_dir.chmod(0o700)
    generate_certificates(["server", "client"], pki, extra_names={"server": ["localhost", "127.0.0.1"]})
    for name, dest in (("server", server_dir), ("client", client_dir)):
        for f in ("ca.pem", f"{name}.pem", f"{name}.key"):
            shutil.copy2(pki / f, dest / f)
    if model is None:
        model = default_model(Path(".cache/he"))[1]
    shutil.copy2(model, server_dir / "model.pt")

    root = os.geteuid() == 0
    cmd = [sys.executable, "-m", "veil.cli.main", "he", "serve", "--model", str(server_dir / "model.pt"),
           "--listen", "127.0.0.1:0", "--certs", str(server_dir), "--admit", "client", "--sessions", "1"]
    if root:
        cmd += ["--user", server_user, "--unreadable", str(client_dir)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=server_dir)
    errors: list[str] = []
    drain = threading.Thread(target=lambda: errors.extend(server.stderr), daemon=True)  # type: ignore[arg-type]
    drain.start()
    try:
        ready = _ready_line(server, errors, timeout)
        host, _, port = ready["listening"].rpartition(":")
        with HEClient((host, int(port)), client_dir, "client", timeout=timeout) as client:
            params = HEParams()
            keys = keygen(params, rotation_steps(client.plan, params.slots))
            save_keys(keys, client_dir / "client.key", client_dir / "server.key")
            key_bytes = len(server_key_bytes(keys))
            t = time.perf_counter()
            client.open(keys)
            keys_s = time.perf_counter() - t
            for mode, n in (("batched", images), ("latency", latency_images)):
                if not n:
                    continue
                x, y = load_pixels(data, "test", n)
                sent, received = client.bytes_sent, client.bytes_received
                t = time.perf_counter()
                logits = ciphertexts.decrypt(keys, client.infer(ciphertexts.encrypt(keys, x, mode, client.plan)))
                seconds = time.perf_counter() - t
                line: dict[str, Any] = {"mode": mode, "images": len(x), "seconds": round(seconds, 3),
                                        "seconds_per_image": round(seconds / len(x), 4),
                                        "bytes_sent_per_image": (client.bytes_sent - sent) // len(x),
                                        "bytes_received_per_image": (client.bytes_received - received) // len(x),
                                        "server_key_bytes": key_bytes, "server_key_upload_seconds": round(keys_s, 3)}
                if y is not None:
                    line["accuracy"] = round(float((logits.argmax(1) == y).float().mean()), 4)
                yield line
        code = server.wait(timeout=60)
        drain.join(timeout=5)
        stats = json.loads(server.stdout.read().strip().splitlines()[-1]) if server.stdout else {}
        if code != 0:
            raise HEError(f"the server exited with status {code}: {''.join(errors)[-2000:]}")
        yield {"server_uid": ready["uid"], "server_user": server_user if root else "(this user: not root)",
               "server_checked_unreadable": ready["unreadable"], "client_uid": os.getuid(),
               "server_sessions": stats.get("sessions"), "server_requests": stats.get("requests"),
               "server_images": stats.get("images"), **({"workdir": str(work)} if workdir is not None else {})}
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _ready_line(server: subprocess.Popen, errors: list[str], timeout: float) -> dict[str, Any]:
    """The server's first stdout line (``{"listening": ...}``), or its error if it exits first."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(server.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not result or not result[0].strip():
        server.kill()
        server.wait()
        time.sleep(0.1)
        raise HEError(f"the HE server did not start: {''.join(errors).strip()[-2000:] or 'no output'}")
    return json.loads(result[0])
