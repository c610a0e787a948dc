"""Plaintext reference models (veil.nn.zoo): LeNet's shape and fx-traceability, training on a subset of
MNIST, evaluate against a hand count, and train_lenet's atomic weights file and JSON sidecar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from veil.data import load_mnist
from veil.nn.zoo import ARCHITECTURES, LeNet, evaluate, train_lenet, train_plaintext


def _lenet(seed: int) -> LeNet:
    """A LeNet with reproducible initial weights, without touching torch's global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LeNet()


@pytest.fixture(scope="module")
def small_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2,000 training and 1,000 test images, normalised."""
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    return train_x[:2000], train_y[:2000], test_x[:1000], test_y[:1000]


def test_lenet_shape_and_parameters() -> None:
    model = _lenet(0)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 16 * 25 + 16 + 16 * 16 * 25 + 16 + 256 * 100 + 100 + 1010
    assert model.fc1 is model[7]
    kinds = [type(m) for m in model]
    assert kinds == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.MaxPool2d, torch.nn.Conv2d, torch.nn.ReLU,
                     torch.nn.MaxPool2d, torch.nn.Flatten, torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]


def test_architectures_build_fresh_models() -> None:
    a, b = ARCHITECTURES["lenet"](), ARCHITECTURES["lenet"]()
    assert isinstance(a, LeNet) and a is not b


def test_lenet_is_fx_traceable() -> None:
    model = _lenet(1)
    traced = torch.fx.symbolic_trace(model)
    called = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert called == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2"]
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_train_plaintext_learns_a_subset(small_mnist) -> None:
    train_x, train_y, test_x, test_y = small_mnist
    model = _lenet(2)
    # One short epoch (the cosine takes the rate to 0 after it): small batches and a higher rate give
    # 0.89-0.91 over initial weights and orders, where the defaults (64, 1e-3) give 0.6-0.75.
    losses = train_plaintext(model, train_x, train_y, epochs=1, batch_size=16, lr=3e-3, progress=False, seed=0)
    assert len(losses) == 1 and 0 < losses[0] < 2.3  # below ln(10), the loss of a uniform guess
    assert evaluate(model, test_x, test_y) > 0.80


def test_train_plaintext_seed_fixes_the_order(small_mnist) -> None:
    train_x, train_y, _, _ = small_mnist
    runs = []
    for _ in range(2):
        model = _lenet(3)
        runs.append(train_plaintext(model, train_x[:256], train_y[:256], epochs=1, batch_size=64,
                                    progress=False, seed=5))
    assert runs[0] == runs[1]


def test_evaluate_matches_a_hand_count(small_mnist) -> None:
    _, _, test_x, test_y = small_mnist
    model = _lenet(4)
    model.train()
    x, y = test_x[:333], test_y[:333]
    accuracy = evaluate(model, x, y, batch_size=100)  # batches that do not divide the count
    with torch.no_grad():
        expected = (model(x).argmax(dim=1) == y).float().mean().item()
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(expected, abs=1e-9)
    assert model.training  # the mode is restored
    assert evaluate(model, x, model(x).argmax(dim=1)) == 1.0


def test_train_plaintext_rejects_bad_arguments(small_mnist) -> None:
    train_x, train_y, _, _ = small_mnist
    with pytest.raises(ValueError, match="same, non-zero number"):
        train_plaintext(_lenet(0), train_x[:10], train_y[:9], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train_plaintext(_lenet(0), train_x[:10], train_y[:10], batch_size=0, progress=False)


def _write_small_npz(path: Path, n_train: int, n_test: int) -> None:
    """A Keras-layout mnist.npz with the first images of each split (original pixel bytes)."""
    arrays: dict[str, Any] = {}
    for split, n, (kx, ky) in (("train", n_train, ("x_train", "y_train")), ("test", n_test, ("x_test", "y_test"))):
        x, y = load_mnist(split, normalize=False)  # type: ignore[arg-type]
        arrays[kx] = (x[:n, 0] * 255).round().to(torch.uint8).numpy()
        arrays[ky] = y[:n].to(torch.uint8).numpy()
    np.savez(path, **arrays)


def test_train_lenet_saves_weights_and_sidecar_atomically(tmp_path: Path) -> None:
    data = tmp_path / "mnist.npz"
    _write_small_npz(data, n_train=1000, n_test=500)
    out = tmp_path / "models" / "lenet.pt"
    info = train_lenet(out, epochs=1, data_path=data, progress=False)

    assert sorted(p.name for p in out.parent.iterdir()) == ["lenet.json", "lenet.pt"]  # no temporary files
    assert json.loads(out.with_suffix(".json").read_text()) == info
    assert info["epochs"] == 1 and info["train_images"] == 1000 and info["test_images"] == 500
    assert info["normalization"] == {"mean": 0.1307, "std": 0.3081}
    assert 0.0 <= info["accuracy"] <= 1.0 and info["seconds"] > 0 and len(info["losses"]) == 1

    model = LeNet()
    model.load_state_dict(torch.load(out, weights_only=True))
    test_x, test_y = load_mnist("test", path=data)
    assert evaluate(model, test_x, test_y) == info["accuracy"]


def test_train_lenet_refuses_a_json_weights_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sidecar"):
        train_lenet(tmp_path / "lenet.json", epochs=0, progress=False)


@pytest.mark.slow
def test_train_lenet_reaches_98_4_percent_in_5_epochs(tmp_path: Path) -> None:
    info = train_lenet(tmp_path / "lenet.pt", epochs=5, progress=False)
    assert info["accuracy"] >= 0.984, info
