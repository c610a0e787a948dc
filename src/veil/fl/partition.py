"""Split a labelled data set across federated clients: IID, Dirichlet label skew, or label shards.

Every split returns one index tensor per client; together they cover each example at most once
(``dirichlet`` and ``shards`` use every example, ``iid`` all but fewer than ``num_clients``).

* ``iid``: a random permutation cut into equal parts.
* ``dirichlet``: for each class, its examples are dealt to the clients in proportions drawn from
  Dirichlet(alpha, ..., alpha) (Hsu et al. 2019). Small alpha (0.1) gives each client a few
  classes, large alpha (100) approaches IID. Draws are repeated until every client has at least
  ``min_size`` examples, as is customary.
* ``shards``: the pathological non-IID split of the original FedAvg paper (McMahan et al. 2017):
  examples sorted by label, cut into ``num_clients * shards_per_client`` equal shards, and each
  client given ``shards_per_client`` of them at random (with 2 shards, most clients see 2 labels).

The split is a property of the experiment, not a secret: ``seed`` makes it reproducible, so that
every client process can compute the same split from the same data without talking to the
others. ``seed=None`` draws one from the OS.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import numpy as np
import torch

SCHEMES = ("iid", "dirichlet", "shards")


@dataclass(frozen=True)
class PartitionSpec:
    """A partition scheme by name: ``iid``, ``dirichlet<alpha>`` (e.g. ``dirichlet0.5``) or
    ``shards<k>`` (e.g. ``shards2``, the FedAvg paper's two shards per client)."""

    scheme: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        t = text.strip().lower()
        if t == "iid":
            return cls("iid")
        m = re.fullmatch(r"dirichlet[:=]?([0-9.eE+-]+)", t)
        if m:
            try:
                alpha = float(m.group(1))
            except ValueError:
                alpha = float("nan")
            if not (np.isfinite(alpha) and alpha > 0):
                raise ValueError(f"partition {text!r}: the Dirichlet alpha must be a positive number")
            return cls("dirichlet", alpha=alpha)
        m = re.fullmatch(r"shards[:=]?(\d+)", t)
        if m:
            return cls("shards", shards_per_client=int(m.group(1)))
        raise ValueError(f"unknown partition {text!r}: use iid, dirichlet<alpha> (e.g. dirichlet0.5) "
                         f"or shards<k> (e.g. shards2)")

    @property
    def name(self) -> str:
        if self.scheme == "dirichlet":
            return f"dirichlet{self.alpha:g}"
        if self.scheme == "shards":
            return f"shards{self.shards_per_client}"
        return "iid"

    def split(self, labels: torch.Tensor | np.ndarray, num_clients: int, *,
              seed: int | None = None) -> list[torch.Tensor]:
        return partition(labels, num_clients, self.name, seed=seed)


def _labels(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {tuple(y.shape)}")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers (class indices), got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def _check_clients(num_clients: int, n: int) -> None:
    if int(num_clients) < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if n < num_clients:
        raise ValueError(f"cannot split {n} examples across {num_clients} clients: fewer examples than clients")


def iid_partition(labels: torch.Tensor | np.ndarray, num_clients: int, *,
                  rng: np.random.Generator) -> list[torch.Tensor]:
    y = _labels(labels)
    _check_clients(num_clients, len(y))
    per = len(y) // num_clients
    perm = rng.permutation(len(y))
    return [torch.from_numpy(np.sort(perm[i * per:(i + 1) * per])) for i in range(num_clients)]


def dirichlet_partition(labels: torch.Tensor | np.ndarray, num_clients: int, alpha: float, *,
                        rng: np.random.Generator, min_size: int = 10,
                        max_tries: int = 1000) -> list[torch.Tensor]:
    y = _labels(labels)
    _check_clients(num_clients, len(y))
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"the Dirichlet alpha must be a positive number, got {alpha}")
    min_size = min(min_size, len(y) // num_clients)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        sizes = [sum(len(p) for p in ps) for ps in parts]
        if min(sizes) >= min_size:
            return [torch.from_numpy(np.sort(np.concatenate(ps))) for ps in parts]
    raise ValueError(f"no Dirichlet({alpha:g}) split of {len(y)} examples gave every one of {num_clients} "
                     f"clients {min_size} examples in {max_tries} draws: raise alpha or use fewer clients")


def shard_partition(labels: torch.Tensor | np.ndarray, num_clients: int, shards_per_client: int = 2, *,
                    rng: np.random.Generator) -> list[torch.Tensor]:
    y = _labels(labels)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    _check_clients(num_clients * shards_per_client, len(y))
    order = np.argsort(y, kind="stable")
    shards = np.array_split(order, num_clients * shards_per_client)
    assignment = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [torch.from_numpy(np.sort(np.concatenate([shards[s] for s in row]))) for row in assignment]


def partition(labels: torch.Tensor | np.ndarray, num_clients: int, scheme: str = "iid", *,
              seed: int | None = None) -> list[torch.Tensor]:
    """Indices of each client's examples under ``scheme`` (``iid``, ``dirichlet<alpha>``, ``shards<k>``)."""
    spec = PartitionSpec.parse(scheme)
    rng = np.random.default_rng(seed if seed is not None else secrets.randbits(64))
    if spec.scheme == "iid":
        return iid_partition(labels, num_clients, rng=rng)
    if spec.scheme == "dirichlet":
        return dirichlet_partition(labels, num_clients, spec.alpha, rng=rng)
    return shard_partition(labels, num_clients, spec.shards_per_client, rng=rng)


def label_histogram(labels: torch.Tensor | np.ndarray, parts: list[torch.Tensor],
                    num_classes: int | None = None) -> np.ndarray:
    """(clients, classes) counts: how skewed a split is."""
    y = _labels(labels)
    k = int(num_classes if num_classes is not None else (y.max() + 1 if len(y) else 0))
    return np.stack([np.bincount(y[p.numpy()], minlength=k) for p in parts]) if parts else np.zeros((0, k))
