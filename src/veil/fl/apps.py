"""Flower apps for an :class:`~veil.fl.task.FLTask`: the ClientApp every client runs and the ServerApp.

The apps run in Flower's simulation engine (:func:`veil.fl.simulate.simulate`) and, the same
logic rebuilt from the run's configuration, in its deployment engine (:mod:`veil.fl.deploy`). They
use Flower's legacy strategy API because that is the one its SecAgg+ workflow drives:

* strategies ``fedavg``, ``fedprox`` (the proximal term is applied by Veil's client) and ``fedadam``
  (server-side Adam, Reddi et al. 2021), each wrapped so that a malformed update (wrong count or
  shape of arrays, NaN/inf) is dropped from the round with an error naming the client, and the
  round goes on with the others;
* ``secure=True``: Flower's SecAgg+ workflow (Bell et al. 2020) on the server and its
  ``secaggplus_mod`` on the clients, masks expanded by AES-CTR (:mod:`veil.fl.secagg`). Each
  client masks its quantised update with pairwise masks (agreed by Diffie-Hellman) and a self
  mask, and secret-shares (Shamir) the keys among its neighbours, so the server learns only the
  sum; clients that drop out after sharing keys are unmasked from their neighbours' shares, as
  long as ``threshold`` of them remain. The server cannot see single updates, so under SecAgg+
  each client checks its own update before masking (a client whose check fails drops out).
* evaluation is central: after each round the server tests the global model on the task's test
  set and reports it to a :class:`RoundRecorder`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from veil.fl.privacy import ClientDP
from veil.fl.task import (
    FLError,
    FLTask,
    build_model,
    check_update,
    client_indices,
    get_weights,
    local_train,
    set_weights,
    task_data,
)

log = logging.getLogger("veil.fl")

STRATEGIES = ("fedavg", "fedprox", "fedadam")


@dataclass
class RoundRecord:
    round: int
    accuracy: float
    loss: float
    seconds: float          # wall time since the run started
    clients: int = 0        # updates aggregated in this round
    failures: int = 0       # clients that failed, dropped out or were rejected
    epsilon: float | None = None  # DP spent so far (record level: the largest over the clients)


@dataclass
class RoundRecorder:
    """Collects the server's per-round results; ``on_round`` is called after each (progress bars)."""

    on_round: Callable[[RoundRecord], None] | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    weights: list[np.ndarray] | None = None     # the global model after the last round
    started: float = field(default_factory=time.perf_counter)
    _pending: dict[int, tuple[int, int, float | None]] = field(default_factory=dict)

    def aggregated(self, server_round: int, clients: int, failures: int, epsilon: float | None = None) -> None:
        self._pending[server_round] = (clients, failures, epsilon)

    def evaluated(self, server_round: int, accuracy: float, loss: float) -> None:
        clients, failures, epsilon = self._pending.pop(server_round, (0, 0, None))
        record = RoundRecord(server_round, accuracy, loss, time.perf_counter() - self.started, clients, failures,
                             epsilon)
        self.rounds.append(record)
        if self.on_round is not None:
            self.on_round(record)


class VeilClient:
    """Flower client logic for one partition of a task (wrapped as a ``NumPyClient`` below)."""

    def __init__(self, task: FLTask, client: int, data: str | None = None) -> None:
        """Client ``client`` of ``task``: its part of the task's data, or with ``data`` (a deployed
        client's own ``.npz``) every training record of that file."""
        self.task, self.client, self.data = task, client, data

    def training_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data is not None:
            from veil.fl.task import feature_map, load_training_data

            x, y = load_training_data(self.data)
            return feature_map(x, self.task.features), y
        x, y, _, _ = task_data(self.task)
        idx = client_indices(self.task, self.client)
        return x[idx], y[idx]

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        torch.set_num_threads(self.task.client_threads)
        server_round = int(config.get("round", 0))
        fault = self.task.fault(self.client, server_round)
        if fault == "drop":
            raise FLError(f"client {self.client}: dropped out in round {server_round} (rehearsed fault)")
        model = build_model(self.task.model)
        set_weights(model, parameters)
        x, y = self.training_data()
        if "max_weight" in config and len(x) > float(config["max_weight"]):
            raise FLError(f"client {self.client}: {len(x)} training records, more than the {config['max_weight']:g} "
                          f"the server sized secure aggregation for (its --max-client-records)")
        metrics: dict[str, Any] = {"client": self.client}
        if self.task.record_dp is not None:
            from veil.fl.privacy import dp_local_train

            loss, metrics["epsilon"] = dp_local_train(
                model, x, y, dp=self.task.record_dp, batch_size=self.task.batch_size,
                local_epochs=self.task.local_epochs, lr=self.task.lr, momentum=self.task.momentum,
                rounds_done=server_round)
        else:
            loss = local_train(model, x, y, epochs=self.task.local_epochs, batch_size=self.task.batch_size,
                               lr=self.task.lr, momentum=self.task.momentum,
                               proximal_mu=float(config.get("proximal_mu", 0.0)))
        update = get_weights(model)
        weight = len(x)
        if "client_clip" in config:  # client-level DP: clip the whole update, weigh every client alike
            from veil.fl.privacy import clip_update

            update, _ = clip_update(update, parameters, float(config["client_clip"]))
            weight = 1
        if fault == "nan":
            update[0] = np.full_like(update[0], np.nan)
        elif fault == "shape":
            update[0] = update[0].reshape(-1)[:-1].copy()
        # under secure aggregation nobody else can check the update, and the server learns no
        # per-client statistic, not even the loss
        if config.get("self_check"):
            check_update(update, parameters, who=f"client {self.client}'s update")
        else:
            metrics["train_loss"] = loss
        return update, weight, metrics


def _checked(base: type) -> type:
    """``base`` (a Flower strategy class) with malformed client updates dropped before aggregation."""

    class Checked(base):  # type: ignore[misc, valid-type]
        veil_reference: list[np.ndarray] | None = None
        veil_recorder: RoundRecorder | None = None
        veil_client_dp: tuple[ClientDP, float] | None = None  # (settings, sample rate)

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            chosen = super().configure_fit(server_round, parameters, client_manager)
            self._veil_sampled = {**getattr(self, "_veil_sampled", {}), server_round: len(chosen)}
            return chosen

        def aggregate_fit(self, server_round: int, results: list, failures: list) -> Any:
            from flwr.common import parameters_to_ndarrays

            kept = []
            for proxy, res in results:
                who = f"client {res.metrics.get('client', proxy.cid)}" if res.metrics else f"client {proxy.cid}"
                try:
                    if self.veil_reference is not None:
                        check_update(parameters_to_ndarrays(res.parameters), self.veil_reference,
                                     who=f"round {server_round}: {who}")
                except FLError as e:
                    log.error("%s; the update is dropped from the round", e)
                    if self.veil_recorder is not None:
                        self.veil_recorder.rejected.append(str(e))
                    failures.append(e)
                    continue
                kept.append((proxy, res))
            if not kept:
                raise FLError(f"round {server_round}: no valid client update to aggregate "
                              f"({len(failures)} failures)")
            parameters, metrics = super().aggregate_fit(server_round, kept, failures)
            epsilon = metrics.get("epsilon")
            if self.veil_client_dp is not None and parameters is not None:
                parameters, epsilon = self._noised(parameters, server_round, len(kept))
                metrics["epsilon"] = epsilon
            if self.veil_recorder is not None:
                # Clients sampled whose update is not in the aggregate. Not len(failures): Flower's
                # SecAgg+ workflow lists a client that fails while sending its masked vector twice.
                sampled = getattr(self, "_veil_sampled", {}).pop(server_round, None)
                lost = len(failures) if sampled is None else sampled - len(kept)
                self.veil_recorder.aggregated(server_round, len(kept), lost, epsilon)
            return parameters, metrics

        def _noised(self, parameters: Any, server_round: int, received: int) -> tuple[Any, float]:
            from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

            from veil.fl.privacy import add_noise
            from veil.randomness import numpy_rng

            assert self.veil_client_dp is not None
            dp, q = self.veil_client_dp
            # the mean of `received` updates clipped to C moves by <= C / received for one client
            std = dp.noise_multiplier(q) * dp.clipping_norm / received
            noised = add_noise(parameters_to_ndarrays(parameters), std, numpy_rng())
            return ndarrays_to_parameters(noised), dp.epsilon_after(server_round, q)

    Checked.__name__ = Checked.__qualname__ = f"Checked{base.__name__}"
    return Checked


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs a task: rounds, strategy, clients per round, secure aggregation."""

    rounds: int = 10
    strategy: str = "fedavg"
    clients_per_round: int | None = None   # None: every client, every round
    proximal_mu: float = 0.01              # fedprox
    server_lr: float = 0.01                # fedadam's eta
    secure: bool = False
    secagg_shares: float | int = 1.0       # SecAgg+ neighbours: a fraction of the sampled clients, or a count
    secagg_threshold: float | int = 0.5    # shares needed to unmask a dropped client
    clipping_range: float = 8.0            # SecAgg+ quantisation clips weights to +-this
    timeout: float | None = None           # seconds to wait for replies (None: wait for all)
    client_dp: ClientDP | None = None      # client-level DP (veil.fl.privacy)
    max_client_records: int | None = None  # SecAgg+'s largest weight (None: the largest partition of the task)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise FLError(f"rounds must be >= 1, got {self.rounds}")
        if self.strategy not in STRATEGIES:
            raise FLError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise FLError(f"clients_per_round must be >= 1, got {self.clients_per_round}")
        if self.secure and self.clients_per_round is not None and self.clients_per_round < 3:
            raise FLError("secure aggregation needs at least 3 clients per round")
        if self.max_client_records is not None and self.max_client_records < 1:
            raise FLError(f"max_client_records must be >= 1, got {self.max_client_records}")
        if self.client_dp is not None and self.client_dp.rounds < self.rounds:
            raise FLError(f"client-level DP is planned for {self.client_dp.rounds} rounds, fewer than the "
                          f"{self.rounds} to run: the budget would be exceeded")


def make_strategy(task: FLTask, settings: ServerSettings, recorder: RoundRecorder,
                  initial_weights: list[np.ndarray] | None = None) -> Any:
    """The Flower strategy of ``settings``, checked, with central evaluation on the task's test set;
    the global model starts from ``initial_weights`` (default: a fresh model's)."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAdam, FedAvg, FedProx

    if settings.clients_per_round is not None and settings.clients_per_round > task.num_clients:
        raise FLError(f"clients_per_round is {settings.clients_per_round}, but the task has only "
                      f"{task.num_clients} clients")
    per_round = min(settings.clients_per_round or task.num_clients, task.num_clients)
    initial = get_weights(build_model(task.model))
    if initial_weights is not None:
        check_update(initial_weights, initial, who="initial weights")
        initial = [np.asarray(a, dtype=r.dtype) for a, r in zip(initial_weights, initial)]

    if task.record_dp is not None and task.record_dp.rounds < settings.rounds:
        raise FLError(f"record-level DP is planned for {task.record_dp.rounds} rounds, fewer than the "
                      f"{settings.rounds} to run: the budget would be exceeded")

    def fit_config(server_round: int) -> dict[str, Any]:
        config: dict[str, Any] = {"round": server_round, "self_check": settings.secure}
        if settings.secure:
            config["max_weight"] = float(max_weight(task, settings))
        if settings.client_dp is not None:
            config["client_clip"] = settings.client_dp.clipping_norm
        return config

    def evaluate_fn(server_round: int, arrays: list[np.ndarray], config: dict[str, Any]) -> tuple[float, dict]:
        _, _, xt, yt = task_data(task)
        model = build_model(task.model)
        set_weights(model, arrays)
        model.eval()
        with torch.no_grad():  # one pass over the test set gives both loss and accuracy
            logits = torch.cat([model(xb) for xb in xt.split(1000)])
        loss = float(torch.nn.functional.cross_entropy(logits, yt))
        accuracy = int((logits.argmax(dim=1) == yt).sum()) / len(yt)
        if server_round > 0:
            recorder.weights = [np.array(a, copy=True) for a in arrays]
            recorder.evaluated(server_round, accuracy, loss)
        return loss, {"accuracy": accuracy}

    common = dict(fraction_fit=per_round / task.num_clients, fraction_evaluate=0.0, min_fit_clients=per_round,
                  min_evaluate_clients=0, min_available_clients=task.num_clients, evaluate_fn=evaluate_fn,
                  on_fit_config_fn=fit_config, initial_parameters=ndarrays_to_parameters(initial),
                  fit_metrics_aggregation_fn=_mean_metrics)
    if settings.strategy == "fedprox":
        strategy = _checked(FedProx)(proximal_mu=settings.proximal_mu, **common)
    elif settings.strategy == "fedadam":
        strategy = _checked(FedAdam)(eta=settings.server_lr, eta_l=task.lr, **common)
    else:
        strategy = _checked(FedAvg)(**common)
    strategy.veil_reference, strategy.veil_recorder = initial, recorder
    if settings.client_dp is not None:
        strategy.veil_client_dp = (settings.client_dp, per_round / task.num_clients)
    return strategy


def _mean_metrics(metrics: list[tuple[int, dict]]) -> dict:
    """Clients' metrics of a round: the weighted mean training loss, the largest epsilon spent."""
    out: dict[str, Any] = {}
    losses = [(k, m["train_loss"]) for k, m in metrics if "train_loss" in m]
    if losses and sum(k for k, _ in losses):
        out["train_loss"] = sum(k * v for k, v in losses) / sum(k for k, _ in losses)
    epsilons = [m["epsilon"] for _, m in metrics if "epsilon" in m]
    if epsilons:
        out["epsilon"] = max(epsilons)
    return out


def secagg_workflow(task: FLTask, settings: ServerSettings) -> Any:
    """Flower's SecAgg+ workflow sized for the task: weights up to the largest client, and the finest
    quantisation whose sum over the round's clients cannot overflow the 2^32 modulus."""
    from flwr.server.workflow import SecAggPlusWorkflow

    per_round = min(settings.clients_per_round or task.num_clients, task.num_clients)
    modulus = 2 ** 32
    quantization = 2 ** math.floor(math.log2(modulus / (2 * per_round)))
    return SecAggPlusWorkflow(num_shares=settings.secagg_shares, reconstruction_threshold=settings.secagg_threshold,
                              max_weight=float(max_weight(task, settings)), clipping_range=settings.clipping_range,
                              quantization_range=quantization, modulus_range=modulus, timeout=settings.timeout)


def max_weight(task: FLTask, settings: ServerSettings) -> int:
    """The largest weight (training records) a client may bring to a secure round."""
    if settings.max_client_records is not None:
        return settings.max_client_records
    if task.partitions is not None:
        return max(len(p) for p in task.partitions)
    return max(len(client_indices(task, c)) for c in range(task.num_clients))


def flower_client(inner: VeilClient) -> Any:
    """``inner`` as a Flower client (a ``NumPyClient`` that trains with ``inner.fit``)."""
    from flwr.client import NumPyClient

    class Client(NumPyClient):
        def fit(self, parameters: list, config: dict) -> tuple:
            return inner.fit(parameters, config)

    return Client().to_client()


def client_app(task: FLTask, *, secure: bool = False) -> Any:
    """The Flower ClientApp of ``task``: node config ``partition-id`` picks the client."""
    from flwr.client import ClientApp
    from flwr.client.mod import secaggplus_mod

    def client_fn(context: Any) -> Any:
        if secure:
            from veil.fl.secagg import install

            install()  # SecAgg+ masks from AES-CTR instead of a 32-bit-seeded Mersenne Twister
        return flower_client(VeilClient(task, int(context.node_config["partition-id"])))

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])


def server_app(task: FLTask, settings: ServerSettings, recorder: RoundRecorder,
               initial_weights: list[np.ndarray] | None = None) -> Any:
    """The Flower ServerApp: ``settings.rounds`` rounds of the strategy, SecAgg+ if ``settings.secure``."""
    from flwr.server import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        run_server(grid, context, task, settings, recorder, initial_weights)

    return app


def run_server(grid: Any, context: Any, task: FLTask, settings: ServerSettings, recorder: RoundRecorder,
               initial_weights: list[np.ndarray] | None = None) -> None:
    """The ServerApp's body (simulation and deployment alike): ``settings.rounds`` rounds of the
    strategy over ``grid``, through SecAgg+ if ``settings.secure``."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow

    strategy = make_strategy(task, settings, recorder, initial_weights)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=settings.rounds,
                                                                round_timeout=settings.timeout),
                           strategy=strategy)
    if settings.secure:
        from veil.fl.secagg import install

        install()
    fit = secagg_workflow(task, settings) if settings.secure else None
    workflow = DefaultWorkflow(fit_workflow=fit) if fit is not None else DefaultWorkflow()
    recorder.started = time.perf_counter()
    workflow(grid, legacy)
