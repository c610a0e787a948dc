"""Reading an ONNX file for :func:`veil.nn.onnx.from_onnx`: load and check the protobuf (every
failure a ``ModelFileError`` naming the file), static shapes from ONNX shape inference, and a
node's attributes as Python values."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from veil.nn.load import ModelFileError


def _load(source: str | Path | bytes | bytearray | memoryview) -> tuple[Any, str]:
    try:
        import onnx
    except ImportError:
        raise ImportError("from_onnx needs the onnx package: pip install 'veil[onnx]'") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw, label = bytes(source), f"<ONNX model of {len(source)} bytes>"
        if not raw:
            raise ModelFileError(f"{label}: empty: an ONNX model file is never empty")
        try:
            model = onnx.load_from_string(raw)
        except Exception as e:  # protobuf's DecodeError and kin: garbage bytes
            raise ModelFileError(f"{label}: not an ONNX model ({type(e).__name__}: {e})") from None
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise ModelFileError(f"{label}: no such file" if not path.exists() else f"{label}: not a file")
        if path.stat().st_size == 0:
            raise ModelFileError(f"{label}: the file is empty (an interrupted save?)")
        try:
            model = onnx.load(str(path))
        except Exception as e:  # DecodeError for garbage, OSError for missing external data...
            raise ModelFileError(f"{label}: not an ONNX model ({type(e).__name__}: {e})") from None
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # onnx.checker.ValidationError, and protobuf errors for huge models
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{label}: not a valid ONNX model: {first}") from None
    return model, label


def _static_shapes(model: Any) -> dict[str, list[int | None]]:
    """ONNX name -> dimensions (None where unknown), from shape inference where it succeeds."""
    import onnx

    with contextlib.suppress(Exception):  # shape inference is a help, not a requirement
        model = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int | None]] = {}
    g = model.graph
    for info in [*g.input, *g.value_info, *g.output]:
        t = info.type.tensor_type
        if info.type.HasField("tensor_type") and t.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    out: dict[str, Any] = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        out[a.name] = v
    return out
