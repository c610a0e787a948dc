"""Membership inference: does a trained model reveal whether an example was in its training set?

Two attacks, each reported with its AUC, advantage, TPR at 1% FPR and the empirical epsilon lower
bound it certifies (see ``veil.audit.roc`` for the figures and their math):

* **Loss threshold** (Yeom et al. 2018, "Privacy risk in machine learning"): a model fits its
  training examples better than fresh ones, so score = -loss(x, y) = log p_model(y | x) and call
  "member" above a threshold. Needs no training, only the target's outputs.
* **Shadow models** (Shokri et al. 2017, "Membership inference attacks against machine learning
  models"): train k shadow models the way the target was trained (``train_fn``), each on a random
  half of data from the same distribution, so the attacker knows which examples each shadow saw.
  Fit a classifier (logistic regression) from a model's output features on an example to "was it
  in?", then apply it to the target's outputs on the audited members and nonmembers.

Run both on a DP-SGD model and a non-DP one (:func:`audit_membership`, :func:`compare_audits`,
:func:`plot_roc`): a DP model should keep the AUC near 0.5 and the epsilon lower bound below its
accounted epsilon; a bound above the accounted epsilon means the accounting or the training is wrong.

Randomness (data splits, threshold-selection halves) comes from an injected ``numpy`` Generator, or
one seeded with 128 bits from ``secrets``; nothing here seeds anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from veil.audit.roc import AttackResult, attack_result
from veil.dp.composition import validate_delta
from veil.plotting import figure, save_png
from veil.randomness import numpy_rng

__all__ = ["MembershipAudit", "ShadowModel", "audit_membership", "compare_audits", "loss_threshold_attack",
           "membership_scores", "plot_roc", "reference_attack", "shadow_model_attack", "train_shadows"]

Examples = tuple[torch.Tensor, torch.Tensor]
TrainFn = Callable[[torch.Tensor, torch.Tensor], nn.Module]
SCORE_NAMES = ("loss", "confidence", "max_prob", "entropy")


def _examples(data: Examples, what: str) -> Examples:
    try:
        x, y = data
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an (x, y) pair of tensors, got {type(data).__name__}") from None
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"{what} must be an (x, y) pair of tensors, got ({type(x).__name__}, {type(y).__name__})")
    if len(x) == 0:
        raise ValueError(f"{what} is empty: an audit needs at least one example on each side")
    if y.dim() != 1 or len(x) != len(y):
        raise ValueError(f"{what}: x has {len(x)} examples but y has shape {tuple(y.shape)}; "
                         f"y must be one integer label per row of x")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
        raise ValueError(f"{what}: labels must be integer class indices, got dtype {y.dtype}; use y.long()")
    return x, y


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _probabilities(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                   device: torch.device | str | None, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax of the model's outputs [N, C], labels) on the CPU, in eval mode under no_grad."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                out = model(x[start:start + batch_size].to(dev))
                if not isinstance(out, torch.Tensor) or out.dim() != 2:
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(f"{what}: the model must return logits of shape [batch, classes], got {shape}")
                chunks.append(torch.log_softmax(out.double(), dim=1).cpu())
    finally:
        model.train(was_training)
    logp = torch.cat(chunks)
    if torch.isnan(logp).any():
        bad = int(torch.isnan(logp).any(dim=1).sum())
        raise ValueError(f"{what}: the model's outputs are NaN for {bad} of {len(logp)} examples; check the "
                         f"model (diverged training?) and the inputs for NaN")
    classes = logp.shape[1]
    y = y.cpu().long()
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise ValueError(f"{what}: labels span [{int(y.min())}, {int(y.max())}] but the model has {classes} "
                         f"outputs (classes 0..{classes - 1}); map labels to 0..{classes - 1} or fix the model")
    return logp, y


def _scores_from_logp(logp: torch.Tensor, y: torch.Tensor) -> dict[str, npt.NDArray[np.float64]]:
    p = logp.exp()
    true_logp = logp.gather(1, y[:, None]).squeeze(1)
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=1)
    return {"loss": (-true_logp).numpy(), "confidence": true_logp.exp().numpy(),
            "max_prob": p.max(dim=1).values.numpy(), "entropy": entropy.numpy()}


def membership_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
                      device: torch.device | str | None = None) -> dict[str, npt.NDArray[np.float64]]:
    """Per-example statistics of a classifier's softmax p = softmax(model(x)), as float64 arrays:

    * ``loss`` = -log p_y (cross-entropy), ``confidence`` = p_y (probability of the true label),
    * ``max_prob`` = max_c p_c, ``entropy`` = -sum_c p_c log p_c (nats).

    Runs in eval mode under ``torch.no_grad`` in batches of ``batch_size`` on ``device`` (default: the
    device of the model's first parameter), restoring the model's train/eval mode afterwards."""
    x, y = _examples((x, y), "the examples")
    return _scores_from_logp(*_probabilities(model, x, y, batch_size=batch_size, device=device,
                                             what="the examples"))


def loss_threshold_attack(model: nn.Module, members: Examples, nonmembers: Examples, *, delta: float = 0.0,
                          confidence: float = 0.95, batch_size: int = 1024, device: torch.device | str | None = None,
                          rng: np.random.Generator | None = None) -> AttackResult:
    """Yeom et al. (2018): score each example by -loss = log p_model(y | x) and threshold it.

    ``members`` are (x, y) of the model's training set, ``nonmembers`` (x, y) from the same
    distribution that it never saw. Returns the ROC figures and the epsilon lower bound at
    (``delta``, ``confidence``), the threshold chosen on a random half (``rng``) and the bound
    evaluated on the other half."""
    kw: dict[str, Any] = {"batch_size": batch_size, "device": device}
    mem = membership_scores(model, *_examples(members, "members"), **kw)
    non = membership_scores(model, *_examples(nonmembers, "nonmembers"), **kw)
    lowest = -np.finfo(np.float64).max  # p_y = 0 gives loss inf: keep the score finite, and the lowest
    return attack_result("loss threshold", np.maximum(-mem["loss"], lowest), np.maximum(-non["loss"], lowest),
                         delta=delta, confidence=confidence, rng=rng)


def _shadow_features(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, top_k: int, batch_size: int,
                     device: torch.device | str | None, what: str) -> npt.NDArray[np.float64]:
    """[N, top_k + 2]: the top_k softmax probabilities in decreasing order, the loss, and the entropy."""
    logp, y = _probabilities(model, x, y, batch_size=batch_size, device=device, what=what)
    k = min(top_k, logp.shape[1])
    top = logp.exp().sort(dim=1, descending=True).values[:, :k].numpy()
    s = _scores_from_logp(logp, y)
    loss = np.minimum(s["loss"], 50.0)  # cap -log p at 50 nats so a saturated softmax cannot dominate the fit
    return np.column_stack([top, loss, s["entropy"]])


@dataclass(frozen=True, eq=False)
class ShadowModel:
    """A model trained by ``train_fn`` on ``shadow_data[inside]``; ``shadow_data[outside]`` it never saw."""

    model: nn.Module
    inside: torch.Tensor
    outside: torch.Tensor


def train_shadows(train_fn: TrainFn, shadow_data: Examples, *, num_shadows: int = 4,
                  rng: np.random.Generator | None = None) -> list[ShadowModel]:
    """``num_shadows`` models, each trained by ``train_fn(x, y)`` on its own random half of ``shadow_data``
    (``rng``; default seeded from ``secrets``). ``train_fn`` must train the way the target was trained
    (architecture, epochs, optimiser, DP or not); ``shadow_data`` must come from the target's
    distribution and be disjoint from the audited examples."""
    if num_shadows < 1:
        raise ValueError(f"num_shadows must be >= 1, got {num_shadows}")
    sx, sy = _examples(shadow_data, "shadow_data")
    if len(sx) < 4:
        raise ValueError(f"shadow_data has {len(sx)} examples; each shadow model needs a training half and a "
                         f"nonmember half of at least 2 examples each")
    gen = numpy_rng(rng)
    shadows = []
    for _ in range(num_shadows):
        perm = torch.from_numpy(gen.permutation(len(sx)))
        inside, outside = perm[: len(sx) // 2], perm[len(sx) // 2:]
        model = train_fn(sx[inside], sy[inside])
        if not isinstance(model, nn.Module):
            raise ValueError(f"train_fn must return the trained nn.Module, got {type(model).__name__}")
        shadows.append(ShadowModel(model, inside, outside))
    return shadows


def shadow_model_attack(train_fn: TrainFn | None, target_model: nn.Module, shadow_data: Examples, members: Examples,
                        nonmembers: Examples, *, num_shadows: int = 4, top_k: int = 3, delta: float = 0.0,
                        confidence: float = 0.95, batch_size: int = 1024, device: torch.device | str | None = None,
                        rng: np.random.Generator | None = None,
                        shadows: list[ShadowModel] | None = None) -> AttackResult:
    """Shokri et al. (2017), with one attack classifier for all classes.

    1. Train ``num_shadows`` shadow models (:func:`train_shadows`, or pass ``shadows`` already
       trained on ``shadow_data``): each knows which half of ``shadow_data`` it saw ("in").
    2. Features of a model on (x, y): its top-``top_k`` softmax probabilities sorted decreasingly,
       its loss -log p_y (capped at 50 nats) and its entropy. Label the shadows' "in" features 1 and
       "out" features 0.
    3. Fit a logistic regression (scikit-learn, features standardised) to these labels.
    4. Score the target's members and nonmembers by the classifier's P[in | features]."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    sx, sy = _examples(shadow_data, "shadow_data")
    mem, non = _examples(members, "members"), _examples(nonmembers, "nonmembers")
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise ImportError("shadow_model_attack needs scikit-learn: install the data extra, "
                          "pip install 'veil[data]'") from e
    gen = numpy_rng(rng)
    if shadows is None:
        if train_fn is None:
            raise ValueError("shadow_model_attack needs train_fn or trained shadows")
        shadows = train_shadows(train_fn, (sx, sy), num_shadows=num_shadows, rng=gen)
    kw: dict[str, Any] = {"top_k": top_k, "batch_size": batch_size, "device": device}
    feats: list[npt.NDArray[np.float64]] = []
    labels: list[npt.NDArray[np.float64]] = []
    for i, sh in enumerate(shadows):
        for idx, label in ((sh.inside, 1.0), (sh.outside, 0.0)):
            f = _shadow_features(sh.model, sx[idx], sy[idx], what=f"shadow model {i}", **kw)
            feats.append(f)
            labels.append(np.full(len(f), label))
    attack = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    attack.fit(np.concatenate(feats), np.concatenate(labels))
    mem_p = attack.predict_proba(_shadow_features(target_model, *mem, what="members", **kw))[:, 1]
    non_p = attack.predict_proba(_shadow_features(target_model, *non, what="nonmembers", **kw))[:, 1]
    return attack_result("shadow models", mem_p, non_p, delta=delta, confidence=confidence, rng=gen)


def _logit_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                      device: torch.device | str | None, what: str) -> npt.NDArray[np.float64]:
    """phi = log(p_y / (1 - p_y)), computed stably from log-probabilities (Carlini et al. 2022's scaling)."""
    logp, y = _probabilities(model, x, y, batch_size=batch_size, device=device, what=what)
    true = logp.gather(1, y[:, None]).squeeze(1)
    others = logp.scatter(1, y[:, None], float("-inf")).logsumexp(dim=1)
    return (true - others).clamp(-1e4, 1e4).numpy()


def reference_attack(target_model: nn.Module, shadows: list[ShadowModel], members: Examples, nonmembers: Examples,
                     *, delta: float = 0.0, confidence: float = 0.95, batch_size: int = 1024,
                     device: torch.device | str | None = None, rng: np.random.Generator | None = None) -> AttackResult:
    """Per-example calibrated attack: offline LiRA (Carlini et al. 2022; Watson et al. 2022).

    Some examples are easy (every model is confident on them) and some hard; a global loss threshold
    confuses "easy" with "member". Reference models that never saw the audited examples (the shadow
    models: their data is disjoint from the audit's) measure each example's difficulty:

        phi_m(x) = log(p_y / (1 - p_y)) under model m,
        score(x) = (phi_target(x) - mean_k phi_k(x)) / s,

    s the pooled standard deviation of phi_k(x) - mean_k phi_k(x) over examples and references (a
    per-example deviation needs many more references). A large score: the target is more confident
    on x than models that did not train on it."""
    if not shadows:
        raise ValueError("reference_attack needs at least one reference (shadow) model")
    kw: dict[str, Any] = {"batch_size": batch_size, "device": device}
    results = []
    for data, what in ((_examples(members, "members"), "members"), (_examples(nonmembers, "nonmembers"), "nonmembers")):
        target = _logit_confidence(target_model, *data, what=what, **kw)
        refs = np.stack([_logit_confidence(sh.model, *data, what=f"reference model {i}", **kw)
                         for i, sh in enumerate(shadows)])
        results.append((target, refs))
    centred = np.concatenate([refs - refs.mean(axis=0) for _, refs in results], axis=1)
    scale = float(centred.std()) if len(shadows) > 1 and centred.std() > 0 else 1.0
    mem_s, non_s = ((target - refs.mean(axis=0)) / scale for target, refs in results)
    return attack_result("reference models", mem_s, non_s, delta=delta, confidence=confidence, rng=rng)


@dataclass(frozen=True)
class MembershipAudit:
    """The attacks run on one model: always the loss-threshold attack, the shadow attack when asked."""

    loss: AttackResult
    shadow: AttackResult | None
    delta: float
    reference: AttackResult | None = None

    @property
    def attacks(self) -> tuple[AttackResult, ...]:
        return tuple(a for a in (self.loss, self.shadow, self.reference) if a is not None)

    @property
    def epsilon_lower_bound(self) -> float:
        """The largest bound any attack certified (each is valid on its own; the max is at most
        optimistic by the multiple-testing of len(attacks) attacks)."""
        return max(a.epsilon_lower_bound for a in self.attacks)

    def to_dict(self, *, roc: bool = False) -> dict[str, Any]:
        """JSON-ready: ``{"delta", "epsilon_lower_bound", "loss": {...}, "shadow": {...} | None}``."""
        return {"delta": self.delta, "epsilon_lower_bound": self.epsilon_lower_bound,
                "loss": self.loss.to_dict(roc=roc),
                "shadow": None if self.shadow is None else self.shadow.to_dict(roc=roc),
                "reference": None if self.reference is None else self.reference.to_dict(roc=roc)}


def audit_membership(model: nn.Module, members: Examples, nonmembers: Examples, *, train_fn: TrainFn | None = None,
                     shadow_data: Examples | None = None, delta: float = 1e-5, confidence: float = 0.95,
                     num_shadows: int = 4, batch_size: int = 1024, device: torch.device | str | None = None,
                     rng: np.random.Generator | None = None) -> MembershipAudit:
    """Run the loss-threshold attack, and the shadow-model and reference-model attacks (sharing one
    set of shadow models) when both ``train_fn`` and ``shadow_data`` are given, on ``model`` with its
    training ``members`` and unseen ``nonmembers``.
    ``delta`` is the delta at which the epsilon lower bounds are stated (that of the DP guarantee
    being audited; 0 <= delta < 1)."""
    delta = validate_delta(delta)
    if (train_fn is None) != (shadow_data is None):
        raise ValueError("the shadow attack needs both train_fn and shadow_data; pass both or neither")
    gen = numpy_rng(rng)
    kw: dict[str, Any] = {"delta": delta, "confidence": confidence, "batch_size": batch_size, "device": device,
                          "rng": gen}
    loss = loss_threshold_attack(model, members, nonmembers, **kw)
    shadow = reference = None
    if train_fn is not None and shadow_data is not None:
        shadows = train_shadows(train_fn, shadow_data, num_shadows=num_shadows, rng=gen)
        shadow = shadow_model_attack(None, model, shadow_data, members, nonmembers, shadows=shadows, **kw)
        reference = reference_attack(model, shadows, members, nonmembers, **kw)
    return MembershipAudit(loss=loss, shadow=shadow, delta=delta, reference=reference)


def compare_audits(named: Mapping[str, MembershipAudit]) -> list[dict[str, Any]]:
    """One row per (model, attack), for side-by-side printing of e.g. a DP-SGD and a non-DP model:
    ``{"model", "attack", "auc", "advantage", "tpr_at_1pct_fpr", "epsilon_lower_bound", "delta",
    "members", "nonmembers"}``."""
    rows = []
    for model_name, audit in named.items():
        for a in audit.attacks:
            rows.append({"model": model_name, "attack": a.name, "auc": a.auc, "advantage": a.advantage,
                         "tpr_at_1pct_fpr": a.tpr_at_1pct_fpr, "epsilon_lower_bound": a.epsilon_lower_bound,
                         "delta": a.delta, "members": a.members, "nonmembers": a.nonmembers})
    return rows


def plot_roc(audits: Mapping[str, MembershipAudit], path: str | Path, *, log_scale: bool = False) -> Path:
    """ROC curves of every attack of every audit, with the chance diagonal, as a PNG written
    atomically to ``path`` (needs matplotlib: ``pip install 'veil[plots]'``). ``log_scale`` puts both
    axes on a log scale, where the low-FPR regime that matters for privacy is visible."""
    if not audits:
        raise ValueError("plot_roc needs at least one audit, e.g. {'non-DP': audit_a, 'DP-SGD': audit_b}")
    fig = figure(5.5, 5.0)
    ax = fig.add_subplot()
    lo = 1e-4 if log_scale else 0.0
    ax.plot([lo, 1], [lo, 1], "--", color="grey", lw=1, label="chance")
    for model_name, audit in audits.items():
        for a in audit.attacks:
            eps = a.epsilon_lower_bound
            label = f"{model_name}, {a.name}: AUC {a.auc:.3f}, eps >= {eps:.2f}" if math.isfinite(eps) else model_name
            ax.plot(np.maximum(a.fpr, lo), np.maximum(a.tpr, lo), lw=1.5, label=label)
    if log_scale:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="membership inference ROC",
           xlim=(lo, 1), ylim=(lo, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path)
