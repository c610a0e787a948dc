"""Private training loops: inputs, labels, model and optimizer state stay secret-shared throughout.

    net = veil.nn.share_model(session, module or None, owner="alice", training=True)
    data = veil.data.load_shares(session, f"shares/mnist.{session.party}.veilshares")
    history = veil.nn.fit(session, net, data, epochs=5, batch_size=64,
                          optimizer=veil.nn.optim.SGD(net.parameters(), lr=0.05),
                          loss_fn=veil.nn.CrossEntropyLoss(), checkpoint_dir="ckpt", resume=True,
                          reveal_to=["alice"])
    weights = net.reveal_state_dict(to="alice")     # at the end, to the parties chosen

Both compute parties call :func:`fit` with the same arguments (their own files). What is revealed,
and to whom (``reveal_to``): the training loss every ``loss_every`` batches and the test accuracy
after each epoch, nothing else. Batches come in an order both parties derive from a seed they agree
on at the start (public to both, kept in the checkpoints). Long trainings should run in a session with
``SessionOptions(truncation="exact")`` (``veil train``'s default): local truncation errs hugely with
probability ~|x| 2^-32 per element, and a LeNet epoch truncates about 10^9 of them. Every epoch ends
with a checkpoint of the shared parameters and optimizer state (:mod:`veil.nn.checkpoint`);
``resume=True`` continues from the last epoch both parties saved.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from veil.mpc.tensor import SecretTensor
from veil.nn import checkpoint
from veil.nn.losses import CrossEntropyLoss, NLLLoss

if TYPE_CHECKING:
    from veil.mpc.session import Session
    from veil.nn.model import SecureModel
    from veil.nn.optim import Optimizer

CLASSIFICATION_LOSSES = (CrossEntropyLoss, NLLLoss)


class TensorDataset:
    """Secret tensors already in memory (``x`` and ``y`` SecretTensors with the same first dimension),
    with the batching interface of :class:`veil.data.SharedDataset`."""

    def __init__(self, session: Session, x: SecretTensor, y: SecretTensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows, y {len(y)}")
        self.session, self.x, self.y = session, x, y

    def __len__(self) -> int:
        return len(self.x)

    def get(self, index: Any) -> dict[str, SecretTensor]:
        return {"x": self.x[index], "y": self.y[index]}

    def batches(self, batch_size: int, *, shuffle_seed: bytes | None, drop_last: bool = False
                ) -> Iterator[dict[str, SecretTensor]]:
        from veil.data.peer import shuffle_order

        n = len(self)
        order = None if shuffle_seed is None else shuffle_order(shuffle_seed, n)
        stop = n - n % batch_size if drop_last else n
        for a in range(0, stop, batch_size):
            idx = slice(a, min(a + batch_size, n)) if order is None else order[a:a + batch_size]
            yield self.get(idx)


@dataclass
class EpochRecord:
    epoch: int
    seconds: float
    batches: int
    loss: float | None = None  # mean of the revealed losses (at the parties in reveal_to)
    test_accuracy: float | None = None
    bytes_with_peer: int = 0
    bytes_with_dealer: int = 0
    rounds: int = 0


@dataclass
class History:
    epochs: list[EpochRecord] = field(default_factory=list)
    resumed_from: int | None = None

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.epochs]


def _epoch_seed(seed: bytes, epoch: int) -> bytes:
    return hashlib.sha256(b"veil.nn.train epoch order\x00" + seed + epoch.to_bytes(8, "little")).digest()


def one_hot(labels: SecretTensor, classes: int) -> SecretTensor:
    """Secret class indices ``(N,)`` to secret one-hot rows ``(N, classes)`` (one equality call)."""
    grid = torch.arange(classes, dtype=torch.float64)
    return labels.reshape(-1, 1).expand(len(labels), classes) == grid


LABEL_CHECK_ROWS = 1 << 16  # labels compared per equality call (one round for most datasets)


def _check_labels(session: Session, data: Any, classes: int) -> None:
    """Refuse secret index labels that are not class indices in ``[0, classes)`` (a label 7 of 3
    classes, -1, 1.5). On shares: a label's one-hot row sums to 1 exactly when it is one; only the
    number of such rows is revealed (both parties; all of them, in a sound dataset)."""
    valid: SecretTensor | None = None
    n = 0
    for batch in data.batches(max(1, min(len(data), LABEL_CHECK_ROWS)), shuffle_seed=None):
        y = batch["y"]
        if y.dim() != 1:
            return  # one-hot or regression targets: nothing to check here
        ok = one_hot(y, classes).sum()
        valid = ok if valid is None else valid + ok
        n += len(y)
    if valid is None:
        return
    good = round(float(valid.reveal(to=list(session.parties))))
    if good != n:
        raise ValueError(f"{n - good} of the {n} training labels are not class indices in [0, {classes}) "
                         f"(negative, fractional or too large): check the labels or --classes")


def _targets(y: SecretTensor, classes: int | None) -> SecretTensor:
    if classes is not None and y.dim() == 1:
        return one_hot(y, classes)
    return y


def evaluate(session: Session, model: SecureModel, data: Any, *, batch_size: int = 256,
             reveal_to: Sequence[str] = ("alice", "bob"), classes: int | None = None) -> float | None:
    """Accuracy of ``model`` on a secret dataset (``x`` inputs, ``y`` labels as indices or one-hot),
    computed on shares; only the count of correct predictions is revealed, to ``reveal_to``. A model
    with one output is a binary classifier: its prediction is ``[output > 0.5]`` after a final
    Sigmoid, else ``[output > 0]`` (logits); its labels are 0/1."""
    was = model.training
    model.eval()
    correct: SecretTensor | None = None
    n = 0
    for batch in data.batches(batch_size, shuffle_seed=None):
        out = model(batch["x"])
        y = batch["y"]
        if out.shape[-1] == 1:  # binary: threshold, compare with the 0/1 label
            pred = out.reshape(-1) > model.binary_threshold
            hits = (pred == y.reshape(-1)).sum()
        else:
            labels = y if y.dim() == 1 else (y * torch.arange(y.shape[1], dtype=torch.float64)).sum(1)
            hits = (out.argmax(1) == labels).sum()
        correct = hits if correct is None else correct + hits
        n += len(y)
    model.train(was)
    if correct is None:
        return None
    opened = correct.reveal(to=list(reveal_to))
    return None if opened is None else float(opened) / n


def fit(session: Session, model: SecureModel, data: Any, *, epochs: int, batch_size: int, optimizer: Optimizer,
        loss_fn: Any, test_data: Any = None, eval_batch_size: int = 256, classes: int | None = None,
        reveal_to: Sequence[str] = ("alice", "bob"),
        loss_every: int = 20, checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
        shuffle: bool = True, seed: bytes | None = None, on_batch: Callable[[int, int], None] | None = None,
        check_labels: bool = True) -> History:
    """Train ``model`` (shared, in training mode) on ``data`` for ``epochs`` epochs. See the module
    docstring; ``classes`` turns 1-D secret labels into one-hot rows for the classification losses;
    ``seed`` (at least 16 bytes, the same in both parties) fixes the order of the batches, which is
    public to both parties anyway; None draws a fresh one (first party, ``secrets``). Epoch ``e``'s
    order derives from the seed and ``e``: calling ``fit`` one epoch at a time with the same seed
    repeats epoch 1's order (use ``resume`` with checkpoints to continue a run instead).
    ``on_batch(epoch, batch)`` is called after every step (progress hooks, tests). ``check_labels``:
    with a classification loss, first refuse 1-D labels that are not class indices (one equality
    pass over the labels; only the number of valid ones is revealed)."""
    if epochs < 1 or batch_size < 1 or loss_every < 1:
        raise ValueError(f"epochs, batch_size and loss_every must be positive (got {epochs}, {batch_size}, "
                         f"{loss_every})")
    unknown = [p for p in reveal_to if p not in session.parties]
    if unknown:
        raise ValueError(f"reveal_to names {unknown}, not compute parties of this session {list(session.parties)}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs a checkpoint_dir")
    if isinstance(loss_fn, CLASSIFICATION_LOSSES) and classes is None:
        classes = _classes_of(model)
    from veil.nn.infer import check_input_shape

    for what, d in (("training", data), ("test", test_data)):
        if d is not None:
            shape = _x_shape(d)
            try:
                check_input_shape(model.graph, (1, *shape[1:]))
            except ValueError as e:
                raise ValueError(f"the {what} data (x of shape {tuple(shape)}): {e}") from None
    if check_labels and isinstance(loss_fn, CLASSIFICATION_LOSSES) and classes is not None:
        _check_labels(session, data, classes)
    if len(data) % batch_size == 1 and "batch_norm_train" in model.graph.ops():
        raise ValueError(f"{len(data)} training rows in batches of {batch_size} leave a last batch of one row, "
                         f"and BatchNorm cannot train on one value per channel: choose another batch size")
    from veil.data.peer import agree_seed

    model.train()
    history = History()
    start = 0
    if seed is not None and len(seed) < 16:
        raise ValueError("seed must have at least 16 bytes")
    seed = agree_seed(session) if seed is None else bytes(seed)
    run_id = checkpoint.new_run_id(session) if checkpoint_dir is not None else ""
    fingerprint = _data_fingerprint(data)
    if resume and checkpoint_dir is not None:
        last = checkpoint.latest_common(session, checkpoint_dir)
        if last is not None:
            extra = checkpoint.load(session, checkpoint_dir, last, model=model, optimizer=optimizer)
            if extra.get("data", fingerprint) != fingerprint:
                raise checkpoint.CheckpointError(
                    f"{checkpoint_dir}: the checkpoint of epoch {last} trained on other data ({extra['data']}), "
                    f"this run has {fingerprint}")
            seed, run_id = bytes.fromhex(extra["seed"]), extra["run_id"]
            history.epochs = [EpochRecord(**e) for e in extra.get("history", [])]
            history.resumed_from = start = last
    me_sees = session.party in reveal_to
    for epoch in range(start + 1, epochs + 1):
        t0 = time.perf_counter()
        losses: list[float] = []
        count = 0
        n_batches = -(-len(data) // batch_size)
        bar = tqdm(total=n_batches, desc=f"{session.party}: epoch {epoch}/{epochs}", unit="batch",
                   disable=not progress, leave=False)
        with session.measure() as traffic:
            order = _epoch_seed(seed, epoch) if shuffle else None
            for step, batch in enumerate(data.batches(batch_size, shuffle_seed=order)):
                optimizer.zero_grad()
                out = model(batch["x"])
                loss = loss_fn(out, _targets(batch["y"], classes))
                loss.backward()
                optimizer.step()
                if (step + 1) % loss_every == 0 or step == n_batches - 1:
                    value = loss.reveal(to=list(reveal_to)) if reveal_to else None
                    if value is not None:
                        losses.append(value)
                        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                count += 1
                bar.update(1)
                if on_batch is not None:
                    on_batch(epoch, step)
        bar.close()
        record = EpochRecord(epoch, round(time.perf_counter() - t0, 3), count,
                             loss=sum(losses) / len(losses) if losses and me_sees else None,
                             bytes_with_peer=traffic["bytes_with_peer"],
                             bytes_with_dealer=traffic["bytes_with_dealer"], rounds=traffic["rounds"])
        if test_data is not None:
            record.test_accuracy = evaluate(session, model, test_data, batch_size=eval_batch_size, reveal_to=reveal_to,
                                            classes=classes)
        history.epochs.append(record)
        if checkpoint_dir is not None:
            checkpoint.save(session, checkpoint_dir, model=model, optimizer=optimizer, epoch=epoch, run_id=run_id,
                            extra={"seed": seed.hex(), "run_id": run_id, "history": history.as_dicts(),
                                   "data": fingerprint})
    return history


def _data_fingerprint(data: Any) -> dict[str, Any]:
    """What a resumed run must train on again: the dataset's id where it has one, its rows and input shape."""
    out: dict[str, Any] = {"rows": len(data), "x": list(_x_shape(data)[1:])}
    dataset_id = getattr(getattr(data, "header", None), "dataset_id", None) or getattr(data, "dataset_id", None)
    if isinstance(dataset_id, str):
        out["dataset_id"] = dataset_id
    return out


def _x_shape(data: Any) -> tuple[int, ...]:
    shapes = getattr(data, "shapes", None)
    if isinstance(shapes, dict) and "x" in shapes:
        return tuple(shapes["x"])
    return tuple(data.x.shape)


def _classes_of(model: SecureModel) -> int | None:
    """The output width of the model's last parameterised layer (its number of classes), if clear."""
    for node in reversed(model.graph.nodes):
        if node.op in ("linear", "conv2d"):
            w = model.graph.params.get(node.args[1].name) if hasattr(node.args[1], "name") else None
            return int(w[0]) if w else None
    return None


def plot_history(history: History, path: str | Path, *, title: str = "private training") -> Path:
    """Loss and test accuracy per epoch as a PNG (needs matplotlib: ``pip install 'veil[plots]'``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from veil.files import atomic_writer

    epochs = [e.epoch for e in history.epochs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [e.loss if e.loss is not None else float("nan") for e in history.epochs], "o-")
    ax1.set(xlabel="epoch", ylabel="training loss (revealed)", title="loss")
    ax2.plot(epochs, [100 * e.test_accuracy if e.test_accuracy is not None else float("nan")
                      for e in history.epochs], "o-", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="test accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path
