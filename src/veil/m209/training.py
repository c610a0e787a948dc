"""Training a ``PinNet`` on a packed M-209 dataset: validation, early stopping, checkpoints.

The packed training split (``veil.m209.dataset``) is cut in two: its last ``val_keys`` keys
validate (their lugs are never trained on), the rest train. With ``augment`` (the default) each
training example keeps the lugs of a training key but draws fresh pins and fresh wheel positions
(the manual's procedure draws pins and lugs independently, so this is the same key distribution)
and recomputes its keystream with the vectorised machine: the network never sees a key twice, and
the slow step of key generation (lugs, a Python loop per key) is stretched over many examples.
Without ``augment`` the packed keystreams are used as they are.

Training runs for a time budget (``minutes``) and stops early when the validation pin accuracy
has not improved for ``patience`` evaluations; the learning rate drops by ``lr_decay`` after
``lr_patience`` evaluations without improvement. A checkpoint (model, optimiser, step, history,
best weights) is written atomically at every evaluation and a run resumes from it; a checkpoint
of another configuration is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from tqdm import tqdm

from veil.files import atomic_writer, state_digest, torch_load_problem
from veil.m209.dataset import PackedSet
from veil.m209.evaluate import per_key_pin_accuracy
from veil.m209.keys import generate_pins, generate_positions, make_rng
from veil.m209.machine import drum_tables_from_counts, keystream_from_tables
from veil.m209.model import LUG_CLASSES, PinNet, PinNetConfig, predict, save_model

CHECKPOINT_FORMAT = "veil-m209-checkpoint/1"


@dataclass(frozen=True)
class TrainConfig:
    """What ``train_pinnet`` does. ``letters``: message length L (a prefix of the packed letters)."""

    letters: int
    hidden: int = 32
    iterations: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    minutes: float = 55.0
    max_steps: int | None = None
    eval_every: int = 250
    val_keys: int = 2000
    patience: int = 6
    lr_patience: int = 2
    lr_decay: float = 0.3
    lug_weight: float = 0.1
    augment: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.letters < 1:
            problems.append(f"letters must be >= 1, got {self.letters}")
        if self.batch_size < 1 or self.eval_every < 1 or self.val_keys < 1:
            problems.append("batch_size, eval_every and val_keys must be >= 1")
        if not self.lr > 0 or not self.minutes > 0 or not 0 < self.lr_decay < 1:
            problems.append("lr and minutes must be > 0 and lr_decay in (0, 1)")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    def model_config(self) -> PinNetConfig:
        return PinNetConfig(hidden=self.hidden, iterations=self.iterations)


@dataclass
class TrainResult:
    """What a run did: steps, minutes, best validation accuracy and its step, why it stopped."""

    steps: int
    minutes: float
    best_pin_accuracy: float
    best_step: int
    stopped: str
    history: list[dict[str, float]] = field(default_factory=list)


def pin_loss(pin_logits: torch.Tensor, lug_logits: torch.Tensor, pins: torch.Tensor, lugs: torch.Tensor,
             lug_weight: float) -> torch.Tensor:
    """Deep-supervised BCE over the iterations (later ones weigh more) plus the lug-count CE."""
    t = pin_logits.shape[0]
    weights = torch.linspace(0.3, 1.0, t, device=pin_logits.device)[:, None, None]
    bce = F.binary_cross_entropy_with_logits(pin_logits, pins.expand(t, -1, -1), reduction="none")
    lug = F.cross_entropy(lug_logits.reshape(-1, LUG_CLASSES), lugs.reshape(-1))
    return (bce * weights).mean() / weights.mean() + lug_weight * lug


class _Batches:
    """Training examples from the packed split's training part (augmented or as packed)."""

    def __init__(self, data: PackedSet, rows: npt.NDArray[np.int64], config: TrainConfig) -> None:
        self.data, self.rows, self.config = data, rows, config
        self.rng = make_rng()
        self.tables = drum_tables_from_counts(data.lugs[rows].astype(np.int64))

    def next(self) -> tuple[npt.NDArray[Any], ...]:
        c = self.config
        pick = self.rng.integers(0, self.rows.shape[0], size=c.batch_size)
        lugs = self.data.lugs[self.rows[pick]].astype(np.int64)
        if not c.augment:
            rows = self.rows[pick]
            return (self.data.keystream[rows, :c.letters], self.data.positions[rows].astype(np.int64),
                    self.data.pins[rows], lugs)
        pins = generate_pins(c.batch_size, rng=self.rng)
        positions = generate_positions(c.batch_size, rng=self.rng)
        ks = keystream_from_tables(pins, self.tables[pick], positions, c.letters) % 26
        return ks, positions, pins.astype(np.uint8), lugs


def evaluate_pins(net: PinNet, data: PackedSet, rows: npt.NDArray[np.int64], letters: int) -> dict[str, float]:
    """Pin accuracy and lug-count accuracy of ``net`` on the given rows of ``data``."""
    probs, lug_probs = predict(net, data.keystream[rows, :letters], data.positions[rows])
    pin_acc = float(per_key_pin_accuracy(probs, data.pins[rows]).mean())
    lug_acc = float((lug_probs.argmax(axis=2) == data.lugs[rows]).mean())
    return {"pin_accuracy": pin_acc, "lug_accuracy": lug_acc}


def _copy_state(net: PinNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _checkpoint_state(net: PinNet, opt: torch.optim.Optimizer, config: TrainConfig, step: int, seconds: float,
                      history: list[dict[str, float]], best: dict[str, Any]) -> dict[str, Any]:
    blob = {"format": CHECKPOINT_FORMAT, "config": json.dumps(asdict(config)), "step": step, "seconds": seconds,
            "history": json.dumps(history), "model": net.state_dict(), "optimizer": opt.state_dict(),
            "best_state": best["state"], "best": json.dumps({k: v for k, v in best.items() if k != "state"})}
    return {**blob, "sha256": state_digest(blob)}


def _resume(path: Path, config: TrainConfig, net: PinNet, opt: torch.optim.Optimizer) -> tuple[int, float, list, dict]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file
        raise ValueError(f"{path}: not a readable M-209 training checkpoint ({torch_load_problem(e)})") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an M-209 training checkpoint")
    if blob.get("sha256") != state_digest({k: v for k, v in blob.items() if k != "sha256"}):
        raise ValueError(f"{path}: SHA-256 digest mismatch: the checkpoint was altered or damaged; delete it "
                         f"to start over")
    saved = json.loads(blob["config"])
    mine = asdict(config)
    differ = {k: (saved.get(k), v) for k, v in mine.items() if k not in ("minutes", "max_steps") and saved.get(k) != v}
    if differ:
        raise ValueError(f"{path}: checkpoint of another training configuration ({differ}); "
                         "use another --checkpoint or delete it")
    net.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    best = json.loads(blob["best"])
    best["state"] = blob["best_state"]
    return int(blob["step"]), float(blob["seconds"]), json.loads(blob["history"]), best


def train_pinnet(data: PackedSet, config: TrainConfig, *, out: str | Path, checkpoint: str | Path | None = None,
                 progress: bool = True, device: str = "cpu") -> TrainResult:
    """Train a PinNet on ``data`` (a packed training split) and write the best one to ``out``."""
    n = len(data)
    if config.letters > data.keystream.shape[1]:
        raise ValueError(f"letters={config.letters}, but the packed set has only {data.keystream.shape[1]} "
                         "letters per key: encrypt it with more --letters")
    if n <= config.val_keys:
        raise ValueError(f"the packed set has {n} keys: need more than val_keys={config.val_keys} "
                         "(the last val_keys validate, the rest train)")
    train_rows = np.arange(n - config.val_keys)
    val_rows = np.arange(n - config.val_keys, n)
    net = PinNet(config.model_config()).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    step, seconds, history = 0, 0.0, []
    best: dict[str, Any] = {"pin_accuracy": -1.0, "step": 0, "since": 0, "lr_since": 0, "state": None}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.is_file():
        step, seconds, history, best = _resume(ckpt, config, net, opt)
    batches = _Batches(data, train_rows, config)
    budget = config.minutes * 60.0
    start = time.monotonic() - seconds
    stopped = "time budget"
    bar = tqdm(total=config.max_steps, initial=step, desc=f"train L={config.letters}", unit="step",
               disable=not progress)
    while True:
        if config.max_steps is not None and step >= config.max_steps:
            stopped = "max steps"
            break
        if time.monotonic() - start >= budget:
            break
        ks, pos, pins, lugs = batches.next()
        pin_logits, lug_logits = net(torch.from_numpy(np.asarray(ks, dtype=np.int64)).to(device),
                                     torch.from_numpy(np.asarray(pos, dtype=np.int64)).to(device))
        loss = pin_loss(pin_logits, lug_logits, torch.from_numpy(pins.astype(np.float32)).to(device),
                        torch.from_numpy(lugs).to(device), config.lug_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % config.eval_every == 0:
            metrics = evaluate_pins(net, data, val_rows, config.letters)
            lr = opt.param_groups[0]["lr"]
            history.append({"step": step, "seconds": time.monotonic() - start, "loss": float(loss.detach()), "lr": lr,
                            **{f"val_{k}": v for k, v in metrics.items()}})
            bar.set_postfix(val_pin=f"{metrics['pin_accuracy']:.4f}", lr=f"{lr:.1e}")
            if metrics["pin_accuracy"] > best["pin_accuracy"]:
                best = {**metrics, "step": step, "since": 0, "lr_since": 0, "state": _copy_state(net)}
            else:
                best["since"] += 1
                best["lr_since"] += 1
                if best["lr_since"] >= config.lr_patience:
                    for g in opt.param_groups:
                        g["lr"] = lr * config.lr_decay
                    best["lr_since"] = 0
            if ckpt is not None:
                with atomic_writer(ckpt) as f:
                    torch.save(_checkpoint_state(net, opt, config, step, time.monotonic() - start, history, best), f)
            if best["since"] >= config.patience:
                stopped = "early stopping"
                break
    bar.close()
    if best["state"] is None or (history and history[-1]["step"] != step):
        metrics = evaluate_pins(net, data, val_rows, config.letters)
        history.append({"step": step, "seconds": time.monotonic() - start,
                        **{f"val_{k}": v for k, v in metrics.items()}})
        if metrics["pin_accuracy"] > best["pin_accuracy"]:
            best = {**metrics, "step": step, "state": _copy_state(net)}
    net.load_state_dict(best["state"])
    minutes = (time.monotonic() - start) / 60.0
    result = TrainResult(steps=step, minutes=minutes, best_pin_accuracy=best["pin_accuracy"], best_step=best["step"],
                         stopped=stopped, history=history)
    save_model(net, out, letters=config.letters, metrics={
        "val_pin_accuracy": best["pin_accuracy"], "val_lug_accuracy": best.get("lug_accuracy"), "steps": step,
        "best_step": best["step"], "minutes": minutes, "stopped": stopped, "train_keys": int(train_rows.shape[0]),
        "augment": config.augment, "dataset": str(data.path)})
    return result
