"""PinNet, its training loop and the `veil m209 train|test|attack` steps, end to end on a tiny dataset."""

import json

import numpy as np
import pytest
import torch

from veil.cli.main import main
from veil.m209 import Key, encrypt, keystream
from veil.m209.attack import keys_equivalent
from veil.m209.dataset import load_packed
from veil.m209.keys import generate_keys, generate_positions, make_rng
from veil.m209.machine import array_to_letters, letters_from_positions
from veil.m209.model import (
    ModelFileError,
    PinNet,
    PinNetConfig,
    load_model,
    pin_index,
    predict,
    save_model,
    shipped_model,
    shipped_models,
)
from veil.m209.training import TrainConfig, train_pinnet


def test_pin_index_is_the_machines_presented_pin():
    rng = make_rng(3)
    pins, lugs = generate_keys(20, rng=rng)
    pos = generate_positions(20, rng=rng)
    idx = pin_index(torch.from_numpy(pos), 60).numpy()  # (20, 60, 6)
    # the drum count from the presented pins, recomputed by hand, is the machine's keystream
    from veil.m209.machine import drum_tables

    masks = (pins[np.arange(20)[:, None, None], idx] << np.arange(6)).sum(axis=2)
    assert np.array_equal(np.take_along_axis(drum_tables(lugs), masks, axis=1), keystream(pins, lugs, pos, 60))


def test_pinnet_any_length_and_bad_input():
    net = PinNet(PinNetConfig(hidden=8, iterations=2))
    for length in (1, 52, 131):
        pins, lugs = net(torch.randint(0, 26, (3, length)), torch.zeros(3, 6, dtype=torch.long))
        assert pins.shape == (2, 3, 131) and lugs.shape == (3, 22, 28)
    with pytest.raises(ValueError, match=r"positions \(B, 6\)"):
        net(torch.randint(0, 26, (3, 10)), torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"0\.\.25"):
        predict(net, np.full((2, 10), 26), np.zeros((2, 6), np.int64))
    with pytest.raises(ValueError, match="wheel positions"):
        predict(net, np.zeros((2, 10), np.int64), np.full((2, 6), 25))
    with pytest.raises(ValueError, match="hidden >= 4"):
        PinNetConfig(hidden=2)


def test_model_file_round_trip_and_tampering(tmp_path):
    net = PinNet(PinNetConfig(hidden=8, iterations=2))
    path = tmp_path / "m.pt"
    save_model(net, path, letters=52, metrics={"val_pin_accuracy": 0.5})
    again, info = load_model(path)
    assert info["letters"] == 52 and info["metrics"]["val_pin_accuracy"] == 0.5
    ks, pos = np.random.default_rng(0).integers(0, 17, size=(4, 52)), np.zeros((4, 6), np.int64)
    assert np.allclose(predict(net, ks, pos)[0], predict(again, ks, pos)[0])
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\0" * 64
    (tmp_path / "bad.pt").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=r"bad\.pt"):
        load_model(tmp_path / "bad.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="not a PinNet file"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3,000 train and 300 test keys, 200 letters; a PinNet trained for 120 steps through the CLI."""
    root = tmp_path_factory.mktemp("m209")
    data = root / "data"
    for split, n in (("train", 3000), ("test", 300)):
        assert main(["m209", "keygen", "--out", str(data), "--split", split, "--keys", str(n), "--no-progress"]) == 0
        assert main(["m209", "encrypt", "--data", str(data), "--split", split, "--letters", "200",
                     "--no-progress"]) == 0
        assert main(["m209", "pack", "--data", str(data), "--split", split]) == 0
    model = root / "pinnet.pt"
    assert main(["m209", "train", "--data", str(data), "--letters", "200", "--out", str(model), "--max-steps", "120",
                 "--eval-every", "50", "--val-keys", "300", "--no-progress"]) == 0
    return data, model


def test_pipeline_learns_far_above_chance(tiny, tmp_path, capsys):
    data, model = tiny
    _, info = load_model(model)
    assert info["metrics"]["val_pin_accuracy"] > 0.7  # chance is 0.5
    out = tmp_path / "results"
    assert main(["m209", "test", "--data", str(data), "--model", str(model), "--out", str(out),
                 "--no-progress"]) == 0
    summary = json.loads((out / "m209-L200.json").read_text())
    assert summary["keys"] == 300 and summary["pin_accuracy"] > 0.7
    assert len(summary["pin_accuracy_per_wheel"]) == 6
    assert sorted(p.name for p in out.glob("*.png")) == [
        "m209-L200-by-overlaps.png", "m209-L200-per-wheel.png", "m209-L200-pin-histogram.png"]
    assert "pin accuracy" in capsys.readouterr().out


def test_training_refuses_overwrite_and_resumes(tiny, tmp_path, capsys):
    data, model = tiny
    before = model.read_bytes()
    assert main(["m209", "train", "--data", str(data), "--letters", "200", "--out", str(model),
                 "--max-steps", "1", "--no-progress"]) == 1
    assert "exists; pass --force" in capsys.readouterr().err and model.read_bytes() == before
    packed = load_packed(data / "train")
    ckpt = tmp_path / "c.pt"
    first = train_pinnet(packed, TrainConfig(letters=52, max_steps=20, eval_every=10, val_keys=200),
                         out=tmp_path / "a.pt", checkpoint=ckpt, progress=False)
    assert first.steps == 20 and [h["step"] for h in first.history] == [10, 20]
    second = train_pinnet(packed, TrainConfig(letters=52, max_steps=30, eval_every=10, val_keys=200),
                          out=tmp_path / "a.pt", checkpoint=ckpt, progress=False)
    assert second.steps == 30 and [h["step"] for h in second.history] == [10, 20, 30]
    with pytest.raises(ValueError, match="another training configuration"):
        train_pinnet(packed, TrainConfig(letters=104, max_steps=40, val_keys=200), out=tmp_path / "b.pt",
                     checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="only 200 letters"):
        train_pinnet(packed, TrainConfig(letters=300, max_steps=1), out=tmp_path / "b.pt", progress=False)
    # a weight altered in the checkpoint (torch.load would not notice) is refused by its digest
    blob = torch.load(ckpt, weights_only=True)
    name = next(k for k, v in blob["model"].items() if v.is_floating_point() and v.numel() > 1)
    blob["model"][name].view(-1)[0] += 1.0
    torch.save(blob, ckpt)
    with pytest.raises(ValueError, match="SHA-256 digest mismatch: the checkpoint was altered or damaged"):
        train_pinnet(packed, TrainConfig(letters=52, max_steps=40, eval_every=10, val_keys=200),
                     out=tmp_path / "a.pt", checkpoint=ckpt, progress=False)


def test_attack_cli_recovers_a_key_with_a_shipped_model(capsys):
    """A 234-letter crib (the test of the issue: recovery from a long known plaintext)."""
    assert set(shipped_models()) == {52, 104, 200}
    assert shipped_model(190).name == "pinnet-L200.pt" and shipped_model(60).name == "pinnet-L52.pt"
    rng = make_rng(11)
    pins, lugs = generate_keys(1, rng=rng)
    pos = generate_positions(1, rng=rng)
    plain = "ATTACKATDAWNXHOLDTHEBRIDGE" * 10 + "THEREST"
    cipher = array_to_letters(encrypt(pins, lugs, pos, plain)[0])
    known = plain[:234]
    assert main(["m209", "attack", "--ciphertext", cipher, "--known-plaintext", known, "--indicator",
                 letters_from_positions(pos)[0], "--time-limit", "60"]) == 0
    out = capsys.readouterr().out
    assert "reproduces all 234 known letters" in out
    assert plain.replace("Z", " ") in out.replace("Z", " ")
    recovered = _key_from_listing(out)
    assert keys_equivalent(recovered, Key(pins[0], lugs[0]))


def test_attack_cli_names_a_missing_file_given_for_a_text(tmp_path, capsys):
    missing = str(tmp_path / "cipher.txt")
    assert main(["m209", "attack", "--ciphertext", missing, "--known-plaintext", "ATTACK", "--indicator",
                 "AAAAAA"]) == 1
    assert f"{missing}: no such file" in capsys.readouterr().err


def _key_from_listing(out: str) -> Key:
    """The key printed by `veil m209 attack`, read back through the reference package's key list."""
    from types import SimpleNamespace

    lines = {line.split("=")[0].strip(): line.split("=", 1)[1] for line in out.splitlines() if "=" in line}
    pin_list = [lines[f"wheel{w}"].split()[0] for w in range(1, 7)]  # effective pins, then the layout
    return Key.from_reference(SimpleNamespace(lugs=lines["lugs"].strip(), pin_list=pin_list))
