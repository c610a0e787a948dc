"""Augmentation multiplicity for DP-SGD: several augmented views of a record, one clipped gradient.

Data augmentation cannot be used in DP-SGD the usual way: an augmented copy of a record is the same
person's data, so adding copies to the training set would let one record contribute several clipped
gradients and break the accounting. De et al. 2022 ("Unlocking high-accuracy differentially private
image classification through scale") average the gradient over ``K`` views of each record *before*
clipping: the record's loss is the mean of its views' losses, its gradient is clipped once, and the
privacy unit stays the record. The accountant is unchanged; the gradient each record gives is a
better estimate of what generalises, which is what DP-SGD's small signal needs.

Here training data is ``(N, K, *record_shape)`` (``K`` views of each of ``N`` records, for instance
shifted images, see :func:`shifted_views`). :func:`split_for_views` cuts the model before its first
module with parameters: the fixed front (a frontend, per-record normalisation, flattening) is applied
once to every view, and the trained rest sees ``(N, K, features)``. It must start with an
``nn.Linear``, which accepts the extra view axis, and for which Opacus's per-example gradients and
ghost norms sum over it: one gradient per record. The loss is :class:`ViewCrossEntropy`. Test data
is plain ``(N, *record_shape)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from veil.dp.sgd_accounting import DPTrainingError

SHIFTS_4 = ((1, 0), (-1, 0), (0, 1), (0, -1))
SHIFTS_8 = (*SHIFTS_4, (1, 1), (1, -1), (-1, 1), (-1, -1))


def shifts_for(count: int) -> tuple[tuple[int, int], ...]:
    """The one-pixel shifts of ``count`` (4: up, down, left, right; 8: and the diagonals) copies."""
    if count not in (4, 8):
        raise ValueError(f"shifted views: 4 or 8 copies, got {count}")
    return SHIFTS_4 if count == 4 else SHIFTS_8


class ViewCrossEntropy(nn.Module):
    """Cross-entropy of ``(batch, classes)`` logits, or of ``(batch, views, classes)`` logits averaged
    over the views: one loss per record either way (``reduction``: ``mean``, ``sum`` or ``none``, which
    Opacus's ghost clipping sets while it computes per-record losses)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim == 3:
            b, k, c = logits.shape
            per_record = F.cross_entropy(logits.reshape(b * k, c), target.repeat_interleave(k),
                                         reduction="none").view(b, k).mean(1)
        else:
            per_record = F.cross_entropy(logits, target, reduction="none")
        if self.reduction == "none":
            return per_record
        return per_record.sum() if self.reduction == "sum" else per_record.mean()


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def split_for_views(model: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
    """``(fixed, trained)``: the leading modules of ``model`` (an ``nn.Sequential``) without parameters,
    and the rest, which must start with an ``nn.Linear``.

    The fixed part (per-record normalisation, flattening) is applied once to every view before
    training; the trained part then sees ``(N, K, features)``, and Opacus computes one gradient per
    record over the view axis. Dropout in the fixed part is refused: it is not a fixed function.
    """
    if not isinstance(model, nn.Sequential):
        raise DPTrainingError(f"augmentation multiplicity needs an nn.Sequential model, got {type(model).__name__}")
    layers = list(model)
    split = next((i for i, m in enumerate(layers) if _has_parameters(m)), len(layers))
    if split == len(layers) or not isinstance(layers[split], nn.Linear):
        what = type(layers[split]).__name__ if split < len(layers) else "no layer with parameters"
        raise DPTrainingError("augmentation multiplicity needs the model's first layer with parameters to be "
                              f"nn.Linear (one gradient per record over a view axis); found {what}")
    for m in layers[:split]:
        if any(isinstance(sub, nn.modules.dropout._DropoutNd) for sub in m.modules()):
            raise DPTrainingError(f"augmentation multiplicity applies the layers before the first nn.Linear once "
                                  f"to the data; {type(m).__name__} holds dropout, which is not a fixed function")
    return nn.Sequential(*layers[:split]), nn.Sequential(*layers[split:])


def apply_fixed(fixed: nn.Module, x: torch.Tensor, *, views: bool, device: torch.device | str = "cpu",
                batch_size: int = 2000, progress: bool = False, what: str = "fixed layers",
                overwrite: bool = False) -> torch.Tensor:
    """``fixed`` applied to every record (``views=False``: ``x`` is ``(N, ...)``) or every view (``(N, K,
    ...)``, returned as ``(N, K, ...)``), in batches, without gradients, into one preallocated tensor on
    the CPU. ``overwrite``: when each output has as many elements as its input (normalisation,
    flattening) and ``x`` is a contiguous CPU tensor, write over ``x`` instead (``x`` is then lost):
    half the memory for gigabytes of views."""
    from tqdm import tqdm

    if isinstance(fixed, nn.Sequential) and len(fixed) == 0:
        return x  # nothing to apply: no copy of what may be gigabytes
    fixed = fixed.to(device).eval()
    n = x.shape[0]
    flat = x.flatten(0, 1) if views else x
    out: torch.Tensor | None = None
    with torch.no_grad():
        for i in tqdm(range(0, flat.shape[0], batch_size), desc=what, disable=not progress, leave=False):
            part = fixed(flat[i:i + batch_size].to(device)).cpu()
            if out is None:
                same = (part[0].numel() == flat[0].numel() and part.dtype == flat.dtype
                        and flat.device.type == "cpu" and flat.is_contiguous())
                out = (flat.view(flat.shape[0], *part.shape[1:]) if overwrite and same
                       else part.new_empty((flat.shape[0], *part.shape[1:])))
            out[i:i + part.shape[0]] = part
    assert out is not None
    return out.reshape(n, x.shape[1], *out.shape[1:]) if views else out


def shifted_views(images: torch.Tensor, shifts: Sequence[tuple[int, int]] = SHIFTS_4, *,
                  transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``(N, 1 + len(shifts), ...)``: each image as given, then translated by each ``(dy, dx)`` pixels
    (zeros shifted in), each view through ``transform`` (e.g. the scattering features) if given.
    Translations are applied to each image alone, so the views cost no privacy."""
    if images.ndim < 3:
        raise ValueError(f"shifted_views expects images (N, ..., H, W), got shape {tuple(images.shape)}")
    out: torch.Tensor | None = None
    for i, (dy, dx) in enumerate(((0, 0), *shifts)):
        view = _shift(images, dy, dx)
        view = transform(view) if transform is not None else view
        if out is None:  # filled view by view: no second copy of all views (they can be gigabytes)
            out = view.new_empty((view.shape[0], 1 + len(shifts), *view.shape[1:]))
        out[:, i] = view
    assert out is not None
    return out


def _shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    if dy == 0 and dx == 0:
        return images
    out = torch.zeros_like(images)
    h, w = images.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        return out
    src_y, dst_y = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    src_x, dst_x = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., dst_y, dst_x] = images[..., src_y, src_x]
    return out
