"""A network that reads the M-209's pins (and lug-pair counts) off a known-plaintext keystream.

The machine is a factor graph: letter ``i`` of the keystream is the drum count of the six pins
that the wheels present at that step (pin ``(pos_w + i + guide_w) mod n_w`` of wheel ``w``), so
each letter ties together exactly six of the 131 pins, and every pin is seen at about ``L / n_w``
letters. ``PinNet`` is a message-passing network on that graph, in the spirit of belief
propagation with learned messages:

* a letter state from its keystream value (one of 26), the current states of its six pins (in
  wheel order: each wheel carries its own lug weight) and a global state;
* each letter sends a wheel-specific message to each of its six pins; a pin averages the messages
  of its letters and updates its state (residual MLP);
* a global state (the lug settings, in effect) pools letters and pins per wheel.

The same weights are applied ``iterations`` times (a recurrent network: more iterations at test
time are allowed), so one network serves any message length ``L`` and any wheel positions. Pin
logits are read from every iteration (deep supervision during training; the last is the answer);
the 22 lug-pair counts are classified (0..27) from the global state and the per-wheel pin pools.

Nothing here depends on the known plaintext being all A's: the network reads ``k mod 26``
(``veil.m209.machine.keystream_from_known_plaintext``) and the six start positions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from tqdm import tqdm

from veil.files import atomic_writer, missing_file_problem, torch_load_problem
from veil.m209.machine import GUIDE_OFFSETS, LUG_PAIRS, NUM_BARS, NUM_PINS, NUM_WHEELS, WHEEL_SIZES, WHEEL_STARTS

LUG_CLASSES = NUM_BARS + 1  # a lug-pair count is 0..27


@dataclass(frozen=True)
class PinNetConfig:
    """Shape of a ``PinNet``: ``hidden`` width, message-passing ``iterations``."""

    hidden: int = 64
    iterations: int = 8

    def __post_init__(self) -> None:
        if self.hidden < 4 or self.iterations < 1:
            raise ValueError(f"PinNetConfig: need hidden >= 4 and iterations >= 1, got {self}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def pin_index(positions: Tensor, length: int) -> Tensor:
    """``(B, L, 6)`` index (0..130) of the pin that wheel ``w`` presents at letter ``i``."""
    device = positions.device
    sizes = torch.tensor(WHEEL_SIZES, device=device)
    offsets = torch.tensor(GUIDE_OFFSETS, device=device)
    starts = torch.tensor(WHEEL_STARTS, device=device)
    steps = torch.arange(length, device=device)[None, :, None]
    return (positions.long()[:, None, :] + steps + offsets) % sizes + starts


def _mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.GELU(), nn.Linear(n_hidden, n_out))


class PinNet(nn.Module):
    """Keystream (B, L) values 0..25 and start positions (B, 6) to pin logits and lug-count logits.

    ``forward`` returns ``(pin_logits, lug_logits)``: ``(T, B, 131)`` logits of "pin effective"
    after each of the T iterations, and ``(B, 22, 28)`` logits of each lug-pair count."""

    def __init__(self, config: PinNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or PinNetConfig()
        h = self.config.hidden
        self.letter_embedding = nn.Embedding(26, h)
        self.wheel_embedding = nn.Embedding(NUM_WHEELS, h)
        self.register_buffer("pin_wheel", torch.repeat_interleave(
            torch.arange(NUM_WHEELS), torch.tensor(WHEEL_SIZES)), persistent=False)
        self.letter_mlp = _mlp((2 + NUM_WHEELS) * h, 2 * h, h)
        self.letter_norm = nn.LayerNorm(h)
        self.messages = nn.Linear(h, NUM_WHEELS * h)
        self.pin_mlp = _mlp(3 * h, 2 * h, h)
        self.pin_norm = nn.LayerNorm(h)
        self.global_mlp = _mlp((2 + NUM_WHEELS) * h, 2 * h, h)
        self.global_norm = nn.LayerNorm(h)
        self.pin_out = nn.Linear(h, 1)
        self.lug_out = _mlp((1 + NUM_WHEELS) * h, 4 * h, len(LUG_PAIRS) * LUG_CLASSES)

    def _wheel_pools(self, pins: Tensor) -> Tensor:
        """(B, 131, H) to (B, 6*H): the mean pin state of each wheel."""
        parts = [pins[:, s:s + n].mean(dim=1) for s, n in zip(WHEEL_STARTS, WHEEL_SIZES)]
        return torch.cat(parts, dim=1)

    def forward(self, keystream: Tensor, positions: Tensor, iterations: int | None = None) -> tuple[Tensor, Tensor]:
        if keystream.dim() != 2 or positions.dim() != 2 or positions.shape != (keystream.shape[0], NUM_WHEELS):
            raise ValueError(f"PinNet: need keystream (B, L) and positions (B, 6), got {tuple(keystream.shape)} "
                             f"and {tuple(positions.shape)}")
        b, length = keystream.shape
        h = self.config.hidden
        index = pin_index(positions, length)  # (B, L, 6)
        flat = (index + torch.arange(b, device=index.device)[:, None, None] * NUM_PINS).reshape(-1)
        counts = torch.zeros(b * NUM_PINS, device=keystream.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float32)).clamp_(min=1.0)[:, None]
        letters = self.letter_embedding(keystream.long())  # (B, L, H)
        pins = self.wheel_embedding(self.pin_wheel).expand(b, -1, -1)  # (B, 131, H)
        glob = torch.zeros(b, h, device=keystream.device, dtype=letters.dtype)
        logits = []
        for _ in range(iterations or self.config.iterations):
            around = pins.reshape(b * NUM_PINS, h)[flat].reshape(b, length, NUM_WHEELS * h)
            state = self.letter_norm(self.letter_mlp(torch.cat(
                [letters, around, glob[:, None, :].expand(-1, length, -1)], dim=2)))
            sent = self.messages(state).reshape(b * length * NUM_WHEELS, h)
            received = torch.zeros(b * NUM_PINS, h, device=sent.device, dtype=sent.dtype).index_add_(0, flat, sent)
            received = (received / counts).reshape(b, NUM_PINS, h)
            pins = self.pin_norm(pins + self.pin_mlp(torch.cat(
                [pins, received, glob[:, None, :].expand(-1, NUM_PINS, -1)], dim=2)))
            glob = self.global_norm(glob + self.global_mlp(torch.cat(
                [glob, state.mean(dim=1), self._wheel_pools(pins)], dim=1)))
            logits.append(self.pin_out(pins).squeeze(2))
        lugs = self.lug_out(torch.cat([glob, self._wheel_pools(pins)], dim=1))
        return torch.stack(logits), lugs.reshape(b, len(LUG_PAIRS), LUG_CLASSES)


# --- files and prediction ----------------------------------------------------------------------

MODEL_FORMAT = "veil-m209-pinnet/1"


class ModelFileError(ValueError):
    """A PinNet file that cannot be used: missing, not a PinNet, or damaged."""


def _digest(blob: dict[str, Any]) -> str:
    """SHA-256 over a model file's header values and its tensors' bytes, in key order."""
    h = hashlib.sha256(json.dumps([blob["format"], blob["config"], blob["letters"], blob["metrics"]]).encode())
    for name in sorted(blob["state_dict"]):
        t = blob["state_dict"][name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def save_model(net: PinNet, path: str | Path, *, letters: int, metrics: dict[str, Any] | None = None) -> None:
    """Write ``net`` (weights, config, the message length it was trained for, validation metrics)
    atomically. Read back with ``load_model``; no pickled code, only tensors and plain values."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    blob = {"format": MODEL_FORMAT, "config": net.config.to_dict(), "letters": int(letters),
            "metrics": json.dumps(metrics or {}), "state_dict": state}
    blob["sha256"] = _digest(blob)
    with atomic_writer(path) as f:
        torch.save(blob, f)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[PinNet, dict[str, Any]]:
    """A PinNet and its info (``letters``, ``metrics``, ``config``) from ``save_model``'s file."""
    path = Path(path)
    problem = missing_file_problem(path, "model file")
    if problem:
        raise ModelFileError(problem)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged or foreign file
        raise ModelFileError(f"{path}: not a readable PinNet file ({torch_load_problem(e)})") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: not a PinNet file (format {MODEL_FORMAT!r} expected)")
    try:
        intact = blob["sha256"] == _digest(blob)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ModelFileError(f"{path}: damaged PinNet file ({e})") from None
    if not intact:
        raise ModelFileError(f"{path}: PinNet file damaged or tampered with (SHA-256 mismatch)")
    try:
        config = PinNetConfig(**blob["config"])
        net = PinNet(config)
        net.load_state_dict(blob["state_dict"])
        info = {"letters": int(blob["letters"]), "metrics": json.loads(blob["metrics"]), "config": config.to_dict()}
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ModelFileError(f"{path}: damaged PinNet file ({e})") from None
    return net.to(device).eval(), info


@torch.no_grad()
def predict(net: PinNet, keystream: npt.ArrayLike, positions: npt.ArrayLike, *, batch_size: int = 256,
            progress: bool = False) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``(N, L)`` keystream letters (0..25) and ``(N, 6)`` positions to ``(N, 131)`` pin
    probabilities and ``(N, 22, 28)`` lug-pair count probabilities."""
    ks = np.asarray(keystream)
    pos = np.asarray(positions)
    if ks.ndim != 2 or pos.shape != (ks.shape[0], NUM_WHEELS):
        raise ValueError(f"predict: need keystream (N, L) and positions (N, 6), got {ks.shape} and {pos.shape}")
    if ks.size and (ks.min() < 0 or ks.max() > 25):
        raise ValueError("predict: keystream letters must be 0..25 (the drum count mod 26)")
    if pos.size and ((pos < 0) | (pos >= np.asarray(WHEEL_SIZES))).any():
        raise ValueError(f"predict: wheel positions must lie in 0..n-1 for wheel sizes {WHEEL_SIZES}")
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    pins, lugs = [], []
    starts = range(0, ks.shape[0], batch_size)
    for s in tqdm(starts, desc="predict", unit="batch", disable=not progress):
        k = torch.from_numpy(ks[s:s + batch_size].astype(np.int64)).to(device)
        p = torch.from_numpy(pos[s:s + batch_size].astype(np.int64)).to(device)
        pl, ll = net(k, p)
        pins.append(torch.sigmoid(pl[-1]).cpu().numpy())
        lugs.append(torch.softmax(ll, dim=2).cpu().numpy())
    net.train(was_training)
    if not pins:
        return np.zeros((0, NUM_PINS), np.float32), np.zeros((0, len(LUG_PAIRS), LUG_CLASSES), np.float32)
    return np.concatenate(pins), np.concatenate(lugs)


MODELS_DIR = Path(__file__).resolve().parent / "models"


def shipped_models() -> dict[int, Path]:
    """The PinNets shipped with Veil, by the message length they were trained for."""
    found = {}
    for p in sorted(MODELS_DIR.glob("pinnet-L*.pt")):
        suffix = p.stem.removeprefix("pinnet-L")
        if suffix.isdigit():
            found[int(suffix)] = p
    return found


def shipped_model(letters: int) -> Path:
    """The shipped PinNet trained for the message length nearest ``letters`` (the longer on a tie)."""
    models = shipped_models()
    if not models:
        raise ModelFileError(f"no shipped PinNet in {MODELS_DIR}; train one with `veil m209 train`")
    return models[min(models, key=lambda n: (abs(n - letters), -n))]
