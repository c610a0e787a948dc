"""veil.nn.load_model and save_state_dict: state_dict files with an architecture, checkpoints, whole
pickled modules (refused unless trusted), ONNX files, and every kind of bad file as one ModelFileError."""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from nn_testing import randomize_batch_norm
from torch import nn

from veil.nn.load import ModelFileError, load_model, save_state_dict

TOL = 1e-5


def small_net(seed: int) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


X = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(99))


def reference(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(X)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    trained = small_net(0)
    randomize_batch_norm(trained, 0)  # statistics travel in the state_dict too
    path = save_state_dict(trained, tmp_path / "net.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]  # no temporary file left
    architecture = small_net(1)
    before = {k: v.clone() for k, v in architecture.state_dict().items()}
    model = load_model(path, architecture=architecture)
    torch.testing.assert_close(model(X), reference(trained), atol=TOL, rtol=TOL)
    assert all(torch.equal(v, before[k]) for k, v in architecture.state_dict().items())  # not modified


def test_a_batch_norm_state_dict_without_its_step_counter_loads(tmp_path: Path) -> None:
    # older PyTorch and hand-built files have no num_batches_tracked; PyTorch's strict load accepts them
    trained = small_net(3)
    randomize_batch_norm(trained, 3)
    state = {k: v for k, v in trained.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(trained.state_dict())
    torch.save(state, tmp_path / "old.pt")
    model = load_model(tmp_path / "old.pt", architecture=small_net(4))
    torch.testing.assert_close(model(X), reference(trained), atol=TOL, rtol=TOL)


def test_weights_altered_after_veil_wrote_them_are_refused_by_the_sidecar_digest(tmp_path: Path) -> None:
    import json

    from veil.files import file_sha256

    path = save_state_dict(small_net(5), tmp_path / "net.pt")
    (tmp_path / "net.json").write_text(json.dumps({"weights": "net.pt", "sha256": file_sha256(path)}))
    load_model(path, architecture=small_net(6))  # intact: loads
    state = torch.load(path, weights_only=True)
    state["4.bias"][0] += 0.5  # one weight changed: torch.load itself would not notice a flipped bit
    torch.save(state, path)
    with pytest.raises(ModelFileError, match=r"SHA-256 digest mismatch with net\.json"):
        load_model(path, architecture=small_net(6))


def test_a_foreign_file_named_pt_is_named_without_torchs_advice(tmp_path: Path) -> None:
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros(3))
    (tmp_path / "x.npy").rename(tmp_path / "x.pt")
    with pytest.raises(ModelFileError, match=r"not a file written by torch\.save") as err:
        load_model(tmp_path / "x.pt", architecture=small_net(0))
    assert "weights_only" not in str(err.value)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_checkpoint_wrappers(tmp_path: Path, key: str) -> None:
    trained = small_net(2)
    torch.save({"epoch": 7, key: trained.state_dict(), "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pth")
    model = load_model(tmp_path / "ckpt.pth", architecture=small_net(3))
    torch.testing.assert_close(model(X), reference(trained), atol=TOL, rtol=TOL)


def test_state_dict_needs_an_architecture(tmp_path: Path) -> None:
    save_state_dict(small_net(0).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelFileError, match=r"w\.pt: the file holds a state_dict.*architecture=YourModel\(\)"):
        load_model(tmp_path / "w.pt")


def test_mismatched_state_dict_names_every_key(tmp_path: Path) -> None:
    state = small_net(0).state_dict()
    del state["4.bias"]
    state["0.weight"] = torch.zeros(3, 1, 5, 5)
    state["head.weight"] = torch.zeros(2)
    save_state_dict(state, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError) as e:
        load_model(tmp_path / "bad.pt", architecture=small_net(1))
    text = str(e.value)
    assert "bad.pt" in text and "Sequential" in text
    assert "missing keys ['4.bias']" in text and "unexpected keys ['head.weight']" in text
    assert "0.weight: file [3, 1, 5, 5], model [3, 1, 3, 3]" in text


def test_data_parallel_prefix_is_explained(tmp_path: Path) -> None:
    save_state_dict({f"module.{k}": v for k, v in small_net(0).state_dict().items()}, tmp_path / "dp.pt")
    with pytest.raises(ModelFileError, match="strip that prefix"):
        load_model(tmp_path / "dp.pt", architecture=small_net(0))


def test_whole_module_needs_trust(tmp_path: Path) -> None:
    trained = small_net(4).eval()
    torch.save(trained, tmp_path / "whole.pt")
    with pytest.raises(ModelFileError) as e:
        load_model(tmp_path / "whole.pt")
    text = str(e.value)
    assert "whole.pt" in text and "arbitrary code" in text and "trust_pickle=True" in text
    assert "state_dict" in text and "torch.nn.modules" in text  # names what it would have imported
    with pytest.warns(UserWarning, match="runs code from the file"):
        model = load_model(tmp_path / "whole.pt", trust_pickle=True)
    torch.testing.assert_close(model(X), reference(trained), atol=TOL, rtol=TOL)


class Vanishing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_trusted_pickle_of_a_class_not_importable_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save(Vanishing(), tmp_path / "gone.pt")
    monkeypatch.delattr(sys.modules[__name__], "Vanishing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelFileError, match=r"gone\.pt: cannot unpickle.*importable"):
            load_model(tmp_path / "gone.pt", trust_pickle=True)


def test_trusted_pickle_that_is_not_a_module(tmp_path: Path) -> None:
    torch.save({"net": small_net(0), "note": "a dict"}, tmp_path / "dict.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelFileError, match=r"holds a dict, not a torch\.nn\.Module"):
            load_model(tmp_path / "dict.pt", trust_pickle=True)


def test_what_is_not_a_state_dict(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(ModelFileError, match=r"keys \['epoch', 'lr'\], neither a state_dict"):
        load_model(tmp_path / "meta.pt", architecture=small_net(0))
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ModelFileError, match="holds a list"):
        load_model(tmp_path / "list.pt", architecture=small_net(0))


def test_bad_files(tmp_path: Path) -> None:
    cases = {
        "missing.pt": None,
        "empty.pt": b"",
        "garbage.pt": os.urandom(64) + b"\x80\x02garbage",
        "text.pth": b"hello, not a model\n",
    }
    buf = io.BytesIO()
    torch.save(small_net(0).state_dict(), buf)
    cases["truncated.pt"] = buf.getvalue()[: len(buf.getvalue()) // 2]
    for name, raw in cases.items():
        if raw is not None:
            (tmp_path / name).write_bytes(raw)
        with pytest.raises(ModelFileError) as e:
            load_model(tmp_path / name, architecture=small_net(0))
        assert str(tmp_path / name) in str(e.value)
        assert "\n" not in str(e.value)  # one line, no traceback
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(ModelFileError, match="empty"):
        load_model(tmp_path / "empty.pt")
    with pytest.raises(ModelFileError, match="not a file"):
        load_model(tmp_path)
    (tmp_path / "model.h5").write_bytes(b"\x89HDF")
    with pytest.raises(ModelFileError, match=r"unknown model file type '\.h5'"):
        load_model(tmp_path / "model.h5")


def test_torchscript_is_explained(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(ModelFileError, match="TorchScript archive"):
        load_model(tmp_path / "scripted.pt")


def test_onnx_files(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    trained = small_net(5).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(trained, (X,), tmp_path / "net.onnx", dynamo=False)
    model = load_model(tmp_path / "net.onnx")
    torch.testing.assert_close(model(X), reference(trained), atol=TOL, rtol=TOL)
    with pytest.raises(ValueError, match="carries its architecture"):
        load_model(tmp_path / "net.onnx", architecture=small_net(5))
    (tmp_path / "junk.onnx").write_bytes(b"junk" * 10)
    with pytest.raises(ModelFileError, match=r"junk\.onnx: not an ONNX model"):
        load_model(tmp_path / "junk.onnx")


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_state_dict(small_net(0), tmp_path / "w.pt")
    old = path.read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(small_net(1), path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["w.pt"]
    with pytest.raises(TypeError, match="names to tensors"):
        save_state_dict({"a": 1.0}, tmp_path / "x.pt")  # type: ignore[dict-item]
