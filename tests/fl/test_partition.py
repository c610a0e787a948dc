"""Client splits: coverage, disjointness, and the skew each scheme promises."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.fl.partition import PartitionSpec, label_histogram, partition

LABELS = torch.arange(6000) % 10


def _flat(parts):
    return torch.cat(parts).numpy()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet0.5", "dirichlet0.1", "shards2"])
def test_parts_are_disjoint(scheme):
    parts = partition(LABELS, 10, scheme, seed=1)
    flat = _flat(parts)
    assert len(parts) == 10
    assert len(np.unique(flat)) == len(flat)
    assert flat.min() >= 0 and flat.max() < len(LABELS)


@pytest.mark.parametrize("scheme", ["dirichlet0.5", "shards2"])
def test_non_iid_schemes_use_every_example(scheme):
    assert sorted(_flat(partition(LABELS, 10, scheme, seed=2))) == list(range(len(LABELS)))


def test_iid_parts_are_equal_and_balanced():
    parts = partition(LABELS, 10, "iid", seed=3)
    assert {len(p) for p in parts} == {600}
    hist = label_histogram(LABELS, parts)
    assert hist.min() > 30 and hist.max() < 90  # about 60 of each class per client


def test_shards_give_each_client_at_most_two_labels():
    hist = label_histogram(LABELS.sort().values, partition(LABELS.sort().values, 10, "shards2", seed=4))
    assert ((hist > 0).sum(axis=1) <= 2).all()


def test_small_alpha_is_more_skewed_than_large_alpha():
    def skew(alpha):
        hist = label_histogram(LABELS, partition(LABELS, 10, f"dirichlet{alpha}", seed=5)).astype(float)
        p = hist / hist.sum(axis=1, keepdims=True)
        return float(np.mean(p.max(axis=1)))  # share of each client's main class
    assert skew(0.1) > 0.5 > 0.2 > skew(100)


def test_same_seed_same_split_and_os_seed_differs():
    a = partition(LABELS, 5, "dirichlet0.5", seed=7)
    b = partition(LABELS, 5, "dirichlet0.5", seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c, d = partition(LABELS, 5, "iid"), partition(LABELS, 5, "iid")
    assert not all(torch.equal(x, y) for x, y in zip(c, d))


@given(per=st.integers(20, 60), clients=st.integers(1, 10), seed=st.integers(0, 2 ** 32))
@settings(max_examples=30, deadline=None)
def test_dirichlet_every_client_gets_data(per, clients, seed):
    n = per * clients
    labels = torch.from_numpy(np.random.default_rng(seed).integers(0, 4, n))
    parts = partition(labels, clients, "dirichlet1.0", seed=seed)
    assert sum(len(p) for p in parts) == n
    assert min(len(p) for p in parts) >= min(10, n // clients)


@pytest.mark.parametrize("text, message", [
    ("dirichlet0", "alpha must be a positive number"),
    ("dirichlet-1", "alpha must be a positive number"),
    ("zipf", "unknown partition 'zipf'"),
])
def test_bad_scheme_names_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        PartitionSpec.parse(text)


def test_parse_round_trips_names():
    for text in ("iid", "dirichlet0.5", "shards2", "dirichlet100"):
        assert PartitionSpec.parse(text).name == text


def test_too_few_examples_and_bad_labels():
    with pytest.raises(ValueError, match="fewer examples than clients"):
        partition(torch.arange(3), 5, "iid", seed=0)
    with pytest.raises(ValueError, match="1-D array"):
        partition(torch.zeros(10, 2, dtype=torch.long), 2, "iid", seed=0)
    with pytest.raises(ValueError, match="must be integers"):
        partition(torch.rand(10), 2, "iid", seed=0)
