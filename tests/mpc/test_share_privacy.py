"""A party's share tells nothing: a classifier trained on one party's shares of MNIST images does no
better than chance.

Setup. Alice secret-shares 8,000 MNIST images with the real engine (``veil.launch``, in-process
transport): 6,000 training images and a class-balanced test set of 200 images per class (n = 2,000).
Each compute party returns its raw int64 share: bob's is the mask drawn from the pair PRG, alice's is
``encode(x) - mask``. The adversary is stronger than a real one: it sees one party's shares of all
8,000 images *and* their labels, and trains a one-hidden-layer MLP on the training shares, under three
featurizations of the 64-bit words (all 8 bytes; the high 16 bits, where the sign would show; the low
24 bits, where a 16-fractional-bit pixel lives).

The bound. If the features are independent of the labels (a perfect sharing), the trained classifier's
predictions on the test set are independent of the test labels: each prediction is right with
probability pi(y_i), where pi is the classifier's distribution of predictions. The test set being
balanced, E[accuracy] = sum_c pi_c / 10 = 0.1 whatever pi is, and
Var = (1/n) * 0.1 * (1 - sum_c pi_c^2) <= 0.1 * 0.9 / n. We assert accuracy < 0.1 + 4 sqrt(0.09 / n)
= 0.1268: a false alarm has probability ~3e-5 by the normal approximation (at most 7e-4 by Bernstein's
inequality) per assertion.

Controls, in the same test, so that the assertion below the bound is not vacuous: the same classifier
on the same featurization of the *plaintext* ring encoding (a "share" with no mask) must reach > 0.85,
as must the classifier on plaintext pixels; and where a featurization sees the low bits, a reused mask
(one mask for every image: a two-time pad) must be caught (> 0.5, far above the bound).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch

import veil
from veil.data import load_mnist
from veil.ring import FixedPoint

N_TRAIN = 6000
TEST_PER_CLASS = 200
N_TEST = 10 * TEST_PER_CLASS
CHANCE = 0.1
BOUND = CHANCE + 4 * math.sqrt(CHANCE * (1 - CHANCE) / N_TEST)  # 0.1268, see the module docstring
CONTROL = 0.85


@dataclass(frozen=True)
class Shares:
    pixels: torch.Tensor  # (8000, 784) float32, normalised: plaintext
    labels: torch.Tensor  # (8000,) int64: the first N_TRAIN are for training, the rest for testing
    plain_ring: torch.Tensor  # (8000, 784) int64: fixed-point encoding of the pixels, no mask
    alice: torch.Tensor  # alice's share: plain_ring - mask
    bob: torch.Tensor  # bob's share: the mask


def _share_images(session: veil.Session, images: torch.Tensor) -> torch.Tensor:
    x = session.share(images if session.party == "alice" else None, owner="alice")
    return x.share


@pytest.fixture(scope="module")
def shares() -> Shares:
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    balanced = torch.cat([torch.nonzero(test_y == c)[:TEST_PER_CLASS, 0] for c in range(10)])
    images = torch.cat([train_x[:N_TRAIN], test_x[balanced]])
    labels = torch.cat([train_y[:N_TRAIN], test_y[balanced]])
    result = veil.launch(_share_images, images, transport="local")
    n = len(images)
    alice, bob = result["alice"].reshape(n, -1), result["bob"].reshape(n, -1)
    plain_ring = FixedPoint().encode(images).reshape(n, -1)
    assert alice.dtype == bob.dtype == torch.int64
    assert torch.equal(alice + bob, plain_ring)  # it is a sharing of the images
    return Shares(images.reshape(n, -1), labels, plain_ring, alice, bob)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Small matmuls on a loaded 2-core machine: one thread is faster and steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _held_out_accuracy(features: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> float:
    """Train a d -> 64 -> 10 MLP (d <= 784 * 8; Adam, 5 epochs, batches of 100) on the first N_TRAIN
    rows; return its accuracy on the rest. Features are standardised with training statistics."""
    g = torch.Generator().manual_seed(seed)
    train, test = features[:N_TRAIN], features[N_TRAIN:]
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    d, hidden = train.shape[1], 64
    w1 = (torch.randn(d, hidden, generator=g) / math.sqrt(d)).requires_grad_()
    w2 = (torch.randn(hidden, 10, generator=g) / math.sqrt(hidden)).requires_grad_()
    b1, b2 = torch.zeros(hidden, requires_grad=True), torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=1e-3)
    train_y = labels[:N_TRAIN]
    for _ in range(5):
        order = torch.randperm(N_TRAIN, generator=g)
        for i in range(0, N_TRAIN, 100):
            batch = order[i:i + 100]
            logits = torch.relu(train[batch] @ w1 + b1) @ w2 + b2
            loss = torch.nn.functional.cross_entropy(logits, train_y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        predicted = (torch.relu(test @ w1 + b1) @ w2 + b2).argmax(1)
    return (predicted == labels[N_TRAIN:]).float().mean().item()


def _all_bytes(s: torch.Tensor) -> torch.Tensor:
    return s.contiguous().view(torch.uint8).float() / 255  # (N, 784 * 8)


def _high16(s: torch.Tensor) -> torch.Tensor:
    return (s >> 48).float() / 2**15  # signed: in [-1, 1)


def _low24(s: torch.Tensor) -> torch.Tensor:
    return (s & 0xFFFFFF).float() / 2**24  # in [0, 1)


FEATURIZATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    # name: (featurize, whether it sees the low bits where a reused mask leaks)
    "bytes": (_all_bytes, True),
    "high16": (_high16, False),
    "low24": (_low24, True),
}


def test_classifier_learns_plaintext_pixels(shares: Shares) -> None:
    assert _held_out_accuracy(shares.pixels, shares.labels) > CONTROL


@pytest.mark.parametrize("name", list(FEATURIZATIONS))
def test_one_party_share_is_no_better_than_chance(shares: Shares, name: str) -> None:
    featurize, sees_low_bits = FEATURIZATIONS[name]
    plain = _held_out_accuracy(featurize(shares.plain_ring), shares.labels)
    assert plain > CONTROL, f"control: {name} of the plaintext encoding reached only {plain:.3f}"
    if sees_low_bits:
        reused = shares.plain_ring - shares.bob[:1]  # one mask for all images: must leak
        leak = _held_out_accuracy(featurize(reused), shares.labels)
        assert leak > 0.5, f"control: {name} did not catch a reused mask ({leak:.3f})"
    for party in ("alice", "bob"):
        acc = _held_out_accuracy(featurize(getattr(shares, party)), shares.labels)
        assert acc < BOUND, f"a classifier on {party}'s shares ({name}) reached {acc:.3f} >= {BOUND:.4f}"
