"""The decoy pipeline around a trained translator: the remote side's data set, its training job, and
the owner's composed classifier ``classify(x) = unpermute(remote(translate(x)))``.

What crosses to the remote side is :func:`write_decoys`'s ``.npz``: decoy images and *decoy*
labels (``x_train``, ``y_train``, and optionally ``x_test``, ``y_test``), nothing else: no
original image, no secret label, no permutation, no translator. The remote side trains any
classifier on it (:func:`train_remote`, a plain PyTorch job; or through Veil's parties, since the
file is an ordinary labelled data set). The owner composes the trained remote model with its own
translator and permutation (:class:`ComposedClassifier`) to answer the original question.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.files import torch_load_problem
from veil.randomness import torch_generator
from veil.semantic.permutation import ClassPermutation
from veil.semantic.translator import SemanticError, Translator, check_images, train_classifier

DECOY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def write_decoys(translator: Translator, x: torch.Tensor, path: str | Path, *, y: torch.Tensor | None = None,
                 x_test: torch.Tensor | None = None, y_test: torch.Tensor | None = None,
                 balance: bool = True) -> dict[str, Any]:
    """Translate the owner's images and write the remote side's ``.npz`` atomically; the rows are
    shuffled (an OS-seeded order), so the file's order says nothing about the owner's.

    Decoy labels are the translator's own reading (``pi(argmax f(x))``), so no secret label is
    needed; with ``y`` (the secret labels), decoys of images the local classifier misreads are
    drawn for their true decoy class instead, and the file holds ``pi(y)``. ``balance`` keeps the
    same number of images of every decoy class (the smallest class's count): class frequencies
    would otherwise give the permutation away to anyone who knows the secret classes' frequencies
    (:func:`veil.audit.semantic.frequency_attack`). Returns counts (not written to the file)."""
    from veil.files import atomic_writer

    arrays: dict[str, np.ndarray] = {}
    stats: dict[str, Any] = {}
    gen = torch_generator("cpu")
    for name, images, labels in (("train", x, y), ("test", x_test, y_test)):
        if images is None:
            continue
        images = check_images(images, f"{name} images", translator.image_shape)
        decoys, decoy_labels = _decoys(translator, images, labels)
        keep = torch.randperm(len(decoys), generator=gen)
        if balance and len(decoys):
            counts = torch.bincount(decoy_labels, minlength=translator.permutation.num_classes)
            least = int(counts.min())
            if least == 0:
                raise SemanticError(f"{name}: no image of some decoy class, cannot balance (pass balance=False)")
            shuffled = decoy_labels[keep]
            rank = torch.zeros_like(shuffled)
            for c in range(len(counts)):
                where = shuffled == c
                rank[where] = torch.arange(int(where.sum()))
            keep = keep[rank < least]
        decoys, decoy_labels = decoys[keep], decoy_labels[keep]
        arrays[f"x_{name}"] = (decoys.numpy() * 255).round().astype(np.uint8)
        arrays[f"y_{name}"] = decoy_labels.numpy().astype(np.int64)
        stats[name] = len(decoys)
    with atomic_writer(path) as f:
        np.savez_compressed(f, **arrays)
    return stats


@torch.no_grad()
def _decoys(translator: Translator, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    translator.eval()
    device = translator.mapping.device
    out, labels = [], []
    for i in range(0, len(x), 500):
        xb = x[i:i + 500].to(device)
        if y is None:
            decoy = translator.decoy_classes(xb)
        else:
            yb = torch.as_tensor(y[i:i + 500]).long()
            if len(yb) != len(xb):
                raise SemanticError(f"{len(x)} images but {len(y)} labels")
            decoy = translator.permutation.to_decoy(yb).to(device)
        out.append(translator.draw(xb, decoy).cpu())
        labels.append(decoy.cpu())
    if not out:
        return x.clone(), torch.zeros(0, dtype=torch.long)
    return torch.cat(out), torch.cat(labels)


def load_decoys(path: str | Path) -> dict[str, torch.Tensor]:
    """The remote side's view: decoy images in [0, 1] and decoy labels."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if not {"x_train", "y_train"} <= set(f.files):
                raise SemanticError(f"{path}: a decoy set needs x_train and y_train, it has {sorted(f.files)}")
            extra = sorted(set(f.files) - set(DECOY_KEYS))
            if extra:
                raise SemanticError(f"{path}: unexpected arrays {extra} in a decoy set")
            out = {k: torch.from_numpy(np.ascontiguousarray(f[k])) for k in f.files}
    except (OSError, ValueError) as e:
        if isinstance(e, SemanticError):
            raise
        raise SemanticError(f"{path}: not a readable decoy set ({e})") from None
    for split in ("train", "test"):
        if f"x_{split}" in out:
            x = out[f"x_{split}"]
            out[f"x_{split}"] = check_images(x.float() / 255 if x.dtype == torch.uint8 else x, f"{path} x_{split}")
            out[f"y_{split}"] = out[f"y_{split}"].long()
            if len(out[f"y_{split}"]) != len(out[f"x_{split}"]):
                raise SemanticError(f"{path}: {len(out[f'x_{split}'])} {split} images, {len(out[f'y_{split}'])} labels")
    return out


def _build(arch: str, inputs: int) -> nn.Module:
    from veil.nn.infer import resolve_architecture
    from veil.nn.zoo import MLP

    return MLP(inputs=inputs) if arch.lower() == "mlp" else resolve_architecture(arch)


class Standardize(nn.Module):
    """``model((x - mean) / std)``, flattened first if ``flatten``; ``arch`` names the model's
    architecture for :func:`save_remote`."""

    def __init__(self, model: nn.Module, mean: float, std: float, arch: str | None = None,
                 flatten: bool = False) -> None:
        super().__init__()
        self.model, self.mean, self.std, self.arch, self.flatten = model, mean, std, arch, flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.model(x.flatten(1) if self.flatten else x)


def train_remote(x: torch.Tensor, y: torch.Tensor, *, arch: str | nn.Module = "lenet", epochs: int = 2,
                 batch_size: int = 128, lr: float = 3e-3, progress: bool = True,
                 device: torch.device | str = "cpu") -> nn.Module:
    """The remote side's job: a classifier of decoy images (a module, or a model of
    :mod:`veil.nn.zoo` / ``package.module:factory`` by name; ``mlp`` is sized to the images), inputs
    standardised with the decoy set's own statistics."""
    x = check_images(x, "decoy images")
    y = torch.as_tensor(y).long()
    if len(y) != len(x):
        raise SemanticError(f"{len(x)} decoy images but {len(y)} labels")
    named = isinstance(arch, str)
    net = _build(arch, x[0].numel()) if named else arch
    model = Standardize(net, float(x.mean()), float(x.std()) or 1.0, arch if named else None,
                        flatten=named and arch.lower() == "mlp")
    return train_classifier(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, progress=progress,
                            device=device)


class ComposedClassifier(nn.Module):
    """``classify(x) = unpermute(remote(translate(x)))``: the owner's answer to the original question.

    ``forward`` returns logits over the *secret* classes (the remote logits, reordered by the
    inverse permutation), so ``argmax`` gives the secret class."""

    def __init__(self, translator: Translator, remote: nn.Module) -> None:
        super().__init__()
        self.translator, self.remote = translator, remote
        inv = translator.permutation.mapping  # logits of secret class s are the remote's of decoy pi(s)
        self.register_buffer("gather", torch.tensor(inv, dtype=torch.long))

    @property
    def permutation(self) -> ClassPermutation:
        return self.translator.permutation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decoys = self.translator.draw(x, self.translator.decoy_classes(x))
        return self.remote(decoys)[:, self.gather]

    @torch.no_grad()
    def classify(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        x = check_images(x, "images to classify", self.translator.image_shape)
        self.eval()
        device = self.gather.device
        return torch.cat([self(b.to(device)).argmax(1).cpu() for b in x.split(batch_size)])


# ---- files ------------------------------------------------------------------------------------------
REMOTE_MAGIC = "veil-decoy-model"
COMPOSED_MAGIC = "veil-composed-classifier"


def _remote_blob(model: nn.Module) -> dict[str, Any]:
    if not isinstance(model, Standardize) or not model.arch:
        raise SemanticError("only a model from train_remote(arch=NAME) can be saved (its architecture by name)")
    return {"magic": REMOTE_MAGIC, "arch": model.arch, "mean": model.mean, "std": model.std,
            "flatten": bool(model.flatten), "inputs": _inputs(model.model.state_dict()),
            "state": model.model.state_dict()}


def _inputs(state: dict[str, Any]) -> int:
    """Input width of a model whose first weight is a linear layer's (0 otherwise)."""
    first = next(iter(state.values()), None)
    return int(first.shape[1]) if isinstance(first, torch.Tensor) and first.dim() == 2 else 0


def _remote_from_blob(blob: Any, path: str | Path) -> nn.Module:
    if not isinstance(blob, dict) or blob.get("magic") != REMOTE_MAGIC:
        raise SemanticError(f"{path}: not a Veil decoy-classifier file")
    try:
        net = _build(str(blob["arch"]), int(blob["inputs"]))
        net.load_state_dict(blob["state"])
        return Standardize(net, float(blob["mean"]), float(blob["std"]), str(blob["arch"]),
                           bool(blob.get("flatten", False))).eval()
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise SemanticError(f"{path}: damaged decoy-classifier file ({e})") from None


def _read(path: str | Path, what: str) -> Any:
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SemanticError(f"{path}: no such file") from None
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise SemanticError(f"{path}: not a readable {what} ({torch_load_problem(e)})") from None


def save_remote(model: nn.Module, path: str | Path) -> Path:
    """The remote side's trained decoy classifier (architecture name, standardisation, weights)."""
    from veil.files import atomic_writer

    blob = _remote_blob(model)
    with atomic_writer(path) as f:
        torch.save(blob, f)
    return Path(path)


def load_remote(path: str | Path, *, arch: str | None = None, flatten: bool = False) -> nn.Module:
    """The remote side's model: a :func:`save_remote` file, or with ``arch`` a plain state dict (as
    ``veil train --out`` writes after training on the decoys through Veil's parties; its inputs are
    the decoy pixels in [0, 1], flattened if ``flatten``)."""
    blob = _read(path, "decoy-classifier file")
    if arch is None:
        return _remote_from_blob(blob, path)
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise SemanticError(f"{path}: not a state dict of weights (--remote-arch expects what veil train saves)")
    return _remote_from_blob({"magic": REMOTE_MAGIC, "arch": arch, "mean": 0.0, "std": 1.0, "flatten": flatten,
                              "inputs": _inputs(blob), "state": blob}, path)


def save_composed(model: ComposedClassifier, path: str | Path) -> Path:
    """Translator and remote model in one file: the owner's classifier of the secret classes. It holds
    the permutation, so it is written with mode 0600."""
    from veil.files import atomic_writer
    from veil.semantic.translator import translator_blob

    blob = {"magic": COMPOSED_MAGIC, "translator": translator_blob(model.translator),
            "remote": _remote_blob(model.remote)}
    with atomic_writer(path, mode=0o600) as f:
        torch.save(blob, f)
    return Path(path)


def load_composed(path: str | Path) -> ComposedClassifier:
    from veil.semantic.translator import translator_from_blob

    blob = _read(path, "composed classifier")
    if not isinstance(blob, dict) or blob.get("magic") != COMPOSED_MAGIC:
        raise SemanticError(f"{path}: not a Veil composed-classifier file")
    return ComposedClassifier(translator_from_blob(blob.get("translator"), path),
                              _remote_from_blob(blob.get("remote"), path)).eval()


def save_grid(originals: torch.Tensor, decoys: torch.Tensor, labels: torch.Tensor, path: str | Path, *,
              per_class: int = 2, title: str = "original (top) and decoy (below)") -> Path:
    """A PNG of originals above their decoys, ``per_class`` pairs of each class in label order."""
    from veil.plotting import figure, save_png

    labels = torch.as_tensor(labels).long()
    picks = [int(i) for c in torch.unique(labels) for i in (labels == c).nonzero()[:per_class, 0]]
    if not picks:
        raise SemanticError("no images for the sample grid")
    fig = figure(max(4.0, 0.8 * len(picks)), 2.0)
    axes = fig.subplots(2, len(picks), squeeze=False)
    for col, i in enumerate(picks):
        for row, img in enumerate((originals[i], decoys[i])):
            ax = axes[row, col]
            ax.imshow(img.permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title)
    return save_png(fig, path)
