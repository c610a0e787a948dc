"""``from_onnx``: an ONNX model file into Veil's graph.

Supported ONNX ops (default domain) and what they become:

========================================  ======================================================
Conv (2-D; symmetric padding)             ``conv2d``
Gemm, MatMul with a constant weight       ``linear`` (``alpha``/``beta``/``transB`` folded in)
MatMul of two tensors                     ``matmul``
Add, Sub, Mul, Div, Neg                   ``add``, ``sub``, ``mul``, ``truediv`` (by a weight:
                                          ``mul`` by its reciprocal), ``neg``
ReduceMean, ReduceSum                     ``mean``, ``sum``
Relu, Sigmoid, Tanh, Softmax, LogSoftmax  the op of the same name (``axis`` -> ``dim``)
MaxPool, AveragePool (2-D; symmetric)     ``max_pool2d``, ``avg_pool2d`` (count_include_pad=1)
GlobalAveragePool / GlobalMaxPool         ``adaptive_avg_pool2d((1, 1))`` / ``max_pool2d``
BatchNormalization (inference)            ``batch_norm``, then folded into a preceding Conv/Gemm
Flatten, Reshape, Transpose, Concat       ``flatten``, ``reshape``, ``permute``, ``cat``
Dropout, Identity, Cast to float          nothing (the value passes through)
Constant, Shape, Gather, Unsqueeze,       evaluated at conversion: constants, and the shape
Squeeze, Slice, Concat over shapes        arithmetic of ``x.view(x.size(0), -1)``
========================================  ======================================================

Initializers are the model owner's weights: each one a tensor operand reads becomes a ``param``
node (secret once shared). Scalars of ``Constant`` nodes (``x / 2``) stay public numbers in the
graph, as literals do in :func:`veil.nn.from_torch`.

A ``Reshape`` whose target keeps the input's first dimension, symbolically (``Shape``/``Gather``) or
by value (the exporter writes ``x.view(x.size(0), -1)`` as the constant ``[2, -1]`` for a fixed
batch of 2), keeps it symbolically: the converted model runs on any batch size.

Every node is checked; all unsupported ops and attributes are listed in one
:class:`~veil.nn.convert.UnsupportedModelError`, each with the node's name, its op and what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.nn.convert import UnsupportedModelError, _Builder
from veil.nn.graph import Graph, Ref
from veil.nn.model import SecureModel
from veil.nn.onnx_load import _attrs, _load, _static_shapes
from veil.nn.rewrites import fold_batch_norms, pool_before_activation

_DEFAULT_DOMAINS = ("", "ai.onnx")
_FLOAT_TYPES = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass(frozen=True, eq=False)
class _Const:
    """A value known at conversion: an initializer (a weight) or the output of a Constant node."""

    value: np.ndarray
    name: str
    public: bool  # from a Constant node (part of the architecture) rather than an initializer


@dataclass(frozen=True)
class _Dim:
    """Dimension ``index`` of the graph tensor ``ref`` (ONNX name ``source``), known only at run time."""

    ref: Ref
    source: str
    index: int


@dataclass(frozen=True)
class _Shape:
    """A shape computation's value: a list of dimensions (or one, ``scalar``)."""

    items: tuple[int | _Dim, ...]
    scalar: bool = False


Value = Ref | _Const | _Shape


class _Problem(Exception):
    """An unsupported op or attribute; the importer records it with the node and goes on.
    ``about_input``: the problem is the kind of an input (not reported when an earlier problem made it)."""

    def __init__(self, message: str, *, about_input: bool = False) -> None:
        super().__init__(message)
        self.about_input = about_input


@dataclass
class _Node:
    label: str  # the node's name in the file, for messages
    base: str  # a name for the IR nodes it becomes
    op: str
    inputs: list[Value | None]  # None: an optional input left out
    input_names: list[str]
    attrs: dict[str, Any]
    outputs: list[str]


Converter = Callable[["_Importer", _Node], "Value | list[Value] | None"]
CONVERTERS: dict[str, Converter] = {}


def converts(*ops: str) -> Callable[[Converter], Converter]:
    def deco(fn: Converter) -> Converter:
        for op in ops:
            CONVERTERS[op] = fn
        return fn

    return deco


_HINTS = {
    "LSTM": "recurrent layers are not supported on shares; use Linear/Conv layers",
    "GRU": "recurrent layers are not supported on shares; use Linear/Conv layers",
    "RNN": "recurrent layers are not supported on shares; use Linear/Conv layers",
    "Erf": "GELU (erf) has no secure approximation in Veil; use ReLU, Sigmoid or Tanh",
    "Gelu": "GELU has no secure approximation in Veil; use ReLU, Sigmoid or Tanh",
    "LeakyRelu": "use ReLU", "Elu": "use ReLU", "Selu": "use ReLU", "Clip": "use ReLU (ReLU6 is a Clip)",
    "HardSigmoid": "use Sigmoid", "HardSwish": "use ReLU",
    "Pad": "pad inside Conv/MaxPool/AvgPool (padding=...) instead of a separate pad",
}


def _supported() -> str:
    shown = sorted(op for op in CONVERTERS if op not in ("Cast", "Shape", "Gather", "Unsqueeze", "Squeeze", "Slice"))
    return "Supported ONNX ops: " + ", ".join(shown) + " (and the shape arithmetic of x.view(x.size(0), -1))."


def _base(name: str, op: str) -> str:
    return name.strip("/").replace("/", ".").replace("::", ".") or op.lower()


# ---- the importer --------------------------------------------------------------------------------
@dataclass
class _Importer:
    opset: int
    shapes: dict[str, list[int | None]]
    used: set[str]  # ONNX names some node or the graph output reads
    b: _Builder = field(default_factory=_Builder)
    env: dict[str, Value] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)  # ONNX names an earlier problem left without a value
    _params: dict[str, Ref] = field(default_factory=dict)

    def rank(self, name: str) -> int | None:
        return len(self.shapes[name]) if name in self.shapes else None

    def param(self, c: _Const, base: str) -> Ref:
        """The ``param`` node of a constant, one per constant (named after it unless the exporter made the
        name up, as in ``onnx::Conv_15``)."""
        if c.name not in self._params:
            readable = c.name and not c.name.startswith("onnx::")
            self._params[c.name] = self.new_param(_base(c.name, "") if readable else base, c.value)
        return self._params[c.name]

    def new_param(self, base: str, value: np.ndarray) -> Ref:
        """A ``param`` node for a value computed from constants (a transposed weight, a folded bias)."""
        return self.b.param(base, torch.from_numpy(np.array(value, dtype=np.float64)))

    def operand(self, v: Value | None, n: _Node, role: str) -> Any:
        """A tensor operand: graph tensors as they are, public scalars as numbers, weights as params."""
        if isinstance(v, Ref):
            return v
        if isinstance(v, _Const):
            if v.public and v.value.size == 1:
                return float(v.value.reshape(-1)[0])
            return self.param(v, f"{n.base}.{role}")
        raise _Problem(f"its {role} is a shape computation used as a tensor, which Veil does not support",
                       about_input=True)

    def ref(self, v: Value | None, what: str = "input") -> Ref:
        if isinstance(v, Ref):
            return v
        raise _Problem(f"its {what} must be a tensor computed from the model's input", about_input=True)

    def const(self, v: Value | None, what: str) -> np.ndarray:
        if isinstance(v, _Const):
            return v.value
        raise _Problem(f"its {what} must be a constant (an initializer or a Constant node)", about_input=True)

    def size(self, d: _Dim, base: str) -> int | Ref:
        """A dimension as a number where shape inference knows it (all but the first, the batch), else as
        a ``size`` node evaluated at run time."""
        static = self.shapes.get(d.source, [])
        known = static[d.index] if d.index < len(static) else None
        if d.index != 0 and known is not None:
            return known
        return self.b.emit(f"{base}.size", "size", d.ref, dim=d.index)

    def fail(self, names: Sequence[str]) -> None:
        """Give ``names`` a stand-in value, so that later nodes are still checked for their own problems."""
        for name in names:
            self.failed.add(name)
            self.env[name] = Ref(f"<unavailable: {name}>")

    def unused(self, n: _Node, *indices: int) -> None:
        for i in indices:
            if i < len(n.outputs) and n.outputs[i] and n.outputs[i] in self.used:
                raise _Problem(f"its output {i} ({n.outputs[i]!r}) is read, which Veil does not compute")


def _ints(v: Any) -> list[int]:
    return [int(x) for x in np.asarray(v).reshape(-1)]


def _symmetric(n: _Node, kernel: Sequence[int]) -> list[int]:
    """The padding of a 2-D conv or pool, the same on both sides of each axis (what PyTorch can run)."""
    rank = len(kernel)
    auto_pad = n.attrs.get("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return [0] * rank
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):  # symmetric when stride 1 and the total padding is even
        dilations = _ints(n.attrs.get("dilations", [1] * rank))
        total = [d * (k - 1) for d, k in zip(dilations, kernel)]
        if any(s != 1 for s in _ints(n.attrs.get("strides", [1] * rank))) or any(t % 2 for t in total):
            raise _Problem(f"auto_pad={auto_pad} with strides or an even kernel pads asymmetrically; export "
                           f"with explicit symmetric padding")
        return [t // 2 for t in total]
    if auto_pad != "NOTSET":
        raise _Problem(f"auto_pad={auto_pad} is not supported; export with explicit pads")
    pads = _ints(n.attrs.get("pads", [0] * 2 * rank))
    if pads[:rank] != pads[rank:]:
        raise _Problem(f"asymmetric pads {pads} (begin != end) are not supported; pad symmetrically "
                       f"(PyTorch's padding=... always is)")
    return pads[:rank]


def _check_2d(n: _Node, kernel: Sequence[int]) -> None:
    if len(kernel) != 2:
        raise _Problem(f"{len(kernel)}-D {n.op} is not supported; Veil runs 2-D convolutions and pooling")


def _axes(imp: _Importer, n: _Node) -> list[int]:
    if "axes" in n.attrs:
        return _ints(n.attrs["axes"])
    return _ints(imp.const(n.inputs[1] if len(n.inputs) > 1 else None, "axes"))


# ---- constant folding ----------------------------------------------------------------------------
def _fold(imp: _Importer, n: _Node) -> Value | None:
    """Evaluate ``n`` when all its inputs are constants (e.g. a transposed weight); None if we cannot."""
    vals = [v.value if isinstance(v, _Const) else None for v in n.inputs]
    a = n.attrs
    x = vals[0] if vals else None
    if x is None:
        return None
    out: np.ndarray | None = None
    if n.op in ("Identity", "Dropout"):
        out = x
    elif n.op == "Cast":
        import onnx.helper

        out = x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(a["to"])))
    elif n.op in ("Add", "Sub", "Mul", "Div") and vals[1] is not None:
        out = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[n.op](x, vals[1])
    elif n.op in ("Neg", "Sqrt", "Reciprocal"):
        out = {"Neg": np.negative, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal}[n.op](x)
    elif n.op == "Transpose":
        out = np.transpose(x, a.get("perm"))
    elif n.op == "Reshape" and vals[1] is not None:
        shape = [x.shape[i] if d == 0 and not a.get("allowzero") else d for i, d in enumerate(_ints(vals[1]))]
        out = x.reshape(shape)
    elif n.op == "Unsqueeze":
        out = x
        for ax in sorted(_axes(imp, n)):
            out = np.expand_dims(out, ax)
    elif n.op == "Squeeze":
        out = np.squeeze(x, tuple(_axes(imp, n))) if "axes" in a or len(n.inputs) > 1 else np.squeeze(x)
    elif n.op == "Concat":
        out = np.concatenate([v for v in vals if v is not None], axis=int(a["axis"]))
    elif n.op == "Gather" and vals[1] is not None:
        out = np.take(x, vals[1], axis=int(a.get("axis", 0)))
    elif n.op == "Shape":
        out = np.array(x.shape, dtype=np.int64)
    else:
        return None
    public = all(v.public for v in n.inputs if isinstance(v, _Const))
    return _Const(np.asarray(out), n.outputs[0], public)


# ---- the driver ----------------------------------------------------------------------------------
def _convert_node(imp: _Importer, node: Any, index: int) -> None:
    """Convert one ONNX node into ``imp``; a problem is recorded (unless an earlier one caused it)."""
    label = node.name or f"#{index}"
    where = f"node '{label}' ({node.op_type})"
    tainted = any(name in imp.failed for name in node.input)
    n = _Node(label, _base(node.name, node.op_type), node.op_type,
              [imp.env.get(name) if name else None for name in node.input], list(node.input), _attrs(node),
              list(node.output))
    out: Value | list[Value] | None = None
    try:
        if node.domain not in _DEFAULT_DOMAINS:
            raise _Problem(f"op of domain {node.domain!r} is not supported; export with standard ONNX ops only")
        if n.inputs and all(isinstance(v, _Const) for v in n.inputs if v is not None):
            out = _fold(imp, n)
        if out is None:
            converter = CONVERTERS.get(node.op_type)
            if converter is None:
                hint = _HINTS.get(node.op_type, "Veil has no secure equivalent")
                raise _Problem(f"is not supported; {hint}")
            out = converter(imp, n)
    except _Problem as e:
        if not (tainted and e.about_input):
            imp.b.problems.append(f"{where}{'' if str(e).startswith('is not') else ':'} {e}")
        imp.fail(n.outputs)
        return
    except (ValueError, IndexError, KeyError, TypeError) as e:  # attributes or shapes that do not fit
        if not tainted:
            imp.b.problems.append(f"{where}: cannot be converted ({type(e).__name__}: {e})")
        imp.fail(n.outputs)
        return
    for name, v in zip(n.outputs, out if isinstance(out, list) else [out]):
        if name and v is not None:
            imp.env[name] = v
    if tainted:
        imp.failed.update(n.outputs)


def from_onnx(source: str | Path | bytes) -> SecureModel:
    """Convert an ONNX model (a file path, or the file's bytes) into a
    :class:`~veil.nn.model.SecureModel` with its (plaintext) weights, ready to be shared by its owner.

    Raises :class:`~veil.nn.load.ModelFileError` for a missing, empty or malformed file and
    :class:`~veil.nn.convert.UnsupportedModelError` listing every op Veil cannot run on shares."""
    model, label = _load(source)  # first: it explains a missing onnx package
    import onnx.numpy_helper

    from veil.nn import onnx_ops  # noqa: F401 - fills CONVERTERS

    g = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), default=1)
    used = {name for node in g.node for name in node.input} | {o.name for o in g.output}
    imp = _Importer(opset, _static_shapes(model), used)
    problems = imp.b.problems
    for init in g.initializer:
        imp.env[init.name] = _Const(onnx.numpy_helper.to_array(init), init.name, False)
    data_inputs = [i for i in g.input if i.name not in imp.env]
    if len(data_inputs) != 1:
        problems.append(f"the model has {len(data_inputs)} data inputs {[i.name for i in data_inputs]}; "
                        f"Veil imports models with exactly one")
    for i in data_inputs[1:]:
        imp.fail([i.name])
    for i in data_inputs[:1]:
        if i.type.tensor_type.elem_type not in _FLOAT_TYPES:
            problems.append(f"input '{i.name}' has element type "
                            f"{onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)}; Veil's models take "
                            f"floating-point inputs")
        imp.env[i.name] = imp.b.emit(_base(i.name, "input"), "input")

    for index, node in enumerate(g.node):
        _convert_node(imp, node, index)

    outputs: list[Ref] = []
    for o in g.output:
        v = imp.env.get(o.name)
        if isinstance(v, Ref):
            outputs.append(v)
        elif v is not None:
            problems.append(f"output '{o.name}' is a constant or a shape, not computed from the input")
    if not outputs and not problems:
        problems.append("the model has no output computed from its input")
    if problems:
        unknown = any(") is not supported" in p for p in problems)
        raise UnsupportedModelError(f"{label} cannot be converted ({len(problems)} problem(s)):\n  - "
                                    + "\n  - ".join(problems) + (f"\n{_supported()}" if unknown else ""))
    imp.b.emit("output", "output", outputs[0] if len(outputs) == 1 else tuple(outputs))
    graph, values = fold_batch_norms(Graph(imp.b.nodes).validate(), imp.b.values)
    graph = pool_before_activation(graph).without_unused().validate()
    return SecureModel(graph, {k: v for k, v in values.items() if k in graph.params})
