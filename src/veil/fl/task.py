"""What a federated run trains: the model, the data and its split, and the clients' local training.

An :class:`FLTask` is a small, picklable description that every process of a run (the server, each
client, Flower's simulation workers) turns into the same model and the same split: a model by
name (``lenet``, ``mlp`` from :mod:`veil.nn.zoo`) or by import path (``package.module:factory``,
any function returning a ``torch.nn.Module``), a data set by name (``mnist``, ``digits``) or an
``.npz`` file (arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``), and a partition scheme
(:mod:`veil.fl.partition`) or explicit per-client index lists.

Each client process loads the data once (cached) and keeps only its own part; in a real
deployment each client would point at its own data instead (``FLTask.data`` per host).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from veil.fl.partition import PartitionSpec, partition
from veil.randomness import torch_generator

if TYPE_CHECKING:
    from veil.fl.privacy import RecordDP


class FLError(ValueError):
    """A federated run that cannot go on: a bad task, a malformed update, a failed round."""


@dataclass(frozen=True)
class FLTask:
    """A federated learning task (see the module docstring). ``partitions``, if given, fixes each
    client's training indices and overrides ``partition``."""

    model: str = "lenet"
    data: str = "mnist"
    num_clients: int = 10
    partition: str = "iid"
    partition_seed: int = 0
    partitions: tuple[tuple[int, ...], ...] | None = None
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    client_threads: int = 1
    train_limit: int | None = None
    faults: tuple[str, ...] = ()
    record_dp: RecordDP | None = None  # DP-SGD on every client (veil.fl.privacy)
    features: str | None = None        # "scatter": the model sees fixed ScatterNet features (see task_data)

    def __post_init__(self) -> None:
        problems = []
        if self.num_clients < 1:
            problems.append(f"num_clients must be >= 1, got {self.num_clients}")
        for name in ("local_epochs", "batch_size", "client_threads"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.partitions is not None and len(self.partitions) != self.num_clients:
            problems.append(f"{len(self.partitions)} explicit partitions for {self.num_clients} clients")
        if self.partitions is None:
            try:
                PartitionSpec.parse(self.partition)
            except ValueError as e:
                problems.append(str(e))
        if self.features not in FEATURES:
            problems.append(f"features must be one of {', '.join(map(str, FEATURES))}, got {self.features!r}")
        for fault in self.faults:
            try:
                parse_fault(fault)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise FLError("invalid federated task: " + "; ".join(problems))

    def fault(self, client: int, server_round: int) -> str | None:
        """The fault client ``client`` is to play in ``server_round``, if any (see :func:`parse_fault`)."""
        for text in self.faults:
            c, kind, r = parse_fault(text)
            if c == client and r in (None, server_round):
                return kind
        return None

    def with_partitions(self, parts: Sequence[Sequence[int] | torch.Tensor]) -> FLTask:
        rows = tuple(tuple(int(i) for i in (p.tolist() if isinstance(p, torch.Tensor) else p)) for p in parts)
        return replace(self, partitions=rows, num_clients=len(rows))


FAULTS = ("drop", "nan", "shape")
FEATURES = (None, "scatter")


def parse_fault(text: str) -> tuple[int, str, int | None]:
    """``CLIENT:KIND[@ROUND]`` -> (client, kind, round or None for every round). Faults rehearse what a
    deployment must survive: ``drop`` (the client fails mid-round: under secure aggregation, after
    the keys were shared and before its masked update), ``nan`` (an update with NaN), ``shape`` (an
    update of the wrong shape)."""
    try:
        who, _, rest = text.partition(":")
        kind, _, rnd = rest.partition("@")
        client, server_round = int(who), (int(rnd) if rnd else None)
    except ValueError:
        raise ValueError(f"fault {text!r}: expected CLIENT:KIND[@ROUND], e.g. 3:drop@2") from None
    if kind not in FAULTS:
        raise ValueError(f"fault {text!r}: kind must be one of {', '.join(FAULTS)}")
    return client, kind, server_round


def digits_mlp() -> nn.Module:
    """A small MLP for the 8x8 digits: flatten, 64-32-10 with ReLU."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def build_model(spec: str) -> nn.Module:
    """A fresh model: ``digits-mlp``, a :mod:`veil.nn.zoo` name, or ``package.module:factory``
    (:func:`veil.nn.infer.resolve_architecture`)."""
    from veil.nn.infer import resolve_architecture

    if spec == "digits-mlp":
        return digits_mlp()
    try:
        return resolve_architecture(spec)
    except ValueError as e:
        raise FLError(f"model: {e}, or digits-mlp") from None


@functools.lru_cache(maxsize=2)
def load_task_data(data: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) of a data source; cached per process."""
    if data == "mnist":
        from veil.data.mnist import load_mnist

        x, y = load_mnist("train")
        xt, yt = load_mnist("test")
        return x, y, xt, yt
    if data == "digits":
        from veil.data.digits import load_digits

        x, y = load_digits()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # a public, fixed split
        cut = len(x) * 4 // 5
        return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
    path = Path(data)
    if path.suffix != ".npz":
        raise FLError(f"unknown data {data!r}: use mnist, digits or an .npz file with x_train, y_train, "
                      f"x_test, y_test")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    except (OSError, KeyError, ValueError) as e:
        raise FLError(f"{path}: cannot read x_train, y_train, x_test, y_test ({e})") from None
    x, y, xt, yt = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    if len(x) != len(y) or len(xt) != len(yt):
        raise FLError(f"{path}: {len(x)} training inputs for {len(y)} labels, {len(xt)} test inputs for {len(yt)}")
    return x.float(), y.long(), xt.float(), yt.long()


def task_data(task: FLTask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) as the task's model sees them: the data set's images, or
    with ``features="scatter"`` their scattering coefficients (J=2, L=8: 81 x H/4 x W/4 per channel,
    :class:`veil.dp.models.ScatterFeatures`), computed once per process. Fixed, data-independent
    features cost no privacy and make DP-SGD far more accurate (Tramer & Boneh 2021)."""
    if task.features is None:
        return load_task_data(task.data)
    return _featured(task.data, task.features)


@functools.lru_cache(maxsize=1)
def _featured(data: str, features: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y, xt, yt = load_task_data(data)
    unnormalise = data == "mnist"  # load_mnist standardises; the features are taken on [0, 1] pixels
    return feature_map(x, features, unnormalise), y, feature_map(xt, features, unnormalise), yt


def feature_map(x: torch.Tensor, features: str | None, unnormalise: bool = False) -> torch.Tensor:
    """Apply a task's fixed feature map to images ``(N, C, H, W)`` (pixels in [0, 1], or MNIST-
    standardised with ``unnormalise``)."""
    if features is None:
        return x
    if features != "scatter":
        raise FLError(f"unknown features {features!r}")
    from veil.data.mnist import MEAN, STD
    from veil.dp.models import ScatterFeatures

    if x.ndim != 4:
        raise FLError(f"scatter features need images (N, C, H, W), got shape {tuple(x.shape)}")
    if unnormalise:
        x = x * STD + MEAN
    front = ScatterFeatures((int(x.shape[2]), int(x.shape[3])))
    with torch.no_grad():
        return torch.cat([front(b) for b in x.split(1000)]) if len(x) else x


@functools.lru_cache(maxsize=2)
def load_training_data(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A deployed client's own training data: ``x_train`` and ``y_train`` of an ``.npz`` file."""
    p = Path(path)
    if p.suffix != ".npz":
        raise FLError(f"client data {path!r}: expected an .npz file with x_train and y_train")
    try:
        with np.load(p, allow_pickle=False) as f:
            x, y = f["x_train"], f["y_train"]
    except (OSError, KeyError, ValueError) as e:
        raise FLError(f"{p}: cannot read x_train, y_train ({e})") from None
    if len(x) != len(y) or len(x) == 0:
        raise FLError(f"{p}: {len(x)} training inputs for {len(y)} labels")
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)).float(), torch.from_numpy(np.ascontiguousarray(y)).long()
    if not torch.isfinite(xt).all():
        raise FLError(f"{p}: x_train holds NaN or infinite values")
    return xt, yt


def client_indices(task: FLTask, client: int) -> torch.Tensor:
    """Training indices of client ``client`` (0-based) under the task's split."""
    if not 0 <= client < task.num_clients:
        raise FLError(f"client {client} out of range for {task.num_clients} clients")
    if task.partitions is not None:
        return torch.tensor(task.partitions[client], dtype=torch.long)
    return _split(task.data, task.num_clients, task.partition, task.partition_seed, task.train_limit)[client]


@functools.lru_cache(maxsize=4)
def _split(data: str, num_clients: int, scheme: str, seed: int, limit: int | None) -> list[torch.Tensor]:
    _, y, _, _ = load_task_data(data)
    if limit is not None:
        y = y[:limit]
    return partition(y, num_clients, scheme, seed=seed)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's state (parameters and buffers) as numpy arrays, in ``state_dict`` order."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def check_update(arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray], *, who: str = "update") -> None:
    """Raise :class:`FLError` naming the problem if ``arrays`` do not match ``reference``'s shapes or
    are not all finite."""
    if len(arrays) != len(reference):
        raise FLError(f"{who}: {len(arrays)} arrays, expected {len(reference)}")
    for i, (a, r) in enumerate(zip(arrays, reference)):
        a = np.asarray(a)
        if a.shape != np.shape(r):
            raise FLError(f"{who}: array {i} has shape {a.shape}, expected {np.shape(r)}")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise FLError(f"{who}: array {i} holds NaN or infinite values")


def set_weights(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Load arrays of :func:`get_weights` into ``model``, checking count, shapes and finiteness first."""
    state = model.state_dict()
    check_update(arrays, [v.cpu().numpy() for v in state.values()], who="model weights")
    model.load_state_dict({k: torch.as_tensor(np.asarray(a)).to(v.dtype)
                           for (k, v), a in zip(state.items(), arrays)})


def local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                momentum: float = 0.0, proximal_mu: float = 0.0, device: str | torch.device = "cpu",
                generator: torch.Generator | None = None) -> float:
    """SGD on a client's data (cross-entropy), with FedProx's proximal term ``mu/2 ||w - w_global||^2``
    when ``proximal_mu > 0`` (w_global: the weights on entry). Returns the mean training loss."""
    model.to(device).train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = generator if generator is not None else torch_generator("cpu")
    total, count = 0.0, 0
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            objective = loss
            if anchor:
                objective = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum()
                                                         for p, a in zip(model.parameters(), anchor))
            objective.backward()
            opt.step()
            total += float(loss) * len(idx)
            count += len(idx)
    if not math.isfinite(total):
        raise FLError("local training diverged (the loss is not finite): lower the learning rate")
    return total / max(count, 1)
