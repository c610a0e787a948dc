"""A whole private-training run as ``veil train`` does it in each party.

The model owner builds the architecture (``--arch``, optionally with initial weights ``--init``) and
shares it; each party opens its own share files of the training (and test) data; :func:`veil.nn.fit`
trains with checkpoints; at the end the weights are revealed to the parties named in
``weights_to``, which save them as a PyTorch ``state_dict``; the parties in ``reveal_to`` save the
history (JSON) and the curves (PNG).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from veil.nn import losses as loss_mod
from veil.nn import optim

if TYPE_CHECKING:
    from veil.mpc.session import Session

LOSSES = {"ce": loss_mod.CrossEntropyLoss, "mse": loss_mod.MSELoss, "bce": loss_mod.BCELoss,
          "bce-logits": loss_mod.BCEWithLogitsLoss, "nll": loss_mod.NLLLoss}
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainingJob:
    arch: str
    shares: str
    name: str
    test_name: str | None = None
    init: str | None = None
    model_owner: str = "bob"
    epochs: int = 1
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: str = "ce"
    classes: int | None = None
    reveal_to: tuple[str, ...] = ("alice", "bob")
    weights_to: tuple[str, ...] = ()
    loss_every: int = 20
    checkpoint_dir: str | None = None
    resume: bool = False
    out: str | None = None
    plot: str | None = None
    history: str | None = None
    progress: bool = True
    progress_party: str | None = None
    seed: str | None = None  # hex, >= 16 bytes: the public batch order (None: a fresh one)

    def check(self) -> None:
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--lr", self.lr)):
            if not value > 0:
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {sorted(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {list(OPTIMIZERS)}")
        from veil.files import check_output

        check_output(self.out)
        check_output(self.checkpoint_dir, directory=True, flag="--checkpoint-dir")
        if self.out and not self.weights_to:
            raise ValueError("--out needs --weights-to: the parties that receive the trained weights")
        if self.seed is not None:
            try:
                ok = len(bytes.fromhex(self.seed)) >= 16
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"--seed must be at least 32 hex digits, got {self.seed!r}")


def _shares_path(job: TrainingJob, name: str, party: str) -> Path:
    return Path(job.shares) / f"{name}.{party}.veilshares"


def run_training(session: Session, job: TrainingJob) -> dict[str, Any]:
    """One party's part of ``veil train``; returns its summary (what it may see)."""
    from veil.data.shares import load_shares
    from veil.nn.infer import resolve_architecture
    from veil.nn.load import save_state_dict
    from veil.nn.model import share_model
    from veil.nn.train import fit, plot_history

    job.check()
    me = session.party
    module = None
    if me == job.model_owner:
        module = resolve_architecture(job.arch)
        if job.init:
            state = torch.load(job.init, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
    net = share_model(session, module, owner=job.model_owner, training=True)
    data = load_shares(session, _shares_path(job, job.name, me))
    test = load_shares(session, _shares_path(job, job.test_name, me)) if job.test_name else None
    if job.optimizer == "sgd":
        opt: optim.Optimizer = optim.SGD(net.parameters(), lr=job.lr, momentum=job.momentum,
                                         weight_decay=job.weight_decay)
    else:
        opt = optim.Adam(net.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    history = fit(session, net, data, epochs=job.epochs, batch_size=job.batch_size, optimizer=opt,
                  loss_fn=LOSSES[job.loss](), test_data=test, classes=job.classes, reveal_to=job.reveal_to,
                  loss_every=job.loss_every, checkpoint_dir=job.checkpoint_dir, resume=job.resume,
                  progress=job.progress and job.progress_party in (None, me),
                  seed=bytes.fromhex(job.seed) if job.seed else None)
    summary: dict[str, Any] = {"party": me, "epochs": history.as_dicts(), "resumed_from": history.resumed_from}
    weights = net.reveal_state_dict(to=list(job.weights_to)) if job.weights_to else None
    if weights is not None and job.out:
        summary["weights"] = str(save_state_dict(weights, job.out))
    if me in job.reveal_to:
        from veil.files import write_atomic

        if job.history:
            write_atomic(job.history, (json.dumps(summary["epochs"], indent=2) + "\n").encode())
        if job.plot:
            summary["plot"] = str(plot_history(history, job.plot, title=f"private training of {job.arch}"))
    return summary
