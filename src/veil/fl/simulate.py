"""Run a federated task with every client on this machine, in Flower's simulation engine (Ray).

:func:`simulate` builds the ClientApp and ServerApp of :mod:`veil.fl.apps`, runs them with
``flwr.simulation.run_simulation`` (one virtual SuperNode per client, ``client_cpus`` cores each),
shows a progress bar over rounds, and returns an :class:`FLResult`: test accuracy and loss per
round, wall time, rounds to a target accuracy, and the updates that were rejected.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.files import write_atomic
from veil.fl.apps import RoundRecord, RoundRecorder, ServerSettings, client_app, server_app
from veil.fl.task import FLError, FLTask, build_model, set_weights


@dataclass
class FLResult:
    task: FLTask
    settings: ServerSettings
    rounds: list[RoundRecord]
    seconds: float
    rejected: list[str] = field(default_factory=list)
    weights: list[np.ndarray] | None = None

    def model(self) -> torch.nn.Module:
        """The final global model."""
        model = build_model(self.task.model)
        if self.weights is None:
            raise FLError("this run has no final weights")
        set_weights(model, self.weights)
        return model.eval()

    @property
    def final_accuracy(self) -> float | None:
        return self.rounds[-1].accuracy if self.rounds else None

    @property
    def seconds_per_round(self) -> float | None:
        """Mean wall time of a round; the first round, which also starts the clients, is left out
        when there are others."""
        if not self.rounds:
            return None
        if len(self.rounds) == 1:
            return self.rounds[0].seconds
        return (self.rounds[-1].seconds - self.rounds[0].seconds) / (len(self.rounds) - 1)

    @property
    def dp_level(self) -> str | None:
        return "record" if self.task.record_dp is not None else "client" if self.settings.client_dp else None

    def rounds_to(self, accuracy: float) -> int | None:
        """The first round whose global model reached ``accuracy`` on the test set, or None."""
        return next((r.round for r in self.rounds if r.accuracy >= accuracy), None)

    def summary(self) -> dict[str, Any]:
        return {"model": self.task.model, "data": self.task.data, "clients": self.task.num_clients,
                "partition": "explicit" if self.task.partitions is not None else self.task.partition,
                "strategy": self.settings.strategy, "secure_aggregation": self.settings.secure,
                "dp_level": self.dp_level, "dp_epsilon": self.rounds[-1].epsilon if self.rounds else None,
                "dp_delta": (self.task.record_dp or self.settings.client_dp).delta if self.dp_level else None,
                "rounds": len(self.rounds), "final_accuracy": self.final_accuracy,
                "seconds_per_round": None if self.seconds_per_round is None else round(self.seconds_per_round, 3),
                "minutes": round(self.seconds / 60, 3), "rejected_updates": len(self.rejected),
                "history": [asdict(r) for r in self.rounds]}

    def save(self, path: str | Path, *, target: float | None = None) -> dict[str, Any]:
        """Write the summary as JSON, atomically (with ``target`` and ``rounds_to_target`` if given);
        return it."""
        summary = self.summary()
        if target is not None:
            summary["target"] = target
            summary["rounds_to_target"] = self.rounds_to(target)
        write_atomic(path, (json.dumps(summary, indent=2) + "\n").encode())
        return summary


class _DeprecationNotice(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated in favour of ``flwr run``: Veil calls
    it on purpose (an in-process run, with the apps built from Python objects)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def simulate(task: FLTask, settings: ServerSettings, *, initial_weights: list[np.ndarray] | None = None,
             progress: bool = True, client_cpus: float = 1.0, verbose: bool = False) -> FLResult:
    """Run ``task`` for ``settings.rounds`` rounds with all clients simulated on this machine, from
    ``initial_weights`` (``veil.fl.task.get_weights`` of a model; default a fresh model)."""
    try:
        from flwr.simulation import run_simulation
    except ImportError as e:
        raise ImportError("federated learning needs Flower: pip install 'veil[fl]'") from e
    from tqdm import tqdm

    bar = tqdm(total=settings.rounds, desc="federated rounds", unit="round", disable=not progress)

    def on_round(r: RoundRecord) -> None:
        bar.set_postfix(accuracy=f"{r.accuracy:.4f}", clients=r.clients)
        bar.update(1)

    recorder = RoundRecorder(on_round=on_round)
    cores = os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": cores, "logging_level": "ERROR", "log_to_driver": verbose}}
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    quiet = _DeprecationNotice()
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
        flwr_logger.addFilter(quiet)
    t0 = time.perf_counter()
    try:
        run_simulation(server_app=server_app(task, settings, recorder, initial_weights),
                       client_app=client_app(task, secure=settings.secure),
                       num_supernodes=task.num_clients, backend_config=backend, verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(quiet)
        bar.close()
    if not recorder.rounds:
        raise FLError("the federated run completed no round: see Flower's log above (run with verbose=True)")
    return FLResult(task, settings, recorder.rounds, time.perf_counter() - t0, recorder.rejected, recorder.weights)
