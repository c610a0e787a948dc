"""What the remote side of the decoy pipeline (:mod:`veil.semantic`) can infer from what it holds.

The remote side holds decoy images and decoy labels. The secret is the permutation: which decoy class
stands for which secret class. Four measurements:

* **Frequency attack.** The adversary knows the class frequencies of the secret task (a public
  data set's, or the domain's), counts the decoy labels, and matches the two by rank. Its guess
  of each image's secret class is scored. Without labels it first clusters the decoy images
  (k-means on pixel principal components) and matches the cluster sizes instead: the **cluster
  attack**. Equal class counts in the decoy set (``write_decoys(balance=True)``) leave both
  attacks no signal beyond chance.
* **Realism.** The accuracy of a classifier trained on *real* images (one the owner's pipeline
  never saw) at reading the decoys as their decoy class.
* **Feature distance.** A Fréchet distance between that classifier's penultimate features of the
  decoys and of real images of the same classes, with the distance between two real samples as
  the yardstick: FID's recipe, on an MNIST-sized feature extractor.
* **Probe.** An adversary who learns the secret labels of ``n`` decoys trains a probe (logistic
  regression on pixels) to predict secret classes from decoys. Since decoy class and secret class
  are in one-to-one correspondence, a handful of labelled pairs gives the permutation away. The
  probe measures how fast that happens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.randomness import torch_generator


def rank_match(observed_counts: Sequence[float], prior: Sequence[float]) -> list[int]:
    """The frequency attack's guess: ``guess[observed] = secret``, pairing the i-th most frequent
    observed class (or cluster) with the i-th most probable secret class."""
    if len(observed_counts) != len(prior):
        raise ValueError(f"{len(observed_counts)} observed classes for a prior over {len(prior)}")
    obs = np.argsort(-np.asarray(observed_counts, dtype=float), kind="stable")
    sec = np.argsort(-np.asarray(prior, dtype=float), kind="stable")
    guess = [0] * len(prior)
    for o, s in zip(obs, sec):
        guess[int(o)] = int(s)
    return guess


def frequency_attack(observed: torch.Tensor, secret: torch.Tensor, prior: Sequence[float]) -> float:
    """Accuracy of guessing each item's secret class from the rank of its observed class's count."""
    k = len(prior)
    counts = torch.bincount(observed.long(), minlength=k)[:k].tolist()
    guess = torch.tensor(rank_match(counts, prior))
    return float((guess[observed.long()] == secret.long()).float().mean())


def pca(x: torch.Tensor, dims: int) -> torch.Tensor:
    flat = x.reshape(len(x), -1).double()
    flat = flat - flat.mean(0)
    _, _, v = torch.linalg.svd(flat[: min(len(flat), 5000)], full_matrices=False)
    return (flat @ v[:dims].T).float()


def kmeans(points: torch.Tensor, k: int, *, iterations: int = 50, restarts: int = 3) -> torch.Tensor:
    """Cluster ids (k-means++ seeding, Lloyd's iterations, the best of ``restarts``)."""
    if len(points) < k:
        raise ValueError(f"{len(points)} points for {k} clusters")
    gen = torch_generator("cpu")
    best, best_cost = None, math.inf
    for _ in range(restarts):
        centers = points[torch.randint(len(points), (1,), generator=gen)]
        for _ in range(1, k):
            d = torch.cdist(points, centers).min(1).values ** 2
            centers = torch.cat([centers, points[torch.multinomial(d / d.sum(), 1, generator=gen)]])
        for _ in range(iterations):
            ids = torch.cdist(points, centers).argmin(1)
            new = torch.stack([points[ids == c].mean(0) if (ids == c).any() else centers[c] for c in range(k)])
            if torch.allclose(new, centers):
                break
            centers = new
        ids = torch.cdist(points, centers).argmin(1)
        cost = float(((points - centers[ids]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = ids, cost
    assert best is not None
    return best


def cluster_attack(decoys: torch.Tensor, secret: torch.Tensor, prior: Sequence[float], *, dims: int = 40) -> float:
    """The frequency attack without labels: k-means clusters of the decoys stand for classes."""
    ids = kmeans(pca(decoys, dims), len(prior))
    return frequency_attack(ids, secret, prior)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of two feature samples."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    mu = a64.mean(0) - b64.mean(0)
    sa, sb = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    # tr((S_a S_b)^(1/2)) = sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2),
    # a symmetric PSD matrix: stable where S_a S_b is singular
    w, v = np.linalg.eigh(sa)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    roots = np.sqrt(np.clip(np.linalg.eigvalsh(half @ sb @ half), 0, None))
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * roots.sum())


@torch.no_grad()
def penultimate(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Inputs of a model's last ``nn.Linear`` (its penultimate features)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    feats: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach().cpu()))
    try:
        model.eval()
        for xb in x.split(batch_size):
            model(xb)
    finally:
        hook.remove()
    return torch.cat(feats)


def probe_attack(decoys: torch.Tensor, secret: torch.Tensor, n_labelled: int, *, steps: int = 300,
                 num_classes: int = 10) -> float:
    """Accuracy on the other decoys of a logistic-regression probe trained on ``n_labelled`` decoys
    with their secret labels."""
    n = len(decoys)
    if not 0 < n_labelled < n:
        raise ValueError(f"n_labelled must be in 1..{n - 1}, got {n_labelled}")
    gen = torch_generator("cpu")
    order = torch.randperm(n, generator=gen)
    train, rest = order[:n_labelled], order[n_labelled:]
    flat = decoys.reshape(n, -1).float()
    probe = nn.Linear(flat.shape[1], num_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(probe(flat[train]), secret[train].long()).backward()
        opt.step()
    with torch.no_grad():
        return float((probe(flat[rest]).argmax(1) == secret[rest].long()).float().mean())


@dataclass
class DecoyAudit:
    chance: float
    frequency_attack_accuracy: float
    cluster_attack_accuracy: float
    decoy_realism: float | None = None
    feature_distance: float | None = None
    real_feature_distance: float | None = None
    probe_accuracy: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["probe_accuracy"] = {str(k): v for k, v in self.probe_accuracy.items()}
        return d


def audit_decoys(decoys: torch.Tensor, decoy_labels: torch.Tensor, secret_labels: torch.Tensor,
                 prior: Sequence[float], *, judge: nn.Module | None = None, real_x: torch.Tensor | None = None,
                 real_y: torch.Tensor | None = None, probe_sizes: Sequence[int] = (10, 100, 1000)) -> DecoyAudit:
    """Audit a decoy set (see the module docstring). ``prior``: the adversary's belief of the secret
    classes' frequencies. ``judge``: a classifier trained on real images; with ``real_x``/``real_y``
    (real images, other than the judge's training set) the feature distances are measured too."""
    secret = secret_labels.long()
    k = len(prior)
    out = DecoyAudit(chance=float(torch.bincount(secret, minlength=k).max()) / len(secret),
                     frequency_attack_accuracy=frequency_attack(decoy_labels, secret, prior),
                     cluster_attack_accuracy=cluster_attack(decoys, secret, prior))
    if judge is not None:
        with torch.no_grad():
            judge.eval()
            pred = torch.cat([judge(b).argmax(1) for b in decoys.split(1000)])
        out.decoy_realism = float((pred == decoy_labels.long()).float().mean())
        if real_x is not None and real_y is not None:
            m = min(len(decoys), len(real_x) // 2, 5000)
            fake_f = penultimate(judge, decoys[:m])
            real_f = penultimate(judge, real_x)
            out.feature_distance = frechet_distance(fake_f, real_f[:m])
            out.real_feature_distance = frechet_distance(real_f[m:2 * m], real_f[:m])
    for size in probe_sizes:
        if size < len(decoys):
            out.probe_accuracy[int(size)] = probe_attack(decoys, secret, int(size), num_classes=k)
    return out
