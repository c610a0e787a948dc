"""veil.audit: membership scores against a plaintext oracle, the loss and shadow attacks on a memorising
MLP and on a model that saw neither set, the epsilon bound against hand-computed Clopper-Pearson
values, errors, JSON and the ROC plot."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta
from torch import nn

from veil.audit import (
    AttackResult,
    MembershipAudit,
    ShadowModel,
    attack_result,
    audit_membership,
    clopper_pearson_upper,
    compare_audits,
    epsilon_lower_bound,
    loss_threshold_attack,
    membership_scores,
    plot_roc,
    reference_attack,
    shadow_model_attack,
    split_epsilon,
)

DIM, CLASSES = 20, 10


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs with random labels: nothing to learn, so anything fitted is memorised."""
    return torch.randn(n, DIM, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator)


def _train(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Module:
    model = nn.Sequential(nn.Linear(DIM, 128), nn.ReLU(), nn.Linear(128, CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def setup() -> dict[str, tuple[torch.Tensor, torch.Tensor] | nn.Module]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    members, nonmembers, third, shadow = (_random_task(200, g) for _ in range(4))
    return {"members": members, "nonmembers": nonmembers, "shadow": shadow,
            "overfit": _train(*members), "unseen": _train(*third)}


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


# ---- scores -----------------------------------------------------------------------------------------
def test_scores_match_plaintext_oracle_and_restore_mode(setup: dict) -> None:
    model, (x, y) = setup["overfit"], setup["nonmembers"]
    model.train()
    s = membership_scores(model, x, y, batch_size=64)
    assert model.training
    with torch.no_grad():
        logits = model(x).double()
    p = logits.softmax(1)
    np.testing.assert_allclose(s["loss"], F.cross_entropy(logits, y, reduction="none").numpy(), rtol=1e-9)
    np.testing.assert_allclose(s["confidence"], p[torch.arange(len(y)), y].numpy(), rtol=1e-9)
    np.testing.assert_allclose(s["max_prob"], p.max(1).values.numpy(), rtol=1e-9)
    np.testing.assert_allclose(s["entropy"], (-(p * p.log()).sum(1)).numpy(), rtol=1e-6, atol=1e-12)
    assert set(s) == {"loss", "confidence", "max_prob", "entropy"}
    assert all(v.dtype == np.float64 and v.shape == (200,) for v in s.values())


# ---- attacks ----------------------------------------------------------------------------------------
def test_loss_attack_detects_memorisation(setup: dict) -> None:
    r = loss_threshold_attack(setup["overfit"], setup["members"], setup["nonmembers"], delta=1e-5,
                              rng=np.random.default_rng(0))
    assert r.auc > 0.8
    assert r.epsilon_lower_bound > 0
    assert r.advantage > 0.5
    assert (r.members, r.nonmembers) == (200, 200)
    assert r.fpr[0] == 0 and r.fpr[-1] == 1 and r.tpr[-1] == 1
    assert ", fpr=" not in repr(r) and "array(" not in repr(r) and "auc=" in repr(r)


def test_loss_attack_at_chance_on_unseen_model(setup: dict) -> None:
    r = loss_threshold_attack(setup["unseen"], setup["members"], setup["nonmembers"], delta=1e-5,
                              rng=np.random.default_rng(0))
    assert abs(r.auc - 0.5) < 0.1
    assert r.epsilon_lower_bound < 0.5


def test_shadow_attack_detects_memorisation(setup: dict) -> None:
    r = shadow_model_attack(_train, setup["overfit"], setup["shadow"], setup["members"], setup["nonmembers"],
                            num_shadows=2, rng=np.random.default_rng(0))
    assert r.name == "shadow models"
    assert r.auc > 0.7
    assert r.epsilon_lower_bound > 0


def test_audit_compare_json_and_plot(setup: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    overfit = audit_membership(setup["overfit"], setup["members"], setup["nonmembers"], train_fn=_train,
                               shadow_data=setup["shadow"], num_shadows=1, rng=rng)
    unseen = audit_membership(setup["unseen"], setup["members"], setup["nonmembers"], rng=rng)
    assert isinstance(overfit.shadow, AttackResult) and unseen.shadow is None
    assert overfit.epsilon_lower_bound > unseen.epsilon_lower_bound
    d = json.loads(json.dumps(overfit.to_dict(roc=True), allow_nan=False))
    assert d["delta"] == 1e-5 and d["loss"]["auc"] == overfit.loss.auc and len(d["shadow"]["fpr"]) > 2
    rows = compare_audits({"non-DP": overfit, "unseen": unseen})
    assert [(r["model"], r["attack"]) for r in rows] == [
        ("non-DP", "loss threshold"), ("non-DP", "shadow models"), ("non-DP", "reference models"),
        ("unseen", "loss threshold")]
    assert overfit.reference is not None and overfit.reference.auc > 0.7 and unseen.reference is None
    assert rows[0]["auc"] > rows[3]["auc"]
    out = plot_roc({"non-DP": overfit, "unseen": unseen}, tmp_path / "plots" / "roc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["roc.png"]  # no temporary file left behind


# ---- the epsilon bound ------------------------------------------------------------------------------
def test_epsilon_bound_matches_hand_computation() -> None:
    # FPR: 0 of 100 -> upper bound 1 - 0.025^(1/100); FNR: 30 of 100 -> Beta(31, 70) 97.5% quantile.
    fpr_hi = 1 - 0.025 ** (1 / 100)
    fnr_hi = beta.ppf(0.975, 31, 70)
    assert clopper_pearson_upper(0, 100)[()] == pytest.approx(fpr_hi, rel=1e-12)
    expected = max(math.log((1 - 1e-5 - fpr_hi) / fnr_hi), math.log((1 - 1e-5 - fnr_hi) / fpr_hi))
    assert expected == pytest.approx(math.log((1 - 1e-5 - fnr_hi) / fpr_hi))  # the second term wins
    assert epsilon_lower_bound(0, 100, 30, 100, delta=1e-5) == pytest.approx(expected, rel=1e-12)
    assert epsilon_lower_bound(0, 100, 30, 100, delta=1e-5, confidence=0.99) < expected


def test_epsilon_bound_is_zero_at_chance() -> None:
    assert epsilon_lower_bound(50, 100, 50, 100) == 0.0
    assert epsilon_lower_bound(0, 100, 100, 100) == 0.0  # "never a member": no information
    assert epsilon_lower_bound(3, 10, 4, 10) == 0.0  # better than chance, not significantly
    rng = np.random.default_rng(0)
    assert split_epsilon(rng.normal(size=500), rng.normal(size=500), rng=rng).epsilon_lower_bound == 0.0


def test_split_epsilon_evaluates_on_held_out_half() -> None:
    audit = split_epsilon(np.arange(200) + 1000.0, np.arange(200.0), rng=np.random.default_rng(0))
    assert (audit.members, audit.nonmembers, audit.false_positives, audit.false_negatives) == (100, 100, 0, 0)
    assert audit.epsilon_lower_bound == pytest.approx(math.log((1 - (1 - 0.025 ** 0.01)) / (1 - 0.025 ** 0.01)))
    r = attack_result("perfect", np.ones(10), np.zeros(10), rng=np.random.default_rng(0))
    assert (r.auc, r.advantage, r.tpr_at_1pct_fpr) == (1.0, 1.0, 1.0)


# ---- errors -----------------------------------------------------------------------------------------
def test_errors_name_the_problem(setup: dict) -> None:
    model, members, nonmembers = setup["overfit"], setup["members"], setup["nonmembers"]
    x, y = members
    with pytest.raises(ValueError, match="members is empty"):
        loss_threshold_attack(model, (x[:0], y[:0]), nonmembers)
    with pytest.raises(ValueError, match="nonmembers is empty"):
        audit_membership(model, members, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="x has 200 examples but y has shape"):
        loss_threshold_attack(model, (x, y[:10]), nonmembers)
    with pytest.raises(ValueError, match=r"labels span \[0, 10\] but the model has 10 outputs"):
        loss_threshold_attack(model, (x, torch.cat([y[:-1], torch.tensor([10])])), nonmembers)
    with pytest.raises(ValueError, match="labels must be integer"):
        membership_scores(model, x, y.float())
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="delta must satisfy 0 <= delta < 1"):
            audit_membership(model, members, nonmembers, delta=bad)
        with pytest.raises(ValueError, match="delta must satisfy"):
            epsilon_lower_bound(0, 10, 0, 10, delta=bad)
    nan_model = nn.Sequential(model, _Scale(float("nan")))
    with pytest.raises(ValueError, match="outputs are NaN for 200 of 200"):
        loss_threshold_attack(nan_model, members, nonmembers)
    with pytest.raises(ValueError, match="needs both train_fn and shadow_data"):
        audit_membership(model, members, nonmembers, train_fn=_train)
    with pytest.raises(ValueError, match="needs >= 2 members"):
        split_epsilon([1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="plot_roc needs at least one audit"):
        plot_roc({}, "unused.png")


def test_membership_audit_is_frozen(setup: dict) -> None:
    audit = audit_membership(setup["unseen"], setup["members"], setup["nonmembers"], rng=np.random.default_rng(0))
    assert isinstance(audit, MembershipAudit)
    with pytest.raises(AttributeError):
        audit.delta = 0.5  # type: ignore[misc]


class _Table(nn.Module):
    """A 'model' whose logit-confidence on example i (x = [[i]]) is table[i]: logits (table[i], 0), label 0."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi = self.table[x[:, 0].long()]
        return torch.stack([phi, torch.zeros_like(phi)], dim=1)


def test_reference_attack_calibrates_per_example_difficulty() -> None:
    # Difficulty varies a lot between examples (std 5); membership adds only 1 to the target's
    # logit-confidence. A global threshold hardly sees it; references that never saw the examples
    # measure each one's difficulty, and the calibrated score separates members well.
    g = torch.Generator().manual_seed(3)
    n = 400
    difficulty = 5 * torch.randn(n, generator=g, dtype=torch.float64)
    member = (torch.arange(n) < n // 2).double()
    target = _Table(difficulty + member + 0.3 * torch.randn(n, generator=g, dtype=torch.float64))
    refs = [ShadowModel(_Table(difficulty + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)),
                        torch.arange(0), torch.arange(0)) for _ in range(4)]
    x = torch.arange(n, dtype=torch.float64)[:, None]
    y = torch.zeros(n, dtype=torch.long)
    members, nonmembers = (x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])
    rng = np.random.default_rng(0)
    calibrated = reference_attack(target, refs, members, nonmembers, rng=rng)
    plain = loss_threshold_attack(target, members, nonmembers, rng=rng)
    assert calibrated.name == "reference models"
    assert calibrated.auc > 0.95
    assert plain.auc < 0.65
    with pytest.raises(ValueError, match="at least one reference"):
        reference_attack(target, [], members, nonmembers)
