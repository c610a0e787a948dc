"""Tests for veil.dp.pate_training: PATE teachers on disjoint parts of scikit-learn's 8x8 digits, noisy
public labels with their privacy accounting, and a student trained on them only."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from veil.dp.pate import gnmax_rdp_data_independent, pate_epsilon, rdp_to_dp
from veil.dp.pate_training import (
    PateLabels,
    label_public_data,
    partition_disjoint,
    run_pate,
    teacher_predictions,
    train_student,
    train_teachers,
)

NUM_CLASSES = 10


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], data.target[perm].astype(np.int64)
    return {"private": (x[:1200], y[:1200]), "public": (x[1200:1600], y[1200:1600]), "test": (x[1600:], y[1600:])}


@pytest.fixture(scope="module")
def teachers(digits):
    torch.manual_seed(0)
    x, y = digits["private"]
    return train_teachers(_mlp, x, y, num_teachers=10, epochs=40, batch_size=64, lr=2e-2, device="cpu",
                          rng=np.random.default_rng(1), progress=False)


@pytest.fixture(scope="module")
def votes(teachers, digits):
    return teacher_predictions(teachers, digits["public"][0], batch_size=128)


# --- partitions ------------------------------------------------------------------------------

@pytest.mark.parametrize("n, t", [(1200, 10), (17, 5), (7, 7), (1, 1)])
def test_partition_is_disjoint_covering_and_near_equal(n, t):
    parts = partition_disjoint(n, t, rng=np.random.default_rng(2))
    assert len(parts) == t
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))  # covers range(n), each index once
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_partition_is_random_but_reproducible_with_a_seeded_generator():
    a = partition_disjoint(100, 4, rng=np.random.default_rng(3))
    b = partition_disjoint(100, 4, rng=np.random.default_rng(3))
    c = partition_disjoint(100, 4, rng=np.random.default_rng(4))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    assert not np.array_equal(a[0], np.arange(25))


@pytest.mark.parametrize("t, match", [(0, "num_teachers must be an integer >= 1"),
                                      (11, r"num_teachers \(11\) exceeds the number of examples \(10\)")])
def test_partition_rejects_bad_teacher_counts(t, match):
    with pytest.raises(ValueError, match=match):
        partition_disjoint(10, t)


# --- teachers and votes ----------------------------------------------------------------------

def test_teachers_learn_and_vote(teachers, votes, digits):
    assert len(teachers) == 10 and len({id(t) for t in teachers}) == 10
    assert votes.shape == (10, 400) and votes.dtype == np.int64
    assert votes.min() >= 0 and votes.max() < NUM_CLASSES
    x_test, y_test = digits["test"]
    accuracies = [(teacher_predictions([t], x_test)[0] == y_test).mean() for t in teachers]
    assert np.mean(accuracies) > 0.8  # 120 examples each; ~0.89 reached
    # the teachers disagree somewhere: they were trained on different data
    assert np.any(votes != votes[0])


def test_teacher_predictions_match_the_models(teachers, digits):
    x = digits["public"][0][:50]
    with torch.no_grad():
        expected = teachers[3](torch.from_numpy(x)).argmax(dim=1).numpy()
    np.testing.assert_array_equal(teacher_predictions(teachers, x, batch_size=7)[3], expected)


def test_train_teachers_rejects_mismatched_lengths_and_bad_labels(digits):
    x, y = digits["private"]
    with pytest.raises(ValueError, match="y must be a 1-D array of 1200 labels"):
        train_teachers(_mlp, x, y[:-1], num_teachers=2, epochs=1, batch_size=8, lr=0.1, progress=False)
    with pytest.raises(ValueError, match="num_teachers must be an integer >= 1"):
        train_teachers(_mlp, x, y, num_teachers=0, epochs=1, batch_size=8, lr=0.1, progress=False)
    with pytest.raises(ValueError, match="labels out of range for the model"):
        train_teachers(_mlp, x[:20], y[:20] + 10, num_teachers=2, epochs=1, batch_size=8, lr=0.1, progress=False)
    with pytest.raises(ValueError, match="y out of range"):
        train_teachers(_mlp, x[:20], y[:20] - 10, num_teachers=2, epochs=1, batch_size=8, lr=0.1, progress=False)
    with pytest.raises(ValueError, match=r"lr must be .*; optimizer must be 'adam' or 'sgd'"):
        train_teachers(_mlp, x, y, num_teachers=2, epochs=1, batch_size=8, lr=-1.0, optimizer="rmsprop",
                       progress=False)


def test_teacher_predictions_rejects_an_empty_public_set(teachers):
    with pytest.raises(ValueError, match="x_public is empty"):
        teacher_predictions(teachers, np.zeros((0, 64), dtype=np.float32))


# --- labelling and its privacy ---------------------------------------------------------------

def test_gnmax_labels_are_accurate_and_accounted(votes, digits):
    y_public = digits["public"][1]
    labels = label_public_data(votes, NUM_CLASSES, sigma=2.0, true_labels=y_public, rng=np.random.default_rng(5))
    assert labels.num_asked == labels.num_answered == 400
    np.testing.assert_array_equal(labels.indices, np.arange(400))
    assert labels.true_accuracy > 0.88  # ~0.93 reached
    assert labels.plurality_agreement > 0.9
    expected_indep = pate_epsilon(np.eye(NUM_CLASSES)[votes.T].sum(axis=1), 2.0, 1e-5, data_dependent=False)
    assert labels.epsilon_data_independent == pytest.approx(expected_indep, rel=1e-12)
    assert labels.epsilon_data_dependent <= labels.epsilon_data_independent
    assert labels.epsilon_data_dependent < 0.5 * labels.epsilon_data_independent  # strong consensus pays less
    assert labels.delta == 1e-5 and labels.orders.size > 0
    with pytest.raises(ValueError):
        labels.labels[0] = 3  # read-only


def test_num_queries_asks_only_the_first_rows(votes):
    labels = label_public_data(votes, NUM_CLASSES, sigma=2.0, num_queries=50, rng=np.random.default_rng(6))
    assert labels.num_asked == labels.num_answered == 50 and labels.indices.max() == 49
    assert labels.epsilon_data_independent < label_public_data(
        votes, NUM_CLASSES, sigma=2.0, rng=np.random.default_rng(6)).epsilon_data_independent


def test_lnmax_uses_basic_composition(votes):
    labels = label_public_data(votes, NUM_CLASSES, aggregator="lnmax", epsilon_per_query=0.5, num_queries=100,
                               rng=np.random.default_rng(7))
    assert labels.epsilon_data_independent == labels.epsilon_data_dependent == pytest.approx(50.0)
    assert labels.delta == 0.0 and labels.orders.size == 0 and labels.num_answered == 100


def test_confident_gnmax_drops_rejected_queries_and_pays_for_the_check(votes, digits):
    sigma, sigma1, delta = 2.0, 2.0, 1e-5
    labels = label_public_data(votes, NUM_CLASSES, aggregator="confident-gnmax", sigma=sigma, threshold=9.0,
                               sigma1=sigma1, delta=delta, true_labels=digits["public"][1],
                               rng=np.random.default_rng(8))
    assert 0 < labels.num_answered < labels.num_asked == 400
    assert labels.indices.size == labels.labels.size == labels.num_answered
    assert labels.labels.min() >= 0  # no -1 left
    hist = np.eye(NUM_CLASSES)[votes.T].sum(axis=1)
    assert np.all(hist[labels.indices].max(axis=1) >= 4)  # rejected: the weak-consensus queries
    assert labels.true_accuracy > 0.95  # the confident ones are nearly all right (~0.98 reached)
    # the check costs alpha / (2 sigma1^2) on every query asked, on top of the answered GNMax queries
    without_check = pate_epsilon(hist[labels.indices], sigma, delta, data_dependent=False)
    assert labels.epsilon_data_independent > without_check
    lam = labels.orders
    total = 400 * lam / (2 * sigma1**2) + labels.num_answered * gnmax_rdp_data_independent(sigma, lam)
    assert labels.epsilon_data_independent == pytest.approx(rdp_to_dp(total, lam, delta), rel=1e-12)
    assert labels.epsilon_data_dependent <= labels.epsilon_data_independent
    assert labels.to_dict()["threshold"] == 9.0


def test_data_dependent_epsilon_is_far_smaller_with_many_agreeing_teachers():
    preds = np.tile(np.arange(50) % 3, (250, 1))  # 250 teachers, unanimous on every query
    labels = label_public_data(preds, 3, sigma=40.0, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(labels.labels, np.arange(50) % 3)
    assert labels.epsilon_data_dependent < 0.5 * labels.epsilon_data_independent


@pytest.mark.parametrize("kwargs, match", [
    ({}, "'gnmax' needs sigma"),
    ({"aggregator": "lnmax"}, "'lnmax' needs epsilon_per_query"),
    ({"aggregator": "confident-gnmax", "sigma": 1.0}, "'confident-gnmax' needs sigma1, threshold"),
    ({"sigma": 1.0, "threshold": 3.0}, "'gnmax' does not use threshold"),
    ({"aggregator": "bogus"}, "aggregator must be one of"),
    ({"sigma": 1.0, "num_queries": 5}, r"num_queries \(5\) exceeds the number of public examples \(4\)"),
    ({"sigma": 1.0, "true_labels": [0, 1, 2, 3]}, r"true_labels out of range: labels must be \[0, 3\)"),
    ({"sigma": 1.0, "true_labels": [0, 1]}, "true_labels must be a 1-D array of 4 labels"),
    ({"sigma": -1.0}, "sigma must be a finite number > 0"),
])
def test_label_public_data_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        label_public_data(np.zeros((5, 4), dtype=int), 3, **kwargs)


def test_label_public_data_rejects_out_of_range_votes_and_an_empty_public_set():
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        label_public_data(np.full((5, 4), 3), 3, sigma=1.0)
    with pytest.raises(ValueError, match="public set is empty"):
        label_public_data(np.zeros((5, 0), dtype=int), 3, sigma=1.0)


# --- student and the whole recipe ------------------------------------------------------------

def test_student_trains_only_on_answered_queries(digits):
    x_public = digits["public"][0][:6]
    labels = PateLabels(aggregator="gnmax", num_classes=NUM_CLASSES, indices=np.array([1, 4]), labels=np.array([7, 7]),
                        num_asked=6, num_answered=2, plurality_agreement=1.0, true_accuracy=None,
                        epsilon_data_independent=1.0, epsilon_data_dependent=1.0, delta=1e-5, orders=np.array([2.0]))
    torch.manual_seed(10)
    student = train_student(_mlp, x_public, labels, epochs=30, batch_size=2, lr=1e-2, device="cpu",
                            rng=np.random.default_rng(10))
    assert np.all(teacher_predictions([student], digits["test"][0][:40]) == 7)  # it only ever saw label 7
    empty = PateLabels(**{**labels.__dict__, "indices": np.empty(0, np.int64), "labels": np.empty(0, np.int64),
                          "num_answered": 0})
    with pytest.raises(ValueError, match="no public query was answered"):
        train_student(_mlp, x_public, empty, epochs=1, batch_size=2, lr=1e-2)
    with pytest.raises(ValueError, match="x_public has 3"):
        train_student(_mlp, x_public[:3], labels, epochs=1, batch_size=2, lr=1e-2)


def test_run_pate_student_generalises(digits):
    torch.manual_seed(11)
    result = run_pate(_mlp, digits["private"], digits["public"][0], digits["test"], num_teachers=10,
                      teacher_epochs=40, student_epochs=40, batch_size=64, lr=2e-2, num_classes=NUM_CLASSES,
                      sigma=2.0, public_labels=digits["public"][1], device="cpu", rng=np.random.default_rng(11),
                      progress=False)
    assert result.student_accuracy > 0.85  # 0.90-0.94 reached over 6 seeds
    assert result.labels.true_accuracy > 0.88
    assert result.teacher_accuracy_mean > 0.8 and len(result.teacher_accuracies) == 10
    d = result.to_dict()
    assert d["student_accuracy"] == result.student_accuracy and d["num_answered"] == 400
    assert math.isfinite(d["epsilon_data_independent"]) and d["sigma"] == 2.0
    json.dumps(d)  # JSON-ready


def test_run_pate_without_test_set_reports_no_accuracy(digits):
    x, y = digits["private"]
    torch.manual_seed(12)
    result = run_pate(_mlp, (x[:100], y[:100]), digits["public"][0][:30], num_teachers=2, teacher_epochs=1,
                      student_epochs=1, batch_size=32, lr=1e-2, num_classes=NUM_CLASSES, aggregator="lnmax",
                      epsilon_per_query=1.0, rng=np.random.default_rng(12), progress=False)
    assert result.student_accuracy is None and result.teacher_accuracy_mean is None
    assert result.labels.epsilon_data_independent == pytest.approx(30.0)
