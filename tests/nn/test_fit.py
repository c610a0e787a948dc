"""veil.nn.fit: the training loop, private evaluation, checkpoints, kill-and-resume, tampered checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mpc_testing import run_local
from torch import nn

import veil
from veil.nn import BCELoss, CrossEntropyLoss, TensorDataset, evaluate, fit, plot_history, share_model
from veil.nn.checkpoint import CheckpointError
from veil.nn.optim import SGD, Adam


def _blobs(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 4-D: an easy, real classification problem."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0, 0, 1], [-2.0, 1, 0, 0], [0, -2.0, 1, 0]])
    y = torch.arange(n) % 3
    return centers[y] + 0.6 * torch.randn(n, 4, generator=g), y


def _net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _shared_data(session: veil.Session, x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    alice = session.party == "alice"
    return TensorDataset(session, session.share(x if alice else None, owner="alice"),
                         session.share(y.double() if alice else None, owner="alice"))


class Crash(RuntimeError):
    pass


def _train(session: veil.Session, epochs: int, ckpt: str | None, resume: bool, crash_at: tuple[int, int] | None,
           opt: str = "sgd") -> Any:
    x, y = _blobs()
    xt, yt = _blobs(90, seed=1)
    net = share_model(session, _net() if session.party == "bob" else None, owner="bob", training=True)
    optimizer = SGD(net.parameters(), lr=0.1, momentum=0.9) if opt == "sgd" else Adam(net.parameters(), lr=0.01)

    def on_batch(epoch: int, step: int) -> None:
        if crash_at == (epoch, step):
            raise Crash(f"killed in epoch {epoch}, batch {step}")

    history = fit(session, net, _shared_data(session, x, y), epochs=epochs, batch_size=32, optimizer=optimizer,
                  loss_fn=CrossEntropyLoss(), test_data=_shared_data(session, xt, yt), reveal_to=["alice"],
                  loss_every=4, checkpoint_dir=ckpt, resume=resume, progress=False, on_batch=on_batch,
                  seed=b"a fixed batch order for the test")
    return history, net.reveal_state_dict(to="alice")


def test_fit_learns_and_reveals_only_to_the_chosen_parties(tmp_path: Path) -> None:
    out = run_local(_train, 3, None, False, None)
    (hist_a, weights), (hist_b, none) = out["alice"], out["bob"]
    assert none is None and weights is not None
    accs = [e.test_accuracy for e in hist_a.epochs]
    assert accs[-1] is not None and accs[-1] >= 0.9, accs
    assert all(e.test_accuracy is None and e.loss is None for e in hist_b.epochs)  # bob sees nothing
    losses = [e.loss for e in hist_a.epochs]
    assert losses[-1] < losses[0]
    # the revealed weights are a real model: plaintext accuracy on the test blobs matches
    model = _net()
    model.load_state_dict(weights)
    xt, yt = _blobs(90, seed=1)
    with torch.no_grad():
        plain = float((model(xt).argmax(1) == yt).double().mean())
    assert abs(plain - accs[-1]) <= 1 / 90
    png = plot_history(hist_a, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path: Path, opt: str) -> None:
    whole = run_local(_train, 3, str(tmp_path / "a"), False, None, opt)["alice"][1]
    with pytest.raises(Crash, match="killed in epoch 2"):
        run_local(_train, 3, str(tmp_path / "b"), False, (2, 3), opt)
    saved = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert saved == ["checkpoint-0001.alice.veilckpt", "checkpoint-0001.bob.veilckpt"]  # epoch 2 was lost
    hist, resumed = run_local(_train, 3, str(tmp_path / "b"), True, None, opt)["alice"]
    assert hist.resumed_from == 1 and [e.epoch for e in hist.epochs] == [1, 2, 3]
    # same batches in the same order from the same state: only the truncation's +-1 ulp per product
    # (which depends on the random shares) differs; Adam's division by sqrt(v) amplifies it (lr / eps = 10)
    atol = 1e-3 if opt == "sgd" else 1e-2
    for k in whole:
        assert float((resumed[k] - whole[k]).abs().max()) < atol, k


def test_a_tampered_checkpoint_is_refused(tmp_path: Path) -> None:
    run_local(_train, 1, str(tmp_path), False, None)
    path = tmp_path / "checkpoint-0001.bob.veilckpt"
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="digest mismatch"):
        run_local(_train, 2, str(tmp_path), True, None)


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    run_local(_train, 1, str(tmp_path), False, None)

    def other(session: veil.Session) -> Any:
        x, y = _blobs()
        module = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
        net = share_model(session, module if session.party == "bob" else None, owner="bob", training=True)
        return fit(session, net, _shared_data(session, x, y), epochs=2, batch_size=32,
                   optimizer=SGD(net.parameters(), lr=0.1), loss_fn=CrossEntropyLoss(), checkpoint_dir=str(tmp_path),
                   resume=True, progress=False)

    with pytest.raises(CheckpointError, match="another architecture"):
        run_local(other)


def test_evaluate_reveals_only_the_accuracy() -> None:
    def program(session: veil.Session) -> Any:
        x, y = _blobs(60)
        model = nn.Sequential(nn.Linear(4, 3))
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0.5, 0, 0], [0, -1.0, 0.5, 0]]))
            model[0].bias.zero_()
        net = share_model(session, model if session.party == "bob" else None, owner="bob")
        return evaluate(session, net, _shared_data(session, x, y), batch_size=16, reveal_to=["bob"])

    out = run_local(program)
    x, y = _blobs(60)
    w = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0.5, 0, 0], [0, -1.0, 0.5, 0]])
    want = float(((x @ w.t()).argmax(1) == y).double().mean())
    assert out["alice"] is None and out["bob"] == pytest.approx(want)


def test_fit_checks_its_arguments() -> None:
    def program(session: veil.Session) -> str:
        x, y = _blobs(30)
        net = share_model(session, _net() if session.party == "bob" else None, owner="bob", training=True)
        try:
            fit(session, net, _shared_data(session, x, y), epochs=1, batch_size=8, optimizer=SGD(net.parameters(),
                lr=0.1), loss_fn=BCELoss(), reveal_to=["carol"], progress=False)
        except ValueError as e:
            return str(e)
        return "no error"

    assert "reveal_to names ['carol']" in run_local(program)["alice"]


def test_evaluate_thresholds_a_single_output_binary_classifier() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 3, generator=g)
    y = (x[:, 0] > 0.2).double()
    model = nn.Sequential(nn.Linear(3, 1), nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, 0.3, 0.0]]))
        model[0].bias.fill_(-0.1)

    def program(session: veil.Session) -> Any:
        net = share_model(session, model if session.party == "bob" else None, owner="bob")
        return evaluate(session, net, _shared_data(session, x, y), batch_size=16, reveal_to=["alice"])

    with torch.no_grad():
        want = float(((model(x).reshape(-1) > 0.5).double() == y).double().mean())
    assert 0.5 < want < 1.0  # neither trivial nor perfect: the threshold matters
    assert run_local(program)["alice"] == pytest.approx(want)
