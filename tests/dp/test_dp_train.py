"""DP-SGD through Opacus (veil.dp.train): calibration to a target epsilon, per-epoch accounting that agrees
with Opacus's own accountants, BatchNorm fixed with a warning, checkpoint and resume, saved privacy, errors."""

import itertools
import json
import math
import warnings

import pytest
import torch
from torch import nn

from veil.data.digits import load_digits
from veil.dp.models import ScatterFeatures, build
from veil.dp.train import (
    DPSGDConfig,
    DPTrainingError,
    calibrate_noise,
    load_dp_model,
    prepare_model,
    save_dp_model,
    spent_epsilon,
    train_dp,
)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def _quick(**kw) -> DPSGDConfig:
    base = {"target_epsilon": 4.0, "delta": 1e-4, "epochs": 6, "batch_size": 200, "lr": 2.0, "max_grad_norm": 1.0}
    return DPSGDConfig(**(base | kw))


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_run_spends_at_most_its_target_and_learns(digits, accountant):
    torch.manual_seed(1)
    train, test = digits
    result = train_dp(_mlp(), train, config=_quick(accountant=accountant), test=test, progress=False)
    # calibrated: at most the target, and not wastefully below it (Opacus bisects to 0.01)
    assert result.epsilon <= 4.0
    assert result.epsilon > 3.9
    eps = [r.epsilon for r in result.history]
    assert len(eps) == 6 and all(a < b for a, b in itertools.pairwise(eps))
    # the reported epsilon is the accountant's for the steps actually taken: 6 epochs of round(1400/200)
    assert result.steps == 6 * 7
    assert result.epsilon == pytest.approx(
        spent_epsilon([(result.noise_multiplier, 200 / 1400, result.steps)], 1e-4, accountant), rel=1e-9)
    # PRV is the tighter accountant of the two
    last = result.history[-1]
    assert last.epsilon_prv <= last.epsilon_rdp + 1e-6
    assert result.test_accuracy is not None and result.test_accuracy > 0.75


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_calibrating_noise_for_delta_zero_is_refused_by_name():
    # pure epsilon-DP is out of reach for Gaussian noise: the error names delta, not a division by zero
    with pytest.raises(ValueError, match=r"delta must satisfy 0 < delta < 1, got 0"):
        calibrate_noise(target_epsilon=1.0, delta=0, sample_rate=0.01, steps=100)


def test_calibrated_noise_matches_opacus_and_grows_with_privacy():
    from opacus.accountants.utils import get_noise_multiplier

    q, steps = 256 / 60000, 60 * 234
    sigma = calibrate_noise(target_epsilon=3.0, delta=1e-5, sample_rate=q, steps=steps, accountant="rdp")
    assert sigma == pytest.approx(get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=q,
                                                       steps=steps, accountant="rdp"))
    assert spent_epsilon([(sigma, q, steps)], 1e-5, "rdp") <= 3.0
    # stronger privacy needs more noise
    assert calibrate_noise(target_epsilon=1.0, delta=1e-5, sample_rate=q, steps=steps, accountant="rdp") > sigma
    # Abadi et al. 2016's MNIST setting: q = 0.01, sigma = 4, 10,000 steps is about epsilon 1.26 at delta 1e-5
    # by the moments accountant; RDP (which is tighter) gives less, PRV less again
    rdp = spent_epsilon([(4.0, 0.01, 10_000)], 1e-5, "rdp")
    prv = spent_epsilon([(4.0, 0.01, 10_000)], 1e-5, "prv")
    assert 0.5 < prv <= rdp < 1.26


def test_batchnorm_is_replaced_with_a_warning(digits):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    with pytest.warns(UserWarning, match=r"BatchNorm2d -> GroupNorm"):
        fixed, fixes = prepare_model(model)
    assert fixes == ("1: BatchNorm2d -> GroupNorm",)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match="replaced as Opacus recommends"):
        result = train_dp(model, digits[0], config=_quick(epochs=1), progress=False)
    assert result.fixes == fixes


def test_frontend_is_applied_and_returned_with_the_model(digits):
    torch.manual_seed(3)
    head, frontend = build("scatter-linear", image_shape=(1, 8, 8))
    assert isinstance(frontend, ScatterFeatures) and frontend.output_shape(1) == (81, 2, 2)
    train, test = digits
    result = train_dp(head, train, config=_quick(epochs=4, max_grad_norm=0.1, lr=4.0), test=test,
                      frontend=frontend, progress=False)
    assert isinstance(result.model, nn.Sequential) and isinstance(result.model[0], ScatterFeatures)
    with torch.no_grad():
        acc = float((result.model(test[0]).argmax(1) == test[1]).float().mean())
    assert acc == pytest.approx(result.test_accuracy)
    assert acc > 0.75


def test_checkpoint_resume_gives_the_same_accounting(digits, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    config = _quick(epochs=3, noise_multiplier=1.3, target_epsilon=None)

    class Stop(Exception):
        pass

    def stop_after_first(record):
        if record.epoch == 1:
            raise Stop

    torch.manual_seed(4)
    with pytest.raises(Stop):
        train_dp(_mlp(), digits[0], config=config, checkpoint=ckpt, progress=False, on_epoch=stop_after_first)
    assert ckpt.exists()
    seen = []
    resumed = train_dp(_mlp(), digits[0], config=config, checkpoint=ckpt, progress=False,
                       on_epoch=lambda r: seen.append(r.epoch))
    assert seen == [2, 3]
    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    assert resumed.steps == 3 * 7
    assert resumed.epsilon == pytest.approx(spent_epsilon([(1.3, 200 / 1400, 21)], 1e-4, "prv"), rel=1e-9)
    # other settings refuse the checkpoint instead of mixing two runs' accounting
    with pytest.raises(DPTrainingError, match="other settings"):
        train_dp(_mlp(), digits[0], config=_quick(epochs=4, noise_multiplier=1.3, target_epsilon=None),
                 checkpoint=ckpt, progress=False)


def test_empty_poisson_batches_still_take_a_noise_step():
    torch.manual_seed(5)
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    config = DPSGDConfig(target_epsilon=None, noise_multiplier=1.0, delta=1e-3, epochs=2, batch_size=1, lr=0.1)
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    result = train_dp(model, (x, y), config=config, progress=False)
    assert result.steps == 2 * 40  # every step counted, empty ones included (about 37% of them)
    assert all(not torch.equal(a, b) for a, b in zip(before, result.model.parameters()))


def test_saved_model_carries_its_privacy(digits, tmp_path):
    torch.manual_seed(6)
    result = train_dp(_mlp(), digits[0], config=_quick(epochs=1), progress=False)
    path = save_dp_model(tmp_path / "m.pt", result, arch="mlp")
    payload = load_dp_model(path, _mlp())
    assert payload["privacy"]["epsilon"] == pytest.approx(result.epsilon)
    assert payload["privacy"]["delta"] == 1e-4 and payload["privacy"]["steps"] == 7
    assert json.loads(json.dumps(payload["summary"]))["history"][0]["epoch"] == 1
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(DPTrainingError, match="not a readable DP model file"):
        load_dp_model(tmp_path / "bad.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(DPTrainingError, match="not a Veil DP model file"):
        load_dp_model(tmp_path / "other.pt")


@pytest.mark.parametrize(("kw", "message"), [
    ({"target_epsilon": 0.0}, "target_epsilon"),
    ({"target_epsilon": -1.0}, "target_epsilon"),
    ({"delta": 1.0}, "delta"),
    ({"delta": 0.0}, "delta must be > 0"),
    ({"target_epsilon": None}, "give target_epsilon"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"max_grad_norm": math.nan}, "max_grad_norm"),
    ({"accountant": "gdp"}, "accountant must be one of"),
    ({"ema_decay": 1.5}, "ema_decay"),
])
def test_bad_settings_are_refused_by_name(kw, message):
    with pytest.raises(DPTrainingError, match=message):
        _quick(**kw)


def test_bad_data_is_refused_by_name(digits):
    (x, y), _ = digits
    config = _quick(epochs=1)
    bad = x.clone()
    bad[3, 0, 2, 2] = math.nan
    with pytest.raises(DPTrainingError, match="NaN or infinite"):
        train_dp(_mlp(), (bad, y), config=config, progress=False)
    with pytest.raises(DPTrainingError, match="1400 inputs but 1399 labels"):
        train_dp(_mlp(), (x, y[:-1]), config=config, progress=False)
    with pytest.raises(DPTrainingError, match="class indices"):
        train_dp(_mlp(), (x, y.float()), config=config, progress=False)
    with pytest.raises(DPTrainingError, match="out of range for a model with 10 outputs"):
        train_dp(_mlp(), (x, y + 5), config=config, progress=False)


def test_no_warnings_leak_from_opacus(digits):
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_dp(_mlp(), digits[0], config=_quick(epochs=1), progress=False)
