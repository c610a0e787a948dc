"""Losses on shares, with PyTorch's names and call shapes: ``loss = loss_fn(output, target)``,
``loss.backward()``, and the value only if someone asks: ``loss.reveal(to="alice")``.

``output`` is the (secret) output of a training forward of a :class:`~veil.nn.model.SecureModel`;
``target`` a SecretTensor of the same shape (one-hot rows for classification) or a public tensor
(class indices or values). Reduction is the mean, as PyTorch's default: the backward pass runs on
the gradient of the sum (below) and the parameters' gradients are scaled by ``1/n`` at the end (``n``
the batch size, or the number of elements for MSE and BCE), which keeps more significant bits.

================================  =================================================  ==============
loss                              gradient started where                             value (reveal)
================================  =================================================  ==============
MSELoss(y, t)                     ``2 (y - t)`` at the output                        1 round + reveal
CrossEntropyLoss(logits, t)       ``softmax(logits) - t`` at the logits              log on shares
BCELoss(p, t), p from a Sigmoid   ``p - t`` at the Sigmoid's *input* (the fused,     log on shares
                                  stable form of PyTorch's BCE-with-logits)
BCEWithLogitsLoss(z, t)           ``sigmoid(z) - t`` at the logits                   log on shares
NLLLoss(logp, t), logp from a     ``exp(logp) - t`` at the LogSoftmax's input        a product
LogSoftmax
================================  =================================================  ==============

The values need a logarithm on shares (Householder iterations, ~45 rounds): ask for them every few
batches, not every batch. Probabilities are clamped to [1e-2, 1 - 1e-2] inside the logarithm (its
stated domain): a value of BCE or cross-entropy above ``ln(100) = 4.6`` per example is reported as 4.6.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from veil.mpc.tensor import SecretTensor
from veil.nn.autodiff import Tape, backward
from veil.nn.ops import mul

LOG_FLOOR = 1e-2


class LossError(ValueError):
    """A loss applied to what it cannot take (shapes, a plaintext output, a missing training forward)."""


def _tape(output: Any, what: str) -> Tape:
    if not isinstance(output, SecretTensor):
        raise LossError(f"{what} needs the secret output of a secure model's training forward, got "
                        f"{type(output).__name__}")
    tape = output.grad_fn
    if not isinstance(tape, Tape):
        raise LossError(f"{what}: this output has no tape; call model.train() before the forward pass")
    return tape


def _target(target: Any, like: SecretTensor, what: str, classes: bool) -> Any:
    """The target as a secret or public tensor shaped like the output (class indices -> one-hot)."""
    if isinstance(target, SecretTensor):
        if tuple(target.shape) != tuple(like.shape):
            raise LossError(f"{what}: target shape {tuple(target.shape)} != output shape {tuple(like.shape)}"
                            + (" (share targets as one-hot rows)" if classes else ""))
        return target
    t = torch.as_tensor(target)
    if classes and not t.dtype.is_floating_point:
        if t.shape != like.shape[:1] or int(t.min()) < 0 or int(t.max()) >= like.shape[1]:
            raise LossError(f"{what}: class indices of shape {tuple(t.shape)} in [0, {like.shape[1]}) expected")
        return torch.nn.functional.one_hot(t, like.shape[1]).to(torch.float64)
    if tuple(t.shape) != tuple(like.shape):
        raise LossError(f"{what}: target shape {tuple(t.shape)} != output shape {tuple(like.shape)}")
    return t.to(torch.float64)


@dataclass
class Loss:
    """A loss evaluated on shares: its gradient flows with :meth:`backward`; its value is revealed only
    by :meth:`reveal`."""

    tape: Tape
    start: str  # the node whose value's gradient is ``grad``
    grad: SecretTensor  # the gradient of the *summed* loss (n times the mean's: more significant bits)
    value_fn: Any  # () -> SecretTensor of shape ()
    scale: float = 1.0  # the mean's factor 1/n, applied to the parameters' gradients at the end

    def backward(self) -> None:
        """Accumulate the gradient of every parameter of the model into ``param.grad``.

        The backward pass runs on the gradient of the summed loss and scales the parameters'
        gradients by ``1/n`` at the end (a public factor: local): in 16-bit fixed point the mean's
        per-example gradient ``(p - t)/64`` sits a few units above the resolution by the time it
        reaches a first convolution, the sum's does not."""
        grads = backward(self.tape, self.grad, start=self.start)
        if self.scale != 1.0:
            grads = {k: g * self.scale for k, g in grads.items()}
        self.tape.model.accumulate_grads(grads)

    def value(self) -> SecretTensor:
        """The loss as a secret scalar (costs a logarithm for the log-likelihood losses)."""
        return self.value_fn()

    def reveal(self, *, to: str | Sequence[str]) -> float | None:
        """Open the loss value to the named parties (they get a float, the others None)."""
        v = self.value().reveal(to=to)
        return None if v is None else float(v)


def _n(y: SecretTensor, per_row: bool) -> int:
    return int(y.shape[0]) if per_row else y.numel()


def _log(p: SecretTensor) -> SecretTensor:
    return p.clamp(LOG_FLOOR, 1 - LOG_FLOOR).log()


class MSELoss:
    def __call__(self, output: SecretTensor, target: Any) -> Loss:
        tape = _tape(output, "MSELoss")
        t = _target(target, output, "MSELoss", classes=False)
        diff = output - t
        n = output.numel()
        return Loss(tape, tape.output, diff * 2, lambda: diff.square().sum() * (1.0 / n), 1.0 / n)


class CrossEntropyLoss:
    """Cross-entropy of logits ``(N, C)`` against one-hot (or soft) targets or class indices."""

    def __call__(self, logits: SecretTensor, target: Any) -> Loss:
        tape = _tape(logits, "CrossEntropyLoss")
        if logits.dim() != 2:
            raise LossError(f"CrossEntropyLoss takes logits of shape (N, C), got {tuple(logits.shape)}")
        t = _target(target, logits, "CrossEntropyLoss", classes=True)
        p = logits.softmax(1)
        n = _n(logits, True)
        return Loss(tape, tape.output, p - t, lambda: -mul(t, _log(p)).sum() * (1.0 / n), 1.0 / n)


class NLLLoss:
    """Negative log-likelihood of a model ending in ``LogSoftmax(dim=1)``."""

    def __call__(self, log_probs: SecretTensor, target: Any) -> Loss:
        tape = _tape(log_probs, "NLLLoss")
        node = tape.model.graph.node(tape.output)
        if node.op != "log_softmax" or not hasattr(node.args[0], "name"):
            raise LossError("NLLLoss needs a model whose last layer is LogSoftmax (or use CrossEntropyLoss)")
        t = _target(target, log_probs, "NLLLoss", classes=True)
        n = _n(log_probs, True)
        p = log_probs.exp(upper=0.0) if isinstance(log_probs, SecretTensor) else log_probs.exp()
        return Loss(tape, node.args[0].name, p - t, lambda: -mul(t, log_probs).sum() * (1.0 / n), 1.0 / n)


class BCELoss:
    """Binary cross-entropy of probabilities from a final Sigmoid; the gradient starts at the
    Sigmoid's input (``(p - t) / n``), as in PyTorch's numerically stable BCE-with-logits."""

    def __call__(self, probs: SecretTensor, target: Any) -> Loss:
        tape = _tape(probs, "BCELoss")
        node = tape.model.graph.node(tape.output)
        if node.op != "sigmoid" or not hasattr(node.args[0], "name"):
            raise LossError("BCELoss on shares needs a model whose last layer is Sigmoid (or use "
                            "BCEWithLogitsLoss on the logits)")
        t = _target(target, probs, "BCELoss", classes=False)
        n = probs.numel()
        return Loss(tape, node.args[0].name, probs - t, lambda: _bce(probs, t, n), 1.0 / n)


class BCEWithLogitsLoss:
    def __call__(self, logits: SecretTensor, target: Any) -> Loss:
        tape = _tape(logits, "BCEWithLogitsLoss")
        t = _target(target, logits, "BCEWithLogitsLoss", classes=False)
        p = logits.sigmoid()
        n = logits.numel()
        return Loss(tape, tape.output, p - t, lambda: _bce(p, t, n), 1.0 / n)


def _bce(p: SecretTensor, t: Any, n: int) -> SecretTensor:
    """``-mean(t log p + (1 - t) log(1 - p))``, both logarithms in one call (one set of rounds)."""
    from veil.mpc.tensor import stack

    logs = _log(stack([p, 1 - p]))
    return -(mul(t, logs[0]) + mul(1 - t, logs[1])).sum() * (1.0 / n)
