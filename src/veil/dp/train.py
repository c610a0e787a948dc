"""DP-SGD through Opacus: per-example clipping, Gaussian noise, Poisson sampling, and an accountant.

One step of DP-SGD (Abadi et al. 2016) on a Poisson batch B (each record in independently with
probability q = batch_size / n):

    g_i  = grad loss(x_i)                      per-example gradients (Opacus: hooks, or "ghost"
                                               clipping, which gets the norms without materialising g_i)
    g~_i = g_i * min(1, C / ||g_i||)          clip to norm C (``max_grad_norm``)
    g    = (sum_i g~_i + N(0, sigma^2 C^2 I)) / batch_size
    theta <- optimizer(theta, g)

Each step is the subsampled Gaussian mechanism; T = epochs * n / batch_size steps compose. The
accountant ("prv": Gopi et al. 2021, numerical composition of privacy random variables; "rdp":
Mironov 2017/2019) turns (q, sigma, T, delta) into epsilon. Given a target (epsilon, delta) and the
epochs, ``calibrate_noise`` finds the smallest sigma (Opacus's bisection, tolerance 0.01 in epsilon)
whose epsilon is at most the target. After every epoch the spent epsilon is reported by both
accountants (the chosen one is authoritative; the other is a cross-check), and it is saved with the
model.

What the guarantee covers: one record of the training set, add/remove adjacency, the final model
and every intermediate one. A ``frontend`` (a fixed feature extractor such as the scattering
transform of :mod:`veil.dp.models`) must not have been fitted on the private data: it is applied to
each record alone and costs no privacy. Weight averaging (``ema_decay``) is post-processing and costs
nothing. Hyperparameters chosen by looking at test accuracy are not accounted (as in the literature).

Randomness: the Poisson sampler and the noise use a torch generator seeded with 63 bits from
``secrets``. Opacus's ``secure_mode`` (torchcsprng, which also resists the floating-point attacks of
Mironov 2012) is not used: torchcsprng is unmaintained; this is the same caveat Opacus prints.

Models with BatchNorm (which mixes examples in a batch, so per-example gradients do not exist) are
fixed as Opacus recommends: ``ModuleValidator.fix`` replaces BatchNorm with GroupNorm; a warning
names every replaced layer, and the list is kept in the result.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from veil.dp.composition import validate_delta, validate_epsilon
from veil.dp.sgd_accounting import ACCOUNTANTS, DPTrainingError, calibrate_noise, quiet_opacus, spent_epsilon
from veil.files import atomic_writer, torch_load_problem
from veil.nn.zoo import evaluate

MODEL_FORMAT = "veil-dp-model/1"


@dataclass(frozen=True)
class DPSGDConfig:
    """Settings of one DP-SGD run. Give ``target_epsilon`` (noise calibrated to it) or ``noise_multiplier``."""

    target_epsilon: float | None = 3.0
    delta: float = 1e-5
    epochs: int = 20
    batch_size: int = 1024          # expected size of a Poisson batch
    max_grad_norm: float = 1.0      # clipping norm C
    lr: float = 1.0
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    noise_multiplier: float | None = None
    accountant: Literal["prv", "rdp"] = "prv"
    clipping: Literal["ghost", "hooks"] = "ghost"
    ema_decay: float | None = None  # exponential moving average of the weights, evaluated and returned

    def __post_init__(self) -> None:
        problems = []
        if self.target_epsilon is None and self.noise_multiplier is None:
            problems.append("give target_epsilon (noise calibrated to it) or noise_multiplier")
        if self.target_epsilon is not None:
            try:
                validate_epsilon(self.target_epsilon)
            except ValueError as e:
                problems.append(f"target_epsilon: {e}")
        try:
            validate_delta(self.delta)
        except ValueError as e:
            problems.append(f"delta: {e}")
        if self.delta == 0:
            problems.append("delta must be > 0 for the Gaussian mechanism of DP-SGD (e.g. 1e-5, below 1/n)")
        if self.noise_multiplier is not None and not (math.isfinite(self.noise_multiplier)
                                                      and self.noise_multiplier > 0):
            problems.append(f"noise_multiplier must be a positive finite number, got {self.noise_multiplier}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_grad_norm", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a positive finite number, got {value}")
        if self.optimizer not in ("sgd", "adam"):
            problems.append(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.clipping not in ("ghost", "hooks"):
            problems.append(f"clipping must be 'ghost' or 'hooks', got {self.clipping!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            problems.append(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if problems:
            raise DPTrainingError("invalid DP-SGD settings: " + "; ".join(problems))


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch spent and reached. ``epsilon`` is the configured accountant's."""

    epoch: int
    steps: int
    loss: float
    epsilon: float
    epsilon_prv: float
    epsilon_rdp: float
    test_accuracy: float | None
    seconds: float


@dataclass(frozen=True)
class DPTrainResult:
    """A trained model with its privacy guarantee (epsilon, delta) and the per-epoch history."""

    model: nn.Module
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    config: DPSGDConfig
    history: tuple[EpochRecord, ...]
    fixes: tuple[str, ...] = ()
    seconds: float = 0.0
    records: int = 0
    privacy_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def test_accuracy(self) -> float | None:
        return self.history[-1].test_accuracy if self.history else None

    def privacy(self) -> dict[str, Any]:
        """The guarantee and how it was obtained: what is saved with the model."""
        return {"epsilon": self.epsilon, "delta": self.delta, "accountant": self.config.accountant,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": self.steps, "epochs": len(self.history), "max_grad_norm": self.config.max_grad_norm,
                "records": self.records, "adjacency": "add/remove one record", **self.privacy_extra}

    def to_dict(self) -> dict[str, Any]:
        return {**self.privacy(), "test_accuracy": self.test_accuracy, "seconds": round(self.seconds, 2),
                "fixes": list(self.fixes), "config": asdict(self.config),
                "history": [asdict(r) for r in self.history]}


def prepare_model(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """The model Opacus can train: BatchNorm replaced as Opacus recommends (with a warning), else an error.

    Returns the (possibly new) model and the list of replacements made. Problems Opacus cannot fix are
    all listed in one :class:`DPTrainingError`.
    """
    from opacus.validators import ModuleValidator

    with quiet_opacus():
        errors = ModuleValidator.validate(model, strict=False)
        fixes: tuple[str, ...] = ()
        if errors:
            before = {name: type(m).__name__ for name, m in model.named_modules()}
            model = ModuleValidator.fix(model)
            after = {name: type(m).__name__ for name, m in model.named_modules()}
            fixes = tuple(f"{name or 'model'}: {before[name]} -> {after.get(name, '?')}"
                          for name in before if after.get(name) != before[name])
            remaining = ModuleValidator.validate(model, strict=False)
            if remaining:
                raise DPTrainingError("the model cannot be trained with DP-SGD: "
                                      + "; ".join(str(e) for e in remaining))
    if fixes:
        warnings.warn("DP-SGD needs per-example gradients, which BatchNorm's batch statistics do not have; "
                      "replaced as Opacus recommends (ModuleValidator.fix): " + ", ".join(fixes),
                      stacklevel=2)
    return model, fixes


def train_dp(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], *, config: DPSGDConfig,
             test: tuple[torch.Tensor, torch.Tensor] | None = None, frontend: nn.Module | None = None,
             device: str | torch.device | None = None, progress: bool = True,
             checkpoint: str | Path | None = None, on_epoch: Callable[[EpochRecord], None] | None = None,
             prior_privacy: list[tuple[float, float, int]] | None = None, views: bool = False) -> DPTrainResult:
    """Train ``model`` on ``train = (x, y)`` with DP-SGD under ``config``; the result carries (epsilon, delta).

    ``frontend``: a fixed, data-independent feature extractor applied once to every record (no
    trainable parameters are trained; no privacy cost); the returned model is ``frontend`` then
    ``model``. ``checkpoint``: a file written atomically after every epoch; a run started with the
    same file and settings resumes from it (the accountant's history included). ``prior_privacy``:
    accountant history already spent on the same records (e.g. :mod:`veil.dp.standardize`); it is
    composed into every reported epsilon, and the calibration leaves room for it. ``views``: the
    training inputs are ``(N, K, ...)``, ``K`` augmented views of each record (augmentation
    multiplicity, :mod:`veil.dp.views`): each record's gradient is averaged over its views and clipped
    once; test inputs and the returned model take one view.
    """
    from veil.dp.opacus_step import DPStepper

    x, y = _check_data(train, "train")
    if test is not None:
        test = _check_data(test, "test")
    device = torch.device(device) if device is not None else _model_device(model)
    started = time.perf_counter()
    model, fixes = prepare_model(model)
    front = nn.Sequential()
    if views:
        from veil.dp.views import apply_fixed, split_for_views

        if x.ndim < 3:
            raise DPTrainingError(f"views: training inputs must be (N, K, ...) views of each record, got shape "
                                  f"{tuple(x.shape)}")
        if test is not None and test[0].shape[1:] != x.shape[2:]:
            raise DPTrainingError(f"views: a test record has shape {tuple(test[0].shape[1:])}, a training view "
                                  f"{tuple(x.shape[2:])}; they must match")
        front, model = split_for_views(model)
        fixed = nn.Sequential(*([frontend] if frontend is not None else []), *front)
        x = apply_fixed(fixed, x, views=True, device=device, progress=progress, what="train views")
        if test is not None:
            test = (apply_fixed(fixed, test[0], views=False, device=device, progress=progress,
                                what="test records"), test[1])
    elif frontend is not None:
        frontend = frontend.to(device).eval()
        x = features(frontend, x, device=device, progress=progress, what="train features")
        if test is not None:
            test = (features(frontend, test[0], device=device, progress=progress, what="test features"), test[1])
    model = model.to(device)
    n = len(x)
    sample_rate = min(1.0, config.batch_size / n)
    steps_per_epoch = max(1, round(1 / sample_rate))
    sigma = config.noise_multiplier
    if sigma is None:
        assert config.target_epsilon is not None
        sigma = calibrate_noise(target_epsilon=config.target_epsilon, delta=config.delta, sample_rate=sample_rate,
                                steps=steps_per_epoch * config.epochs, accountant=config.accountant,
                                prior=prior_privacy)
    stepper = DPStepper(model, config=config, noise_multiplier=sigma, sample_rate=sample_rate, records=n,
                        prior=prior_privacy or [])
    history: list[EpochRecord] = []
    start_epoch = 0
    if checkpoint is not None and Path(checkpoint).exists():
        start_epoch, history = stepper.load_checkpoint(checkpoint, config=config)
    log = logging.getLogger("veil.dp")
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        with quiet_opacus():
            loss = stepper.run_epoch(x, y, steps=steps_per_epoch, device=device, progress=progress,
                                     desc=f"DP-SGD epoch {epoch + 1}/{config.epochs}")
        eps_prv = spent_epsilon(stepper.history, config.delta, "prv")
        eps_rdp = spent_epsilon(stepper.history, config.delta, "rdp")
        acc = evaluate(stepper.eval_model(), *test) if test is not None else None
        record = EpochRecord(epoch=epoch + 1, steps=stepper.steps, loss=loss,
                             epsilon=eps_prv if config.accountant == "prv" else eps_rdp,
                             epsilon_prv=eps_prv, epsilon_rdp=eps_rdp, test_accuracy=acc,
                             seconds=time.perf_counter() - t0)
        history.append(record)
        message = (f"epoch {record.epoch}: loss {loss:.4f}, epsilon {record.epsilon:.3f} "
                   f"(prv {eps_prv:.3f}, rdp {eps_rdp:.3f}) at delta {config.delta:g}"
                   + (f", test accuracy {acc:.4f}" if acc is not None else ""))
        log.info(message)
        if progress:
            from tqdm import tqdm

            tqdm.write(message)
        if checkpoint is not None:
            stepper.save_checkpoint(checkpoint, epoch=epoch + 1, history=history)
        if on_epoch is not None:
            on_epoch(record)
    trained = copy.deepcopy(stepper.eval_model()).cpu().eval()
    if views:  # the model as given (same layers, same state_dict keys): one view in, logits out
        trained = nn.Sequential(*copy.deepcopy(list(front)), *trained).cpu().eval()
    if frontend is not None:
        trained = nn.Sequential(copy.deepcopy(frontend).cpu(), trained)
    epsilon = history[-1].epsilon if history else 0.0
    return DPTrainResult(model=trained, epsilon=epsilon, delta=config.delta, noise_multiplier=sigma,
                         sample_rate=sample_rate, steps=stepper.steps, config=config, history=tuple(history),
                         fixes=fixes, seconds=time.perf_counter() - started, records=n,
                         privacy_extra={"prior_spending": [list(h) for h in prior_privacy]} if prior_privacy else {})


def features(frontend: nn.Module, x: torch.Tensor, *, device: torch.device | str = "cpu",
             batch_size: int = 2000, progress: bool = False, what: str = "features") -> torch.Tensor:
    """``frontend(x)`` in batches, without gradients, on ``device``; returned on the CPU."""
    from veil.dp.views import apply_fixed

    if len(x) == 0:
        return x.new_zeros((0,))
    return apply_fixed(frontend, x, views=False, device=device, batch_size=batch_size, progress=progress, what=what)


def save_dp_model(path: str | Path, result: DPTrainResult, *, arch: str | None = None) -> Path:
    """Write the model's weights with its privacy guarantee and history, atomically (torch format)."""
    payload = {"format": MODEL_FORMAT, "arch": arch, "state_dict": result.model.state_dict(),
               "privacy": result.privacy(), "summary": result.to_dict()}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_writer(path) as f:
        f.write(buffer.getvalue())
    return Path(path)


def load_dp_model(path: str | Path, model: nn.Module | None = None) -> dict[str, Any]:
    """Read a file of :func:`save_dp_model`; load its weights into ``model`` if given; return the payload."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise DPTrainingError(f"{path}: not a readable DP model file ({torch_load_problem(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise DPTrainingError(f"{path}: not a Veil DP model file (format {MODEL_FORMAT} expected)")
    if model is not None:
        model.load_state_dict(payload["state_dict"])
    return payload


def _check_data(data: tuple[torch.Tensor, torch.Tensor], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        x, y = data
    except (TypeError, ValueError):
        raise DPTrainingError(f"{what} data must be a pair (x, y) of tensors") from None
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise DPTrainingError(f"{what} data must be a pair (x, y) of tensors, got {type(x).__name__}, "
                              f"{type(y).__name__}")
    if len(x) == 0:
        raise DPTrainingError(f"{what} data is empty")
    if len(x) != len(y):
        raise DPTrainingError(f"{what} data: {len(x)} inputs but {len(y)} labels")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise DPTrainingError(f"{what} data contains NaN or infinite values")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise DPTrainingError(f"{what} labels must be class indices (integers), got {y.dtype}")
    if int(y.min()) < 0:
        raise DPTrainingError(f"{what} labels must be >= 0, found {int(y.min())}")
    return x, y


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
