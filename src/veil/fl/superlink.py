"""``python -m veil.fl.superlink [flower-superlink options]``: Flower's SuperLink with a guard.

Flower 1.41 serves its Fleet API (what SuperNodes call), its Control API (submit, stop and list
runs: a submitted app bundle is code that the server and every client will import) and its
Runtime API (the ServerApp process's link) on *one* HTTPS port, and the open-source Control API has
no authentication. Anyone who can reach the port could run code on every host of the federation.
This entry point runs the unchanged SuperLink with one addition, an ASGI middleware: a peer that is
not on the loopback interface may call the Fleet API (and the health check) only; everything else
answers 403. ``veil fl server`` submits its run from the server host itself, over loopback.

With node authentication the admitted clients' keys are registered through the Control API once
the SuperLink is up; a SuperNode that called before would be refused for good ("Failed to activate
SuperNode"). So, when ``VEIL_FLEET_READY_FILE`` names a file, the Fleet API answers 503 (which
SuperNodes retry) until that file exists: ``veil fl server`` writes it after the registrations.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

FLEET_PREFIX = "/v1/fleet/"
REMOTE_PREFIXES = (FLEET_PREFIX, "/health")
READY_ENV = "VEIL_FLEET_READY_FILE"


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


async def _answer(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RemoteFleetOnly:
    """ASGI middleware: requests from non-loopback peers reach only the Fleet API; with
    ``ready_file``, the Fleet API answers 503 until that file exists."""

    def __init__(self, app: Any, ready_file: str | None = None) -> None:
        self.app = app
        self.ready_file = ready_file
        self.ready = ready_file is None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            client = scope.get("client")
            path = str(scope.get("path", ""))
            if not is_loopback(client[0] if client else None) and not path.startswith(REMOTE_PREFIXES):
                await _answer(send, 403, b"veil: only the Fleet API is served to remote peers\n")
                return
            if path.startswith(FLEET_PREFIX) and not self.ready:
                self.ready = os.path.exists(str(self.ready_file))
                if not self.ready:
                    await _answer(send, 503, b"veil: the server is still registering its clients\n")
                    return
        await self.app(scope, receive, send)


def main() -> None:
    import flwr.superlink.main as superlink_main
    from flwr.superlink.cli import flower_superlink

    original = superlink_main.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        app.add_middleware(RemoteFleetOnly, ready_file=os.environ.get(READY_ENV) or None)
        return app

    superlink_main.create_app = create_app
    flower_superlink()


if __name__ == "__main__":
    main()
