"""Training on shares: one secure step equals the plaintext PyTorch step, for every layer, every loss
and both optimizers; the 3-10-1 network's loss curve tracks plaintext training.

Bob owns the initial model, alice the data and the targets. Bounds: a step moves each weight by
``lr * grad``; products and truncations leave gradients within ~1e-4 of PyTorch's here, the
approximations (sigmoid/tanh 1e-3, softmax 2e-3, exp 3e-3 relative) more, so each case states its
tolerance on the updated weights.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from mpc_testing import run_local
from torch import nn

import veil
from veil.nn import share_model
from veil.nn.losses import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, LossError, MSELoss, NLLLoss
from veil.nn.optim import SGD, Adam, adam_reference

LOSSES: dict[str, Any] = {"mse": (MSELoss, F.mse_loss), "ce": (CrossEntropyLoss, F.cross_entropy),
                          "bce": (BCELoss, F.binary_cross_entropy),
                          "bce_logits": (BCEWithLogitsLoss, F.binary_cross_entropy_with_logits),
                          "nll": (NLLLoss, F.nll_loss)}


class _PlainAdam(torch.optim.Optimizer):
    """veil.nn.optim.Adam's rule (eps inside the root) in plaintext."""

    def __init__(self, params: Any, **kw: Any) -> None:
        super().__init__(params, kw)
        self.t, self.moments = 0, {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self.t += 1
        ps = [p for group in self.param_groups for p in group["params"]]
        adam_reference(ps, [p.grad for p in ps], self.moments, step=self.t, **self.defaults)


def _make_opt(kind: str, params: Any, secure: bool) -> Any:
    if kind == "sgd":
        return (SGD if secure else torch.optim.SGD)(params, lr=0.5, momentum=0.9, weight_decay=0.01)
    return (Adam if secure else _PlainAdam)(params, lr=0.01, eps=1e-3, weight_decay=0.01)


def _secure_steps(session: veil.Session, module: nn.Module, x: torch.Tensor, t: torch.Tensor, loss: str,
                  opt: str, steps: int) -> Any:
    alice = session.party == "alice"
    net = share_model(session, None if alice else module, owner="bob", training=True)
    xs = session.share(x if alice else None, owner="alice")
    ts = session.share(t if alice else None, owner="alice")
    optimizer = _make_opt(opt, net.parameters(), True)
    value = None
    for _ in range(steps):
        optimizer.zero_grad()
        out = LOSSES[loss][0]()(net(xs), ts)
        out.backward()
        optimizer.step()
        value = out.reveal(to="alice")
    return net.reveal_state_dict(to="alice"), value


def _plain_steps(module: nn.Module, x: torch.Tensor, t: torch.Tensor, loss: str, opt: str,
                 steps: int) -> tuple[dict[str, torch.Tensor], float]:
    ref = copy.deepcopy(module)
    optimizer = _make_opt(opt, ref.parameters(), False)
    target = t.argmax(1) if loss in ("ce", "nll") else t
    value = 0.0
    for _ in range(steps):
        optimizer.zero_grad()
        out = LOSSES[loss][1](ref(x), target)
        out.backward()
        optimizer.step()
        value = out.item()
    return ref.state_dict(), value


def check_step(module: nn.Module, x: torch.Tensor, t: torch.Tensor, *, loss: str = "mse", opt: str = "sgd",
               steps: int = 1, atol: float = 1e-3, loss_atol: float | None = None) -> None:
    module.eval()
    got, got_loss = run_local(_secure_steps, module, x, t, loss, opt, steps)["alice"]
    want, want_loss = _plain_steps(module, x, t, loss, opt, steps)
    assert got.keys() == want.keys()
    for k in want:
        err = float((got[k] - want[k]).abs().max())
        assert err <= atol, f"{k}: max abs error {err:.2e} > {atol:.0e} after {steps} {opt} step(s)"
    if loss_atol is not None:  # the loss of the last step's forward, revealed to alice
        assert abs(got_loss - want_loss) <= loss_atol, (got_loss, want_loss)


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


CONV_HEAD = (nn.Flatten(),)
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], float]] = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 4)), (5, 6), 1e-3),
    "linear_3d_input": (lambda: nn.Sequential(nn.Linear(6, 3)), (2, 4, 6), 1e-3),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(27, 2)), (2, 2, 5, 5), 1e-3),
    "conv2d_stride_padding": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Flatten(),
                                                    nn.Linear(27, 2)), (2, 2, 6, 6), 1e-3),
    "conv2d_groups_dilation": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, dilation=2), nn.Flatten(),
                                                     nn.Linear(16, 2)), (2, 4, 6, 6), 1e-3),
    "relu": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)), (5, 6), 1e-3),
    "maxpool2d": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)),
                  (3, 1, 6, 6), 1e-3),
    "maxpool2d_3_s2_p1": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(3, stride=2, padding=1),
                                                nn.Flatten(), nn.Linear(18, 2)), (3, 1, 7, 7), 1e-3),
    "relu_maxpool": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                           nn.Linear(8, 2)), (3, 1, 6, 6), 1e-3),
    "avgpool2d": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 2)),
                  (3, 1, 6, 6), 1e-3),
    "adaptive_avgpool": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d((2, 3)), nn.Flatten(),
                                               nn.Linear(12, 2)), (3, 1, 7, 6), 1e-3),
    "sigmoid": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 2)), (5, 6), 3e-3),
    "tanh": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)), (5, 6), 3e-3),
    "softmax": (lambda: nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=1)), (5, 6), 5e-3),
    "dropout_identity": (lambda: nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5), nn.Linear(4, 2)), (5, 6), 1e-3),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_one_sgd_step_through_each_layer_matches_pytorch(name: str) -> None:
    build, shape, atol = LAYERS[name]
    seed = zlib.crc32(name.encode())
    module = _seeded(seed, build)
    x = _randn(seed + 1, *shape)
    with torch.no_grad():
        t = _randn(seed + 2, *module(x).shape)
    check_step(module, x, t, atol=atol)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x)) + x  # residual add
        z = torch.cat([h, self.b(x) * x], dim=1)  # cat, secret product
        return self.out(z.view(z.size(0), -1) - 0.5)


def test_residual_cat_and_products_train_like_pytorch() -> None:
    module = _seeded(5, Residual)
    check_step(module, _randn(6, 5, 4), _randn(7, 5, 2), atol=2e-3)


@pytest.mark.parametrize("loss", ["mse", "ce", "bce", "bce_logits", "nll"])
def test_each_loss_gives_pytorchs_gradient_and_value(loss: str) -> None:
    head: list[nn.Module] = {"bce": [nn.Sigmoid()], "nll": [nn.LogSoftmax(dim=1)]}.get(loss, [])
    module = _seeded(8, lambda: nn.Sequential(nn.Linear(6, 4), *head))
    x = _randn(9, 6, 6)
    if loss in ("ce", "nll"):
        t = F.one_hot(torch.tensor([0, 3, 1, 1, 2, 3]), 4).float()
    elif loss.startswith("bce"):
        t = (torch.rand(6, 4, generator=torch.Generator().manual_seed(10)) < 0.5).float()
    else:
        t = _randn(11, 6, 4)
    check_step(module, x, t, loss=loss, atol=3e-3, loss_atol=1e-2)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_both_optimizers_over_three_steps(opt: str) -> None:
    module = _seeded(12, lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)))
    # Adam divides by sqrt(v): a gradient error d moves a weight by up to lr d / eps, so it is checked
    # with MSE (gradients within ~1e-5), SGD with momentum and weight decay at lr 0.5
    check_step(module, _randn(13, 8, 5), _randn(14, 8, 3), opt=opt, steps=3, atol=5e-4)


def test_losses_refuse_outputs_without_a_training_forward() -> None:
    def program(session: veil.Session) -> str:
        y = session.share(torch.zeros(2, 3) if session.party == "alice" else None, owner="alice")
        try:
            MSELoss()(y, torch.zeros(2, 3))
        except LossError as e:
            return str(e)
        return "no error"

    assert "no tape; call model.train()" in run_local(program)["alice"]


def _two_owner_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, generator=g)
    y = ((x @ torch.tensor([1.5, -2.0, 0.7]) + 0.3 * torch.randn(256, generator=g)) > 0).float().unsqueeze(1)
    return x, y


def _small_net() -> nn.Module:
    return _seeded(1, lambda: nn.Sequential(nn.Linear(3, 10), nn.ReLU(), nn.Linear(10, 1), nn.Sigmoid()))


def _small_training(session: veil.Session, epochs: int) -> list[float]:
    x, y = _two_owner_data()
    half = len(x) // 2
    mine = slice(0, half) if session.party == "alice" else slice(half, None)
    parts = {p: (session.share(x[mine] if session.party == p else None, owner=p),
                 session.share(y[mine] if session.party == p else None, owner=p)) for p in ("alice", "bob")}
    xs = veil.cat([parts["alice"][0], parts["bob"][0]])
    ys = veil.cat([parts["alice"][1], parts["bob"][1]])
    net = share_model(session, _small_net() if session.party == "alice" else None, owner="alice", training=True)
    opt = SGD(net.parameters(), lr=0.1)
    curve = []
    for _ in range(epochs):
        total = 0.0
        for i in range(0, len(x), 32):
            opt.zero_grad()
            loss = BCELoss()(net(xs[i:i + 32]), ys[i:i + 32])
            loss.backward()
            opt.step()
            total += float(loss.reveal(to=["alice", "bob"])) * len(xs[i:i + 32])
        curve.append(total / len(x))
    return curve


def test_small_network_loss_curve_tracks_plaintext_within_0_02() -> None:
    x, y = _two_owner_data()
    model = _small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plain = []
    for _ in range(4):
        total = 0.0
        for i in range(0, len(x), 32):
            opt.zero_grad()
            loss = F.binary_cross_entropy(model(x[i:i + 32]), y[i:i + 32])
            loss.backward()
            opt.step()
            total += loss.item() * len(x[i:i + 32])
        plain.append(total / len(x))
    secure = run_local(_small_training, 4)["alice"]
    assert plain[-1] < plain[0] - 0.05  # it learns
    for epoch, (s, p) in enumerate(zip(secure, plain)):
        assert abs(s - p) <= 0.02, f"epoch {epoch}: secure loss {s:.4f}, plaintext {p:.4f}"


def _bn_model() -> nn.Module:
    return _seeded(30, lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                             nn.Linear(36, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)))


def test_batch_norm_trains_with_batch_statistics_like_pytorch() -> None:
    module = _bn_model()
    x, t = _randn(31, 8, 2, 5, 5) * 2 + 0.5, _randn(32, 8, 2)
    got, _ = run_local(_secure_steps, module, x, t, "mse", "sgd", 2)["alice"]
    ref = copy.deepcopy(module).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(ref(x), t).backward()
        opt.step()
    want = ref.state_dict()
    assert got.keys() == want.keys()  # running statistics and num_batches_tracked included
    for k in want:
        err = float((got[k].double() - want[k].double()).abs().max())
        assert err <= 1e-2, f"{k}: max abs error {err:.2e}"
    assert int(got["1.num_batches_tracked"]) == 2


def test_batch_norm_refuses_to_train_on_a_batch_of_one_row() -> None:
    # PyTorch's "Expected more than 1 value per channel": the variance of one value is 0 and rsqrt would saturate
    module = _bn_model()

    def program(session: veil.Session) -> Any:
        net = share_model(session, module if session.party == "bob" else None, owner="bob", training=True)
        return net(session.share(_randn(36, 1, 2, 5, 5) if session.party == "alice" else None, owner="alice"))

    with pytest.raises(ValueError, match=r"BatchNorm '5': training needs more than one value per channel.*\(1, 5\)"):
        run_local(program)


def test_a_trainable_batch_norm_in_eval_mode_uses_the_running_statistics() -> None:
    module = _bn_model()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(33))
            m.running_var.uniform_(0.2, 3.0, generator=torch.Generator().manual_seed(34))
    x = _randn(35, 4, 2, 5, 5)

    def program(session: veil.Session) -> Any:
        net = share_model(session, module if session.party == "bob" else None, owner="bob", training=True).eval()
        return net(session.share(x if session.party == "alice" else None, owner="alice")).reveal(to="alice")

    with torch.no_grad():
        want = module.eval()(x)
    got = run_local(program)["alice"]
    assert float((got - want).abs().max()) < 1e-2
