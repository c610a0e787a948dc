"""PATE training (Papernot et al. 2017, 2018): teachers on disjoint private data, a student on noisy labels.

The recipe, in the order ``run_pate`` carries it out:

1. Partition the private set (x, y) at random into ``num_teachers`` disjoint, near-equal parts
   (``partition_disjoint``) and train one teacher per part, each from a fresh model
   (``train_teachers``). No teacher sees another's data; none is private on its own.
2. Let every teacher label the public, unlabelled set (``teacher_predictions``): a (T, N) array
   of arg-max labels, counted into an (N, C) vote histogram.
3. Answer (some of) the public queries by a noisy arg-max of the vote counts
   (``label_public_data``): LNMax, GNMax or Confident GNMax from ``veil.dp.pate``.
4. Train the student on the answered public queries and their noisy labels only
   (``train_student``). The student, and anything computed from it, is private by
   post-processing: it never touches the private data, only the noisy answers.

Why one moved vote: a private record lies in exactly one part, so adding, removing or changing it
can change only the model of that one teacher, hence only that teacher's vote on each query. In the
histogram of a query one count goes down by 1 and another goes up by 1 (or, for add/remove, one
count changes by 1). So every query has L1 sensitivity 2 and L2 sensitivity sqrt(2), whatever the
teachers' training does; the maximal count moves by at most 1.

Privacy reported in ``PateLabels`` (all Renyi-DP totals add over queries, then ``rdp_to_dp``):

- GNMax, each answered query: alpha / sigma^2 (data-independent, Prop. 8 of the 2018 paper), or
  the data-dependent bound of Thm 6 / Prop. 7 via ``gnmax_rdp_data_dependent``.
- Confident GNMax: the same for each *answered* query with sigma = sigma2, **plus** the threshold
  check, counted here (``veil.dp.pate`` does not): "max count + N(0, sigma1^2) >= threshold" is a
  Gaussian mechanism on the max count, whose sensitivity is 1, so it is (alpha, alpha / (2 sigma1^2))
  -RDP per query, and it is paid for **every query asked**, answered or not. The check's cost is
  counted data-independently in both epsilons (the 2018 paper's tighter data-dependent analysis of
  the check is not done), so it is conservative.
- LNMax: pure DP, ``epsilon_per_query`` per answered query, added up by basic composition
  (delta = 0, no Renyi orders); both epsilons are that same number.

Caveat — which epsilon to publish: the data-dependent epsilon is a function of the private votes;
releasing it privately needs the smooth-sensitivity step of Papernot et al. 2018 (Sec. 4.3), **not
implemented**. The data-independent epsilon depends only on sigma, sigma1 and the query counts and
is the one to publish. (For Confident GNMax the number answered is itself random; it is accounted as
the 2018 paper does. Charging GNMax for every query asked is the strictly data-independent bound.)

Randomness: partitions, batch orders and aggregation noise come from one numpy ``Generator``
(``rng``; None draws one seeded with 128 bits from ``secrets``). The models' initial weights come
from ``make_model`` (torch's own generator, as torch modules do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from tqdm.auto import tqdm

from veil.dp.pate_labels import (
    Aggregator,
    Data,
    PateLabels,
    _check_aggregator,
    _labels,
    _positive_int,
    label_public_data,
)
from veil.randomness import numpy_rng

__all__ = [
    "PateLabels",
    "PateResult",
    "label_public_data",
    "partition_disjoint",
    "run_pate",
    "teacher_predictions",
    "train_student",
    "train_teachers",
]

Optimizer = Literal["adam", "sgd"]


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _features(x: Data, name: str) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim < 1 or t.shape[0] == 0:
        raise ValueError(f"{name} is empty: it must hold at least one example (shape (n, ...)), got shape "
                         f"{tuple(t.shape)}")
    return t.float()


def partition_disjoint(n: int, num_teachers: int, *, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """A uniformly random partition of range(n) into ``num_teachers`` disjoint index sets whose
    sizes differ by at most one (floor(n/T) or ceil(n/T)); each set is sorted."""
    n = _positive_int(n, "n")
    num_teachers = _positive_int(num_teachers, "num_teachers")
    if num_teachers > n:
        raise ValueError(f"num_teachers ({num_teachers}) exceeds the number of examples ({n}): every teacher "
                         "needs at least one; use fewer teachers or more private data")
    perm = numpy_rng(rng).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_teachers)]


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
         optimizer: Optimizer, device: torch.device, generator: torch.Generator) -> nn.Module:
    """Plain mini-batch training with cross-entropy; each epoch is a fresh random order of (x, y)."""
    model.to(device).train()
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    n, top, checked = x.shape[0], int(y.max()), False
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            logits = model(x[index].to(device))
            target = y[index].to(device)
            if not checked and (logits.ndim != 2 or top >= logits.shape[1]):
                raise ValueError(f"labels out of range for the model: it must output (batch, num_classes) logits "
                                 f"with num_classes > {top} (the largest label); got shape {tuple(logits.shape)}")
            checked = True
            loss = nn.functional.cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def _check_training(epochs: int, batch_size: int, lr: float, optimizer: str) -> None:
    problems = []
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        problems.append(f"epochs must be an integer >= 0, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        problems.append(f"lr must be a finite number > 0, got {lr!r}")
    if optimizer not in ("adam", "sgd"):
        problems.append(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if problems:
        raise ValueError("; ".join(problems))


def train_teachers(make_model: Callable[[], nn.Module], x: Data, y: Data, *, num_teachers: int, epochs: int,
                   batch_size: int, lr: float, optimizer: Optimizer = "adam", device: str | torch.device | None = None,
                   rng: np.random.Generator | None = None, progress: bool = True) -> list[nn.Module]:
    """Train ``num_teachers`` fresh models ``make_model()``, teacher t only on part t of
    ``partition_disjoint(len(x), num_teachers, rng=rng)``, with cross-entropy and Adam (or SGD with
    momentum 0.9) at constant ``lr`` for ``epochs`` passes over its part in batches of ``batch_size``.

    ``device`` None means CUDA when available, else CPU; the teachers are returned there, in eval mode."""
    xt = _features(x, "x")
    yt = _labels(y, xt.shape[0], "y")
    _check_training(epochs, batch_size, lr, optimizer)
    gen = numpy_rng(rng)
    parts = partition_disjoint(xt.shape[0], num_teachers, rng=gen)
    dev = _device(device)
    teachers = []
    for part in tqdm(parts, desc="PATE teachers", unit="teacher", disable=not progress):
        index = torch.from_numpy(part)
        batches = torch.Generator().manual_seed(int(gen.integers(2**63)))
        teachers.append(_fit(make_model(), xt[index], yt[index], epochs=epochs, batch_size=batch_size, lr=lr,
                             optimizer=optimizer, device=dev, generator=batches))
    return teachers


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device | None) -> torch.Tensor:
    if device is not None:
        model.to(device)
    params = next(iter(model.parameters()), None)
    dev = device if device is not None else (params.device if params is not None else torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[s:s + batch_size].to(dev)).argmax(dim=1).cpu()
                          for s in range(0, x.shape[0], batch_size)])
    finally:
        model.train(was_training)


def teacher_predictions(teachers: Sequence[nn.Module], x_public: Data, *, batch_size: int = 1024,
                        device: str | torch.device | None = None) -> npt.NDArray[np.int64]:
    """(T, N) int64 arg-max labels of each teacher on each public example. ``device`` None runs each
    teacher where its parameters are; otherwise teachers are moved to ``device``."""
    if len(teachers) == 0:
        raise ValueError("teachers is empty: train them with train_teachers first")
    xt = _features(x_public, "x_public")
    _positive_int(batch_size, "batch_size")
    dev = None if device is None else torch.device(device)
    return np.stack([_predict(t, xt, batch_size, dev).numpy() for t in teachers]).astype(np.int64)


def train_student(make_model: Callable[[], nn.Module], x_public: Data, labels: PateLabels, *, epochs: int,
                  batch_size: int, lr: float, optimizer: Optimizer = "adam", device: str | torch.device | None = None,
                  rng: np.random.Generator | None = None) -> nn.Module:
    """Train a fresh ``make_model()`` on ``x_public[labels.indices]`` with the noisy ``labels.labels``
    only (supervised; the unanswered public examples are not used), as in ``train_teachers``."""
    xt = _features(x_public, "x_public")
    _check_training(epochs, batch_size, lr, optimizer)
    if labels.num_answered == 0:
        raise ValueError("no public query was answered, so the student has nothing to learn from: lower the "
                         "threshold, lower sigma1 or ask more queries")
    if labels.num_asked > xt.shape[0]:
        raise ValueError(f"labels were made for at least {labels.num_asked} public examples but x_public has "
                         f"{xt.shape[0]}: pass the same public set that the teachers labelled")
    index = torch.from_numpy(np.array(labels.indices, dtype=np.int64))  # a writable copy
    yt = _labels(labels.labels, index.shape[0], "labels.labels", labels.num_classes)
    batches = torch.Generator().manual_seed(int(numpy_rng(rng).integers(2**63)))
    return _fit(make_model(), xt[index], yt, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                device=_device(device), generator=batches)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((_predict(model, x, 1024, None) == y).float().mean())


@dataclass(frozen=True, eq=False)
class PateResult:
    """What ``run_pate`` produced: the models, the labels with their privacy, and test accuracies
    (None without a test set)."""

    num_teachers: int
    teacher_accuracies: tuple[float, ...] | None
    labels: PateLabels
    student_accuracy: float | None
    student: nn.Module = field(repr=False)
    teachers: tuple[nn.Module, ...] = field(repr=False)

    @property
    def teacher_accuracy_mean(self) -> float | None:
        return None if self.teacher_accuracies is None else float(np.mean(self.teacher_accuracies))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no models, no per-query arrays)."""
        return {"num_teachers": self.num_teachers, "teacher_accuracy_mean": self.teacher_accuracy_mean,
                "teacher_accuracies": None if self.teacher_accuracies is None else list(self.teacher_accuracies),
                "student_accuracy": self.student_accuracy, **self.labels.to_dict()}


def run_pate(make_model: Callable[[], nn.Module], private: tuple[Data, Data], public: Data,
             test: tuple[Data, Data] | None = None, *, num_teachers: int, teacher_epochs: int, student_epochs: int,
             batch_size: int, lr: float, num_classes: int, aggregator: Aggregator = "gnmax",
             sigma: float | None = None, epsilon_per_query: float | None = None, threshold: float | None = None,
             sigma1: float | None = None, num_queries: int | None = None, delta: float = 1e-5,
             public_labels: Data | None = None, optimizer: Optimizer = "adam",
             device: str | torch.device | None = None, rng: np.random.Generator | None = None,
             progress: bool = True) -> PateResult:
    """The whole recipe of the module docstring: teachers, public labels, student, and (with ``test``)
    the test accuracy of each teacher and of the student. ``public_labels`` (true labels of the
    public set, optional) only measures label accuracy; it is never used for training."""
    _check_aggregator(aggregator, {"sigma": sigma, "epsilon_per_query": epsilon_per_query,
                                   "threshold": threshold, "sigma1": sigma1})
    x_priv, y_priv = private
    xp = _features(public, "public")
    test_t = None
    if test is not None:
        xt = _features(test[0], "test x")
        test_t = (xt, _labels(test[1], xt.shape[0], "test y", num_classes))
    _labels(y_priv, _features(x_priv, "private x").shape[0], "private y", num_classes)
    gen = numpy_rng(rng)
    teachers = train_teachers(make_model, x_priv, y_priv, num_teachers=num_teachers, epochs=teacher_epochs,
                              batch_size=batch_size, lr=lr, optimizer=optimizer, device=device, rng=gen,
                              progress=progress)
    votes = teacher_predictions(teachers, xp)
    labels = label_public_data(votes, num_classes, aggregator=aggregator, sigma=sigma,
                               epsilon_per_query=epsilon_per_query, threshold=threshold, sigma1=sigma1,
                               num_queries=num_queries, delta=delta, true_labels=public_labels, rng=gen)
    student = train_student(make_model, xp, labels, epochs=student_epochs, batch_size=batch_size, lr=lr,
                            optimizer=optimizer, device=device, rng=gen)
    teacher_acc = None if test_t is None else tuple(_accuracy(t, *test_t) for t in teachers)
    student_acc = None if test_t is None else _accuracy(student, *test_t)
    return PateResult(num_teachers=len(teachers), teacher_accuracies=teacher_acc, labels=labels,
                      student_accuracy=student_acc, student=student, teachers=tuple(teachers))
