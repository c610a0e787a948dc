"""Checkpoints of a secret-shared training run: each compute party saves its own shares.

File ``DIR/checkpoint-EPOCH.PARTY.veilckpt`` (EPOCH with 4 digits), in the sealed layout of
:func:`veil.files.write_sealed` with magic ``b"VEILCKPT"``, version 1. Header keys: ``run_id`` (32 hex
digits drawn by the first compute party when the run starts; the same in both parties' files),
``party``, ``parties``, ``epoch`` (epochs completed), ``frac_bits``, ``graph_sha256`` (of the model's
graph JSON: a checkpoint only loads into the same architecture), ``tensors`` (list of ``{"name",
"shape"}``: ``param/NAME`` for parameters, ``state/NAME/KEY`` for optimizer state), ``optimizer``
(``{"kind", "steps"}``) and ``extra`` (JSON the trainer keeps: the shuffling seed, the history). The
payload is this party's int64 shares of the tensors in that order. Readers ignore unknown keys.

Nothing in a checkpoint is plaintext but the public header: each file alone is uniformly random.
Resuming (:func:`latest_common`) takes the last epoch *both* parties have on disk, so a run killed
while one party was writing resumes from the previous epoch, with nothing lost but that epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from veil.files import read_sealed, write_sealed
from veil.mpc.tensor import SecretTensor
from veil.net.transport import PartyError

if TYPE_CHECKING:
    from veil.mpc.session import Session
    from veil.nn.model import SecureModel
    from veil.nn.optim import Optimizer

MAGIC = b"VEILCKPT"
VERSION = 1
SUFFIX = ".veilckpt"
KEEP = 3  # checkpoints kept per party (older ones are removed after a new one is written)


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, tampered with, or not this run's / this model's."""


def new_run_id(session: Session) -> str:
    """A fresh run id, drawn by the first compute party and sent to the other."""
    if session.index == 0:
        rid = secrets.token_hex(16)
        session.transport.send(session.peer, rid.encode())
        return rid
    raw = bytes(session.transport.recv(session.peer)).decode("ascii", errors="replace")
    if not re.fullmatch(r"[0-9a-f]{32}", raw):
        raise PartyError(f"{session.party}: malformed run id from {session.peer!r}")
    return raw


def graph_digest(model: SecureModel) -> str:
    return hashlib.sha256(model.graph.to_json()).hexdigest()


def path_for(directory: Path, epoch: int, party: str) -> Path:
    return Path(directory) / f"checkpoint-{epoch:04d}.{party}{SUFFIX}"


def _tensors(model: SecureModel, optimizer: Optimizer) -> list[tuple[str, SecretTensor]]:
    out: list[tuple[str, SecretTensor]] = []
    for name in model.graph.params:
        value = model.params[name]
        if not isinstance(value, SecretTensor):
            raise CheckpointError(f"parameter {name!r} is not secret-shared: checkpoints hold shares")
        out.append((f"param/{name}", value))
    for pname in sorted(optimizer.state):
        for key in sorted(optimizer.state[pname]):
            v = optimizer.state[pname][key]
            if isinstance(v, SecretTensor):
                out.append((f"state/{pname}/{key}", v))
    return out


def save(session: Session, directory: str | Path, *, model: SecureModel, optimizer: Optimizer, epoch: int,
         run_id: str, extra: dict[str, Any]) -> Path:
    """Write this party's checkpoint of ``epoch`` (atomically) and prune old ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items = _tensors(model, optimizer)
    header = {"run_id": run_id, "party": session.party, "parties": list(session.parties), "epoch": epoch,
              "frac_bits": session.fixed_point.frac_bits, "graph_sha256": graph_digest(model),
              "tensors": [{"name": n, "shape": list(t.shape)} for n, t in items],
              "optimizer": {"kind": type(optimizer).__name__, "steps": optimizer.steps}, "extra": extra}
    payload = 8 * sum(t.numel() for _, t in items)

    def chunks() -> Iterator[np.ndarray]:
        for _, t in items:
            yield t.share.detach().cpu().contiguous().numpy().reshape(-1)

    path = path_for(directory, epoch, session.party)
    write_sealed(path, MAGIC, VERSION, header, chunks(), payload)
    for old in sorted(directory.glob(f"checkpoint-*.{session.party}{SUFFIX}"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def epochs_on_disk(directory: str | Path, party: str) -> list[int]:
    found = []
    for p in Path(directory).glob(f"checkpoint-*.{party}{SUFFIX}"):
        m = re.fullmatch(rf"checkpoint-(\d+)\.{re.escape(party)}{re.escape(SUFFIX)}", p.name)
        if m:
            found.append(int(m.group(1)))
    return sorted(found)


def latest_common(session: Session, directory: str | Path) -> int | None:
    """The last epoch both parties have a checkpoint of (one message each way), or None."""
    mine = epochs_on_disk(directory, session.party)
    session.transport.send(session.peer, json.dumps(mine).encode())
    try:
        theirs = [int(e) for e in json.loads(bytes(session.transport.recv(session.peer)))]
    except (ValueError, TypeError):
        raise PartyError(f"{session.party}: malformed checkpoint list from {session.peer!r}") from None
    common = sorted(set(mine) & set(theirs))
    return common[-1] if common else None


def load(session: Session, directory: str | Path, epoch: int, *, model: SecureModel,
         optimizer: Optimizer) -> dict[str, Any]:
    """Restore ``model``'s parameters and ``optimizer``'s state from this party's checkpoint of
    ``epoch``, after checking it against the file and against the peer's header; returns ``extra``."""
    path = path_for(Path(directory), epoch, session.party)
    sealed = read_sealed(path, MAGIC, VERSION, what="checkpoint", error=CheckpointError)
    if not sealed.digest_ok:
        raise CheckpointError(f"{path}: SHA-256 digest mismatch: the checkpoint was altered or damaged")
    h = sealed.header
    if h is None:
        raise CheckpointError(f"{path}: {sealed.problem}")
    try:
        specs = [(str(t["name"]), tuple(int(d) for d in t["shape"])) for t in h["tensors"]]
        party, frac = h["party"], int(h["frac_bits"])
        str(h["run_id"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed header: {e}") from None
    if party != session.party:
        raise CheckpointError(f"{path}: this is {party!r}'s checkpoint, not {session.party!r}'s")
    if h.get("graph_sha256") != graph_digest(model):
        raise CheckpointError(f"{path}: saved for another architecture than this model's")
    saved_kind = (h.get("optimizer") or {}).get("kind")
    if saved_kind != type(optimizer).__name__:
        raise CheckpointError(f"{path}: saved with optimizer {saved_kind}, this run uses {type(optimizer).__name__}")
    if frac != session.fixed_point.frac_bits:
        raise CheckpointError(f"{path}: saved at {frac} fractional bits, this session uses "
                              f"{session.fixed_point.frac_bits}")
    total = 8 * sum(math.prod(s) for _, s in specs)
    if sealed.payload_bytes != total:
        raise CheckpointError(f"{path}: header/payload size mismatch ({total} bytes described, "
                              f"{sealed.payload_bytes} present)")
    # what both files must agree on (``extra`` holds each party's own view of the history: not compared)
    common = {k: v for k, v in h.items() if k not in ("party", "extra")}
    common["seed"] = h.get("extra", {}).get("seed")
    session.transport.send(session.peer, json.dumps(common, sort_keys=True).encode())
    theirs = bytes(session.transport.recv(session.peer))
    if theirs != json.dumps(common, sort_keys=True).encode():
        raise CheckpointError(f"{path}: does not match {session.peer!r}'s checkpoint of epoch {epoch} (another "
                              f"run or another state)")
    data = np.fromfile(path, dtype="<i8", count=total // 8, offset=sealed.offset)
    off = 0
    restored: dict[str, dict[str, SecretTensor]] = {}
    for name, shape in specs:
        n = math.prod(shape)
        t = SecretTensor(torch.from_numpy(data[off:off + n].copy()).reshape(shape).to(session.device), session)
        off += n
        kind, _, rest = name.partition("/")
        if kind == "param":
            if rest not in model.params or tuple(model.params[rest].shape) != shape:
                raise CheckpointError(f"{path}: parameter {rest!r} {shape} does not fit the model")
            model.params[rest] = t
        else:
            pname, _, key = rest.rpartition("/")
            restored.setdefault(pname, {})[key] = t
    optimizer.load_state_dict({"steps": int(h["optimizer"]["steps"]),
                               "state": {p: restored.get(p, {}) for p in optimizer.state}})
    model.zero_grad()
    assert off * 8 == total
    return dict(h.get("extra", {}))
