"""The DP-SGD step loop on Opacus's parts: Poisson batches, per-example clipping, noise, accountant history.

``DPStepper`` wires Opacus's per-example gradient module (``GradSampleModule``, or the ghost-clipping
``GradSampleModuleFastGradientClipping`` that computes per-example norms without per-example
gradients) to its ``DPOptimizer`` (clip, add N(0, sigma^2 C^2), divide by the expected batch size).
Batches are drawn here by Poisson sampling: every record joins independently with probability q,
so batch sizes vary and may be zero; an empty batch still takes a noise-only step, which is what
the accountant assumes. The accountant's input is kept as Opacus's history list of
(noise_multiplier, sample_rate, steps), so it can be checkpointed and replayed by either accountant.
"""

from __future__ import annotations

import copy
import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from veil.dp.sgd_accounting import DPTrainingError, quiet_opacus
from veil.dp.train import DPSGDConfig, EpochRecord
from veil.dp.views import ViewCrossEntropy
from veil.files import atomic_writer, torch_load_problem
from veil.randomness import torch_generator

CHECKPOINT_FORMAT = "veil-dp-checkpoint/1"


class DPStepper:
    """Opacus module + DP optimizer + Poisson sampler + accountant history for one model."""

    def __init__(self, model: nn.Module, *, config: DPSGDConfig, noise_multiplier: float, sample_rate: float,
                 records: int, prior: list[tuple[float, float, int]] | None = None) -> None:
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        self.config = config
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.records = records
        self.model = model
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.generator = torch_generator(device)
        self.sampler = torch_generator("cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise DPTrainingError("the model has no trainable parameters")
        if config.optimizer == "sgd":
            base: torch.optim.Optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
        else:
            base = torch.optim.Adam(params, lr=config.lr)
        self.base_optimizer = base
        expected = max(1, round(sample_rate * records))
        with quiet_opacus():
            if config.clipping == "ghost":
                self.module: nn.Module = GradSampleModuleFastGradientClipping(
                    model, batch_first=True, loss_reduction="mean", max_grad_norm=config.max_grad_norm,
                    use_ghost_clipping=True)
                self.optimizer: Any = DPOptimizerFastGradientClipping(
                    base, noise_multiplier=noise_multiplier, max_grad_norm=config.max_grad_norm,
                    expected_batch_size=expected, loss_reduction="mean", generator=self.generator)
                self.criterion: Any = DPLossFastGradientClipping(self.module, self.optimizer, ViewCrossEntropy(),
                                                                 loss_reduction="mean")
            else:
                self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
                self.optimizer = DPOptimizer(base, noise_multiplier=noise_multiplier,
                                             max_grad_norm=config.max_grad_norm, expected_batch_size=expected,
                                             loss_reduction="mean", generator=self.generator)
                self.criterion = ViewCrossEntropy()
        self.prior = [(float(a), float(b), int(c)) for a, b, c in (prior or [])]
        self.history: list[tuple[float, float, int]] = list(self.prior)
        self._batch_buffer: torch.Tensor | None = None
        self.ema: nn.Module | None = copy.deepcopy(model) if config.ema_decay is not None else None
        if self.ema is not None:
            for p in self.ema.parameters():
                p.requires_grad_(False)

    @property
    def steps(self) -> int:
        """DP-SGD steps taken (the prior spending is not counted)."""
        return sum(h[2] for h in self.history) - sum(h[2] for h in self.prior)

    def _record_step(self) -> None:
        if len(self.history) > len(self.prior) and self.history[-1][:2] == (self.noise_multiplier,
                                                                              self.sample_rate):
            sigma, q, k = self.history[-1]
            self.history[-1] = (sigma, q, k + 1)
        else:
            self.history.append((self.noise_multiplier, self.sample_rate, 1))

    def run_epoch(self, x: torch.Tensor, y: torch.Tensor, *, steps: int, device: torch.device,
                  progress: bool, desc: str) -> float:
        """``steps`` DP-SGD steps on Poisson batches of (x, y); the mean training loss."""
        from tqdm import tqdm

        self.module.train()
        total, count = 0.0, 0
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
        for _ in bar:
            mask = torch.rand(len(x), generator=self.sampler) < self.sample_rate
            idx = mask.nonzero().squeeze(1)
            xb, yb = self._gather(x, idx).to(device), y[idx].to(device)
            self.optimizer.zero_grad(set_to_none=True)
            if len(idx) == 0:
                self._noise_only_step()
            else:
                out = self.module(xb)
                if out.ndim not in (2, 3):
                    raise DPTrainingError(f"the model must output (batch, classes) logits, or (batch, views, "
                                          f"classes) with augmentation multiplicity; got shape {tuple(out.shape)}")
                if int(yb.max()) >= out.shape[-1]:
                    raise DPTrainingError(f"label {int(yb.max())} is out of range for a model with "
                                          f"{out.shape[-1]} outputs")
                loss = self.criterion(out, yb)
                loss.backward()
                self.optimizer.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            self._record_step()
            self._update_ema()
            if progress and count:
                bar.set_postfix(loss=f"{total / count:.4f}")
        return total / max(count, 1)

    def _gather(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``x[idx]`` into a buffer kept from step to step: a batch of large records (views of
        features) is hundreds of megabytes, and fresh pages every step cost more than the copy."""
        n = len(idx)
        buf = self._batch_buffer
        if buf is None or buf.shape[0] < n or buf.shape[1:] != x.shape[1:] or buf.dtype != x.dtype:
            buf = x.new_empty((n + n // 8 + 1, *x.shape[1:]))
            self._batch_buffer = buf
        return torch.index_select(x, 0, idx, out=buf[:n])

    def _noise_only_step(self) -> None:
        """An empty Poisson batch: the released gradient is the noise alone (as Opacus does)."""
        std = self.noise_multiplier * self.config.max_grad_norm
        expected = self.optimizer.expected_batch_size
        with torch.no_grad():
            for p in self.optimizer.params:
                p.grad = torch.normal(0.0, std, p.shape, device=p.device, generator=self.generator) / expected
        self.base_optimizer.step()

    def _update_ema(self) -> None:
        if self.ema is None or self.config.ema_decay is None:
            return
        t = self.steps  # warm-up as TensorFlow's ExponentialMovingAverage: early weights fade fast
        d = min(self.config.ema_decay, (1 + t) / (10 + t))
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.model.parameters()):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
            for be, b in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(b)

    def eval_model(self) -> nn.Module:
        """The model to evaluate and return: the weight average if enabled, else the trained weights."""
        return self.ema if self.ema is not None else self.model

    def save_checkpoint(self, path: str | Path, *, epoch: int, history: list[EpochRecord]) -> None:
        state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "config": asdict(self.config),
                 "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                 "records": self.records, "prior": [list(h) for h in self.prior], "model": self.model.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None,
                 "optimizer": self.base_optimizer.state_dict(),
                 "accountant": [list(h) for h in self.history], "history": [asdict(r) for r in history]}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with atomic_writer(path) as f:
            f.write(buffer.getvalue())

    def load_checkpoint(self, path: str | Path, *, config: DPSGDConfig) -> tuple[int, list[EpochRecord]]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DPTrainingError(f"checkpoint {path} is unreadable ({torch_load_problem(e)}); delete it to "
                                  "start over") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise DPTrainingError(f"{path} is not a Veil DP-SGD checkpoint")
        if (state["config"] != asdict(config) or state["records"] != self.records
                or [tuple(h) for h in state["prior"]] != self.prior):
            raise DPTrainingError(f"checkpoint {path} was written with other settings or data "
                                  f"({state['config']}, {state['records']} records); use another file "
                                  "or delete it to start over")
        self.noise_multiplier = float(state["noise_multiplier"])
        self.optimizer.noise_multiplier = self.noise_multiplier
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
        except RuntimeError as e:
            raise DPTrainingError(f"checkpoint {path} holds another model's weights ({str(e).splitlines()[0]}); "
                                  "use another file or delete it to start over") from None
        self.base_optimizer.load_state_dict(state["optimizer"])
        self.history = [(float(s), float(q), int(k)) for s, q, k in state["accountant"]]
        return int(state["epoch"]), [EpochRecord(**r) for r in state["history"]]
