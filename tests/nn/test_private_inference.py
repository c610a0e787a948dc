"""private_inference: who gets what (on the wire too), batching, and the errors of bad inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mpc_testing import RecordingHub, encodings, leaks, run_local, run_parties
from torch import nn

import veil
from veil.nn import from_torch
from veil.nn.infer import InputShapeError, check_input_shape, private_inference


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).eval()


def _distinctive(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Values of magnitude in [0.5, 2] with random signs and fractions: encodings unlike any mask's."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return sign * (0.5 + 1.5 * torch.rand(shape, generator=g))


def _program(session: veil.Session, model: Any, images: torch.Tensor, labels: torch.Tensor | None,
             batch_size: int, reveal: str) -> Any:
    alice = session.party == "alice"
    return private_inference(session, None if alice else model, images if alice else None, model_owner="bob",
                             data_owner="alice", labels=labels if alice else None, batch_size=batch_size,
                             reveal=reveal, progress=False)


@pytest.mark.parametrize("reveal", ["logits", "label"])
def test_predictions_and_accuracy_go_to_the_data_owner_only(reveal: str) -> None:
    module = small_cnn()
    images = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(images)
    labels = want.argmax(1).clone()
    labels[0] = (labels[0] + 1) % 4  # one wrong label: accuracy 6/7
    out = run_local(_program, from_torch(module), images, labels, 3, reveal)
    alice, bob = out["alice"], out["bob"]
    assert torch.equal(alice.predictions, want.argmax(1))
    assert alice.accuracy == pytest.approx(6 / 7)
    if reveal == "logits":
        assert float((alice.outputs - want).abs().max()) < 2e-3
    else:
        assert alice.outputs is None
    assert bob.predictions is None and bob.outputs is None and bob.accuracy is None
    assert alice.images == bob.images == 7
    # 3 batches (3 + 3 + 1); the label reveal adds the secure argmax over 4 classes (2 levels of 5 rounds)
    per_batch = 1 + 10 + 5 + 1 + 1 + (10 if reveal == "label" else 0)  # conv, 2x2 pool, relu, linear, reveal
    assert alice.traffic["rounds"] == bob.traffic["rounds"] == 3 * per_batch


@pytest.mark.parametrize("reveal", ["logits", "label"])
@pytest.mark.parametrize("head", ["sigmoid", "logit", "flat"])
def test_a_one_output_classifier_is_decided_by_its_threshold(reveal: str, head: str) -> None:
    # one score per input: above 0.5 after a final sigmoid, above 0 for a logit, (N,) or (N, 1)
    torch.manual_seed(2)
    layers: list[nn.Module] = [nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1)]
    layers += [nn.Sigmoid()] if head == "sigmoid" else [nn.Flatten(0)] if head == "flat" else []
    module = nn.Sequential(*layers).eval()
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        module[2].bias -= module[:3](x).median()  # about half of each class
        score = module(x).reshape(-1)
    want = (score > (0.5 if head == "sigmoid" else 0.0)).long()
    assert 10 < int(want.sum()) < 30
    keep = (score - (0.5 if head == "sigmoid" else 0.0)).abs() > 1e-2  # away from the fixed-point tie
    x, want = x[keep], want[keep]
    labels = want.clone()
    labels[0] = 1 - labels[0]
    alice = run_local(_program, from_torch(module), x, labels, 16, reveal)["alice"]
    assert torch.equal(alice.predictions, want)
    assert alice.accuracy == pytest.approx(1 - 1 / len(want))


def test_the_wire_carries_no_weight_to_the_data_owner_and_no_input_or_output_to_the_model_owner() -> None:
    module = small_cnn()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(_distinctive(p.numel(), tuple(p.shape)))
    images = _distinctive(5, (2, 1, 8, 8))
    with torch.no_grad():
        logits = module(images)
    run = run_parties(_program, from_torch(module), images, None, 2, "logits")
    assert not run.errors, run.errors
    hub = run.hub
    assert isinstance(hub, RecordingHub)
    got = run.results["alice"].outputs
    assert float((got - logits).abs().max()) < 2e-3  # it did compute the network
    weights = encodings(*[p.detach() for p in module.parameters()])
    to_alice = [f for f in hub.frames if f.receiver == "alice"]
    to_bob = [f for f in hub.frames if f.receiver == "bob"]
    assert to_alice and to_bob
    assert leaks(to_alice, weights) == []
    assert leaks(to_bob, encodings(images)) == []
    assert leaks(to_bob, encodings(got)) == []  # the revealed logits (as alice decoded them)


def test_check_input_shape_names_the_shape() -> None:
    graph = from_torch(small_cnn()).graph
    assert check_input_shape(graph, (1, 1, 8, 8)) == (1, 4)
    with pytest.raises(InputShapeError, match=r"shape \(1, 1, 10, 10\) do not fit the model"):
        check_input_shape(graph, (1, 1, 10, 10))


def _wrong_images(session: veil.Session, model: Any) -> Any:
    alice = session.party == "alice"
    images = torch.zeros(2, 1, 12, 12) if alice else None
    return private_inference(session, None if alice else model, images, model_owner="bob", data_owner="alice",
                             progress=False)


def test_images_of_the_wrong_size_fail_in_both_parties_with_a_clear_error() -> None:
    with pytest.raises(InputShapeError, match=r"shape \(1, 1, 12, 12\) do not fit the model"):
        run_local(_wrong_images, from_torch(small_cnn()))


def _nan_images(session: veil.Session, model: Any) -> Any:
    alice = session.party == "alice"
    images = torch.zeros(2, 1, 8, 8)
    images[1, 0, 3, 3] = float("nan")
    return private_inference(session, None if alice else model, images if alice else None, model_owner="bob",
                             data_owner="alice", progress=False)


def test_nan_inputs_are_refused_with_the_range_error() -> None:
    with pytest.raises(veil.EncodingError, match="NaN at 1 position"):
        run_local(_nan_images, from_torch(small_cnn()))


def test_owners_must_differ_and_exist() -> None:
    with pytest.raises(ValueError, match="must be different"):
        run_local(lambda s: private_inference(s, None, None, model_owner="bob", data_owner="bob"))
    with pytest.raises(ValueError, match="'carol' is not a compute party"):
        run_local(lambda s: private_inference(s, None, None, model_owner="carol", data_owner="bob"))


def test_labels_that_are_not_class_indices_are_refused_or_get_no_accuracy() -> None:
    module = small_cnn()
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"1 label\(s\) are not class indices \(e.g. -1\)"):
        run_local(_program, from_torch(module), images, torch.tensor([0, 1, -1, 2]), 4, "logits")
    with pytest.warns(UserWarning, match="no accuracy: label 11 is not one of the model's 4 classes"):
        alice = run_local(_program, from_torch(module), images, torch.tensor([0, 1, 11, 2]), 4, "logits")["alice"]
    assert alice.accuracy is None and alice.predictions.shape == (4,)
