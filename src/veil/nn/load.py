"""``load_model``: a model file (ONNX, or PyTorch weights) into a :class:`~veil.nn.model.SecureModel`.

    model = veil.nn.load_model("lenet.onnx")
    model = veil.nn.load_model("lenet.pt", architecture=LeNet())          # a state_dict file
    model = veil.nn.load_model("whole.pt", trust_pickle=True)            # a pickled module: runs its code

Files it reads:

* ``.onnx``: an ONNX model (:func:`veil.nn.onnx.from_onnx`).
* ``.pt`` / ``.pth``: what ``torch.save`` wrote. A ``state_dict`` (names -> tensors, also inside a
  ``{"state_dict": ...}`` or ``{"model_state_dict": ...}`` checkpoint) is read with
  ``torch.load(weights_only=True)``, which unpickles tensors and containers only, and loaded strictly
  into ``architecture``. A whole pickled module is Python code to run: it is refused unless
  ``trust_pickle=True``, because loading it executes whatever the file says.

Every failure (missing, empty, truncated or foreign file, keys or shapes that do not match) is one
:class:`ModelFileError` naming the file and the cause.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from veil.files import atomic_writer, file_sha256, torch_load_problem

if TYPE_CHECKING:
    from veil.nn.model import SecureModel

TORCH_SUFFIXES = (".pt", ".pth")
STATE_DICT_KEYS = ("state_dict", "model_state_dict")


class ModelFileError(ValueError):
    """A model file that cannot be read: missing, empty, malformed, or not what the caller said."""


def load_model(path: str | Path, *, architecture: nn.Module | None = None,
               trust_pickle: bool = False) -> SecureModel:
    """Read a model file into a :class:`~veil.nn.model.SecureModel` (plaintext weights, owner side).

    ``architecture``: a module instance whose ``state_dict`` the file holds (``.pt``/``.pth`` weights
    files); it is not modified (the weights go into a copy). ``trust_pickle``: allow a file holding a
    whole pickled module, which runs arbitrary code while loading; only for files you trust."""
    from veil.nn.convert import from_torch

    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        if architecture is not None:
            raise ValueError(f"{path}: an ONNX file carries its architecture; do not pass architecture=")
        from veil.nn.onnx import from_onnx

        return from_onnx(path)
    if suffix not in TORCH_SUFFIXES:
        raise ModelFileError(f"{path}: unknown model file type {path.suffix!r}; Veil reads .onnx files and "
                             f"PyTorch .pt/.pth files")
    if architecture is not None and not isinstance(architecture, nn.Module):
        raise TypeError(f"architecture must be a torch.nn.Module instance, got {type(architecture).__name__}")
    _check_sidecar_digest(path)
    content = _load_weights_only(path, trust_pickle=trust_pickle)
    if isinstance(content, nn.Module):
        if architecture is not None:
            raise ModelFileError(f"{path}: the file holds a whole {type(content).__name__} module; "
                                 f"do not pass architecture=")
        return from_torch(content.eval())
    state = _state_dict(path, content)
    if architecture is None:
        raise ModelFileError(f"{path}: the file holds a state_dict (weights only, {len(state)} tensors); pass "
                             f"the model it belongs to: load_model(path, architecture=YourModel())")
    module = copy.deepcopy(architecture)
    _load_strict(path, module, state)
    return from_torch(module.eval())


def save_state_dict(module_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state_dict with ``torch.save``, atomically: a temporary file in the same directory, then
    ``os.replace``; a crash leaves the old file or none, never half a file. Returns the path."""
    path = Path(path)
    if isinstance(module_or_state_dict, nn.Module):
        state: Mapping[str, Any] = module_or_state_dict.state_dict()
    elif isinstance(module_or_state_dict, Mapping):
        state = module_or_state_dict
    else:
        raise TypeError(f"save_state_dict takes a module or a state_dict, got {type(module_or_state_dict).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"a state_dict maps names to tensors; these entries do not: {bad[:10]}")
    clean = {k: v.detach().cpu() for k, v in state.items()}
    with atomic_writer(path) as f:
        torch.save(clean, f)
    return path


# ---- helpers -------------------------------------------------------------------------------------
def _check_sidecar_digest(path: Path) -> None:
    """Where Veil wrote a JSON sidecar with the weights' SHA-256 (``train_lenet``), check the file against
    it: ``torch.load`` does not notice a bit flipped inside a tensor."""
    sidecar = path.with_suffix(".json")
    if sidecar == path or not sidecar.is_file():
        return
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return  # not ours
    if not isinstance(info, dict) or info.get("weights") != path.name or not isinstance(info.get("sha256"), str):
        return
    if file_sha256(path) != info["sha256"]:
        raise ModelFileError(f"{path}: SHA-256 digest mismatch with {sidecar.name}: the weights were altered or "
                             f"damaged since they were written")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: the file is empty (an interrupted save?)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _load_weights_only(path: Path, *, trust_pickle: bool) -> Any:
    """torch.load with weights_only=True; a pickled module only if ``trust_pickle``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's TorchScript-archive notice: reported below instead
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only unpickling runs no code: any failure is a file problem
        message = str(e)
        if "TorchScript" in message:
            raise ModelFileError(f"{path}: a TorchScript archive (torch.jit.save); Veil converts nn.Modules: "
                                 f"save the model's state_dict, or export it to ONNX") from None
        found = _GLOBAL.search(message)
        if found is None:
            raise ModelFileError(f"{path}: not a PyTorch model file ({torch_load_problem(e)})") from None
        if not trust_pickle:
            raise ModelFileError(
                f"{path}: the file holds pickled Python objects ({found.group(1)}), e.g. a whole module saved "
                f"with torch.save(model). Loading it runs arbitrary code from the file. Save a state_dict "
                f"instead (torch.save(model.state_dict(), path)) and pass architecture=, or, only for a file "
                f"you trust, pass trust_pickle=True (CLI: --trust-pickle)") from None
    warnings.warn(f"{path}: unpickling a whole module (trust_pickle=True) runs code from the file",
                  stacklevel=3)
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)  # the caller trusts the file
    except Exception as e:  # the classes it names may not be importable here, among others
        raise ModelFileError(f"{path}: cannot unpickle the file ({_first_line(e)}); the classes it refers to "
                             f"must be importable under the same names") from None
    if not isinstance(content, nn.Module):
        raise ModelFileError(f"{path}: the file holds a {type(content).__name__}, not a torch.nn.Module "
                             f"or a state_dict")
    return content


def _is_state_dict(v: Any) -> bool:
    return isinstance(v, Mapping) and bool(v) and all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def _state_dict(path: Path, content: Any) -> Mapping[str, torch.Tensor]:
    if _is_state_dict(content):
        return content  # type: ignore[no-any-return]
    if isinstance(content, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(content.get(key)):
                return content[key]  # type: ignore[no-any-return]
        keys = [str(k) for k in list(content)[:10]]
        raise ModelFileError(f"{path}: holds a mapping with keys {keys}, neither a state_dict (names -> "
                             f"tensors) nor a checkpoint with one under {' or '.join(map(repr, STATE_DICT_KEYS))}")
    raise ModelFileError(f"{path}: holds a {type(content).__name__}, not a state_dict or a module")


def _load_strict(path: Path, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Every key of the module in the file, no other key, every shape equal: else one error with all."""
    expected = module.state_dict()
    # BatchNorm's step counter is optional, as in PyTorch (older files lack it; inference never reads it)
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {list(state[k].shape)}, model {list(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"missing keys {missing}"] if missing else []
        parts += [f"unexpected keys {unexpected}"] if unexpected else []
        parts += [f"shape mismatches [{'; '.join(mismatched)}]"] if mismatched else []
        hint = ""
        if unexpected and all(k.startswith("module.") for k in state):
            hint = " (the keys start with 'module.': saved from DataParallel; strip that prefix)"
        raise ModelFileError(f"{path}: the state_dict does not fit {type(module).__name__}: "
                             f"{'; '.join(parts)}{hint}")
    try:
        module.load_state_dict({**{k: v for k, v in expected.items() if k.endswith(".num_batches_tracked")},
                                **state}, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied
        raise ModelFileError(f"{path}: cannot load the state_dict into {type(module).__name__} "
                             f"({_first_line(e)})") from None
