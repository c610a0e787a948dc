"""Federated learning across hosts: Flower's deployment engine over TLS (``veil fl server`` / ``client``).

The same apps as in simulation (:mod:`veil.fl.apps`), here as module-level objects that Flower
imports by name in its own processes: ``veil.fl.deploy:server_app`` runs in a ``flwr-serverapp``
process on the server host, ``veil.fl.deploy:client_app`` in a fresh ``flwr-clientapp`` process for
every message on each client host. Veil must be installed on every host (nothing is shipped in the
app bundle but its ``pyproject.toml``, and nothing is installed at run time).

The processes are started by :mod:`veil.fl.hosts` (server) and :mod:`veil.fl.node` (clients).

**Server** (:func:`veil.fl.hosts.serve`): starts Flower's SuperLink (through :mod:`veil.fl.superlink`, which keeps
the Control and Runtime APIs to loopback) on one HTTPS port with the server's certificate, submits
the run (a bundle whose configuration is the task and the server settings as JSON), follows it
(a progress bar over rounds, from the lines the ServerApp appends to ``OUT/server/progress.jsonl``),
and returns the :class:`~veil.fl.simulate.FLResult` built from the files the ServerApp writes.

**Client** (:func:`veil.fl.node.join`): runs Flower's SuperNode against the server, checking the server's
certificate against the federation's CA; with ``name`` it also proves its identity (Flower's
SuperNode authentication, with the client's own Veil key: the server registers the public keys of
the certificates it is told to admit, and refuses any other node). A client trains on its own
``.npz`` (``data``), or on its partition of a data set every host has (``mnist``, ``digits``). The
run's configuration comes from the server; a client can refuse what it has not agreed to:
``require_secure`` (no update leaves unmasked), ``max_epsilon`` (record-level DP at most this
budget) and, by default, any model that is not one of Veil's named models (an import path would
run server-chosen code on the client).

Transport security is Flower's: TLS with server authentication (no client certificates); client
identity comes from SuperNode authentication. See the README's threat model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from veil.files import atomic_writer, write_atomic
from veil.fl.apps import RoundRecord, RoundRecorder, ServerSettings, VeilClient, flower_client, run_server
from veil.fl.privacy import ClientDP, RecordDP
from veil.fl.task import FLError, FLTask

SPEC_KEY, VERSION_KEY, OUT_KEY, INIT_KEY = "veil-spec", "veil-version", "veil-out", "veil-init"
PROGRESS, DONE, WEIGHTS = "progress.jsonl", "done.json", "weights.npz"
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
ZOO_MODELS = ("lenet", "mlp", "smallnet", "digits-mlp", "veil.dp.models:scatter_linear", "veil.dp.models:scatter_cnn",
              "veil.dp.models:tanh_cnn")  # Veil's own: no server-chosen code


def veil_version() -> str:
    from veil import __version__

    return __version__


# ---- the run's configuration: task and settings as JSON ------------------------------------------
def encode_spec(task: FLTask, settings: ServerSettings) -> str:
    return json.dumps({"task": asdict(task), "settings": asdict(settings)}, sort_keys=True)


def decode_spec(text: str) -> tuple[FLTask, ServerSettings]:
    """Task and settings from :func:`encode_spec`'s JSON (as validated as when built by hand)."""
    try:
        d = json.loads(text)
        t, s = dict(d["task"]), dict(d["settings"])
        if t.get("record_dp") is not None:
            t["record_dp"] = RecordDP(**t["record_dp"])
        if t.get("partitions") is not None:
            t["partitions"] = tuple(tuple(int(i) for i in p) for p in t["partitions"])
        t["faults"] = tuple(t.get("faults", ()))
        if s.get("client_dp") is not None:
            s["client_dp"] = ClientDP(**s["client_dp"])
        return FLTask(**t), ServerSettings(**s)
    except (ValueError, TypeError, KeyError) as e:
        raise FLError(f"malformed run configuration ({type(e).__name__}: {e})") from None


def _spec_from(run_config: Any) -> tuple[FLTask, ServerSettings]:
    theirs = str(run_config.get(VERSION_KEY, "?"))
    if theirs != veil_version():
        raise FLError(f"the server runs veil {theirs}, this host veil {veil_version()}: install the same version")
    return decode_spec(str(run_config[SPEC_KEY]))


# ---- what a client agrees to -----------------------------------------------------------------------
@dataclass(frozen=True)
class ClientPolicy:
    """What a deployed client refuses to take part in (checked on every message)."""

    require_secure: bool = False
    max_epsilon: float | None = None          # record-level DP with at most this epsilon, or refuse
    allowed_models: tuple[str, ...] = ()      # import paths allowed besides Veil's named models

    def check(self, task: FLTask, settings: ServerSettings) -> None:
        if self.require_secure and not settings.secure:
            raise FLError("this client requires secure aggregation and the server did not ask for it")
        if self.max_epsilon is not None:
            dp = task.record_dp
            if dp is None:
                raise FLError(f"this client requires record-level DP (epsilon <= {self.max_epsilon:g}) and the "
                              "run has none")
            if dp.target_epsilon > self.max_epsilon:
                raise FLError(f"the run asks for record-level DP at epsilon {dp.target_epsilon:g}, this client "
                              f"allows at most {self.max_epsilon:g}")
        if task.model not in ZOO_MODELS and task.model not in self.allowed_models:
            raise FLError(f"the run's model {task.model!r} is not one of Veil's named models "
                          f"({', '.join(ZOO_MODELS)}); allow it on this client with --allow-model {task.model}")

    def node_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"require-secure": self.require_secure}
        if self.max_epsilon is not None:
            out["max-epsilon"] = float(self.max_epsilon)
        if self.allowed_models:
            out["allow-models"] = ",".join(self.allowed_models)
        return out

    @staticmethod
    def from_node_config(node: Any) -> ClientPolicy:
        eps = node.get("max-epsilon")
        models = str(node.get("allow-models", "") or "")
        return ClientPolicy(require_secure=bool(node.get("require-secure", False)),
                            max_epsilon=None if eps is None else float(eps),
                            allowed_models=tuple(m for m in models.split(",") if m))


# ---- the apps Flower imports by name -----------------------------------------------------------------
def _build_apps() -> tuple[Any, Any]:
    from flwr.client import ClientApp
    from flwr.client.mod import secaggplus_mod
    from flwr.server import ServerApp

    def client_fn(context: Any) -> Any:
        task, settings = _spec_from(context.run_config)
        node = context.node_config
        ClientPolicy.from_node_config(node).check(task, settings)
        data = str(node.get("data", "") or "") or None
        return flower_client(VeilClient(task, int(node.get("partition-id", 0)), data))

    def secagg_when_asked(msg: Any, ctxt: Any, call_next: Any) -> Any:
        _, settings = _spec_from(ctxt.run_config)
        if settings.secure:
            from veil.fl.secagg import install

            install()  # SecAgg+ masks from AES-CTR (veil.fl.secagg), in every clientapp process
            return secaggplus_mod(msg, ctxt, call_next)
        return call_next(msg, ctxt)

    sapp = ServerApp()

    @sapp.main()
    def main(grid: Any, context: Any) -> None:
        cfg = context.run_config
        out = Path(str(cfg[OUT_KEY]))
        try:
            task, settings = _spec_from(cfg)
            init = str(cfg.get(INIT_KEY, "") or "")
            initial = load_weights(Path(init)) if init else None
            progress = out / PROGRESS

            def on_round(r: RoundRecord) -> None:
                with open(progress, "a") as f:
                    f.write(json.dumps(asdict(r)) + "\n")

            recorder = RoundRecorder(on_round=on_round)
            run_server(grid, context, task, settings, recorder, initial)
            if recorder.weights is not None:
                save_weights(out / WEIGHTS, recorder.weights)
            done = {"ok": True, "rejected": recorder.rejected}
        except Exception as e:
            done = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            write_atomic(out / DONE, (json.dumps(done) + "\n").encode())
            raise
        write_atomic(out / DONE, (json.dumps(done) + "\n").encode())

    return ClientApp(client_fn=client_fn, mods=[secagg_when_asked]), sapp


def save_weights(path: Path, arrays: Sequence[np.ndarray]) -> None:
    with atomic_writer(path) as f:
        np.savez(f, *arrays)


def load_weights(path: Path) -> list[np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return [f[f"arr_{i}"] for i in range(len(f.files))]
    except (OSError, ValueError, KeyError) as e:
        raise FLError(f"{path}: cannot read the weights ({e})") from None


client_app, server_app = _build_apps()
