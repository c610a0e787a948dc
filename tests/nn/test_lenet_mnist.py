"""LeNet on MNIST on shares: private predictions agree with plaintext PyTorch.

Fast suite: a LeNet trained here for one epoch on 12,000 images (a few seconds), 300 test images on
shares: at most one disagreement, and the same accuracy within one image. ``slow`` (``make
test-all``): the 5-epoch LeNet (cached in .cache/ or trained, < 1 min), all 10,000 test images over
real party processes: agreement >= 99.9% and accuracy within 0.05 percentage points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mpc_testing import run_local

import veil
from veil.data import load_mnist
from veil.nn import from_torch, private_inference
from veil.nn.zoo import LeNet, train_lenet, train_plaintext

WEIGHTS = Path(__file__).resolve().parents[2] / ".cache" / "lenet-mnist.pt"


def _program(session: veil.Session, model: Any, images: torch.Tensor, batch_size: int) -> Any:
    alice = session.party == "alice"
    r = private_inference(session, None if alice else model, images if alice else None, model_owner="bob",
                          data_owner="alice", batch_size=batch_size, progress=False)
    return r.predictions


def _plain_predictions(module: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(images).argmax(1)


@pytest.fixture(scope="module")
def quick_lenet() -> LeNet:
    x, y = load_mnist("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LeNet()
    train_plaintext(model, x[:12_000], y[:12_000], epochs=1, batch_size=32, lr=2e-3, progress=False, seed=0)
    return model.eval()


def test_private_lenet_agrees_with_plaintext_on_300_test_images(quick_lenet: LeNet) -> None:
    images, labels = load_mnist("test")
    images, labels = images[:300], labels[:300]
    want = _plain_predictions(quick_lenet, images)
    assert float((want == labels).double().mean()) > 0.9  # a real, trained model
    got = run_local(_program, from_torch(quick_lenet), images, 100)["alice"]
    disagree = int((got != want).sum())
    assert disagree <= 1, f"{disagree} of 300 private predictions differ from plaintext"
    acc_gap = abs(int((got == labels).sum()) - int((want == labels).sum()))
    assert acc_gap <= 1


def _full_program(session: veil.Session, weights: str) -> Any:
    model = None
    if session.party == "bob":
        model = LeNet()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    images = load_mnist("test")[0] if session.party == "alice" else None
    r = private_inference(session, model, images, model_owner="bob", data_owner="alice", batch_size=1000,
                          progress=False)
    return r.predictions


@pytest.mark.slow
def test_private_lenet_on_the_whole_test_set() -> None:
    if not WEIGHTS.is_file():
        train_lenet(WEIGHTS, progress=False)
    module = LeNet()
    module.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    images, labels = load_mnist("test")
    want = _plain_predictions(module, images)
    got = veil.launch(_full_program, str(WEIGHTS), timeout=600)["alice"]
    agreement = float((got == want).double().mean())
    assert agreement >= 0.999, f"agreement {agreement:.4%}"
    gap = abs(float((got == labels).double().mean()) - float((want == labels).double().mean()))
    assert gap <= 0.0005, f"accuracy gap {100 * gap:.3f} percentage points"
    assert float((want == labels).double().mean()) >= 0.984
