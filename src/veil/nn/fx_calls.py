"""How ``torch.fx`` calls of functions and methods (``F.relu(x)``, ``x.view(n, -1)``, ``x + y``...)
become graph nodes for :func:`veil.nn.from_torch`: one signature per op binds positional and keyword
arguments the way PyTorch does, options that cannot run on shares are refused with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F

from veil.nn.graph import Ref

if TYPE_CHECKING:
    from veil.nn.convert import _Builder


# Each entry: op name, the names of its positional parameters (tensors first), and which of them are
# operands (args) rather than options (attrs); defaults fill options not given.
@dataclass(frozen=True)
class _Sig:
    op: str
    params: tuple[str, ...]
    operands: int
    defaults: dict[str, Any] = field(default_factory=dict)
    varargs: bool = False  # method forms like x.view(2, -1) / x.permute(0, 2, 1)


_ADD = _Sig("add", ("input", "other"), 2)
_SUB = _Sig("sub", ("input", "other"), 2)
_MUL = _Sig("mul", ("input", "other"), 2)
_DIV = _Sig("truediv", ("input", "other"), 2)
_MATMUL = _Sig("matmul", ("input", "other"), 2)
_NEG = _Sig("neg", ("input",), 1)
_RELU = _Sig("relu", ("input",), 1)
_SIGMOID = _Sig("sigmoid", ("input",), 1)
_TANH = _Sig("tanh", ("input",), 1)
_SOFTMAX = _Sig("softmax", ("input", "dim"), 1)
_LOG_SOFTMAX = _Sig("log_softmax", ("input", "dim"), 1)
_FLATTEN = _Sig("flatten", ("input", "start_dim", "end_dim"), 1, {"start_dim": 0, "end_dim": -1})
_MAXPOOL = _Sig("max_pool2d", ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                               "return_indices"), 1,
                {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
_AVGPOOL = _Sig("avg_pool2d", ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                               "divisor_override"), 1,
                {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                 "divisor_override": None})
_ADAPTIVE = _Sig("adaptive_avg_pool2d", ("input", "output_size"), 1)
_DROPOUT = _Sig("identity", ("input", "p", "training", "inplace"), 1, {"p": 0.5, "training": False, "inplace": False})
_IDENTITY = _Sig("identity", ("input",), 1)
_CAT = _Sig("cat", ("tensors", "dim"), 1, {"dim": 0})
_LINEAR = _Sig("linear", ("input", "weight", "bias"), 3, {"bias": None})
_CONV = _Sig("conv2d", ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), 3,
             {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
_TRANSPOSE = _Sig("transpose", ("input", "dim0", "dim1"), 1)
_SUM = _Sig("sum", ("input", "dim", "keepdim"), 1, {"dim": None, "keepdim": False})
_MEAN = _Sig("mean", ("input", "dim", "keepdim"), 1, {"dim": None, "keepdim": False})
_SIZE = _Sig("size", ("input", "dim"), 1, {"dim": None})
_GETITEM = _Sig("getitem", ("input", "index"), 2)
_RESHAPE = _Sig("reshape", ("input", "shape"), 2)
_PERMUTE = _Sig("permute", ("input", "dims"), 1)

FUNCTIONS: dict[Any, _Sig] = {
    operator.add: _ADD, torch.add: _ADD, operator.sub: _SUB, torch.sub: _SUB, operator.mul: _MUL, torch.mul: _MUL,
    operator.truediv: _DIV, torch.div: _DIV, operator.neg: _NEG, torch.neg: _NEG,
    operator.matmul: _MATMUL, torch.matmul: _MATMUL,
    torch.relu: _RELU, F.relu: _RELU, torch.sigmoid: _SIGMOID, F.sigmoid: _SIGMOID, torch.tanh: _TANH,
    F.tanh: _TANH, torch.softmax: _SOFTMAX, F.softmax: _SOFTMAX, torch.log_softmax: _LOG_SOFTMAX,
    F.log_softmax: _LOG_SOFTMAX, torch.flatten: _FLATTEN, F.max_pool2d: _MAXPOOL, F.avg_pool2d: _AVGPOOL,
    F.adaptive_avg_pool2d: _ADAPTIVE, F.dropout: _DROPOUT, torch.cat: _CAT, torch.concat: _CAT,
    F.linear: _LINEAR, F.conv2d: _CONV, torch.transpose: _TRANSPOSE, torch.sum: _SUM, torch.mean: _MEAN,
    operator.getitem: _GETITEM, torch.reshape: _RESHAPE, torch.permute: _PERMUTE,
}
# F.max_pool2d is a dispatcher: fx records the function it dispatches to.
for _fn_name in ("_max_pool2d", "max_pool2d_with_indices"):
    if hasattr(F, _fn_name):
        FUNCTIONS.setdefault(getattr(F, _fn_name), _MAXPOOL)

METHODS: dict[str, _Sig] = {
    "add": _ADD, "sub": _SUB, "mul": _MUL, "div": _DIV, "neg": _NEG, "matmul": _MATMUL, "relu": _RELU,
    "sigmoid": _SIGMOID, "tanh": _TANH, "softmax": _SOFTMAX, "log_softmax": _LOG_SOFTMAX, "flatten": _FLATTEN,
    "view": _Sig("reshape", ("input", "shape"), 2, varargs=True),
    "reshape": _Sig("reshape", ("input", "shape"), 2, varargs=True),
    "permute": _Sig("permute", ("input", "dims"), 1, varargs=True),
    "transpose": _TRANSPOSE, "contiguous": _IDENTITY, "sum": _SUM, "mean": _MEAN, "size": _SIZE,
}

_SUPPORTED_HINT = ("supported: Linear, Conv2d, BatchNorm1d/2d, ReLU, Sigmoid, Tanh, Softmax, LogSoftmax, "
                   "MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, Dropout, Identity, add/sub/mul/div, cat, "
                   "view/reshape/flatten/transpose/permute, sum/mean")


def _bind(sig: _Sig, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    if sig.varargs and len(args) >= 2:
        rest = args[1:]
        one = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        args = (args[0], tuple(one))
    if len(args) > len(sig.params):
        raise TypeError(f"too many arguments for {sig.op}")
    bound = dict(sig.defaults)
    bound.update(zip(sig.params, args))
    for k, v in kwargs.items():
        if k == "dim" and "dims" in sig.params:
            k = "dims"
        if k not in sig.params:
            raise TypeError(f"unexpected keyword {k!r} for {sig.op}")
        bound[k] = v
    missing = [p for p in sig.params if p not in bound]
    if missing:
        raise TypeError(f"missing {missing} for {sig.op}")
    return bound


def _check_options(op: str, o: dict[str, Any]) -> str | None:
    """Why an option combination cannot run securely (None if it can)."""
    if op == "max_pool2d" and (o["dilation"] not in (1, (1, 1), [1, 1]) or o["ceil_mode"] or o["return_indices"]):
        return "max_pool2d with dilation, ceil_mode or return_indices is not supported"
    if op == "avg_pool2d" and (o["ceil_mode"] or o["divisor_override"] is not None
                               or (not o["count_include_pad"] and o["padding"] not in (0, (0, 0), [0, 0]))):
        return "avg_pool2d with ceil_mode, divisor_override or count_include_pad=False is not supported"
    if op in ("softmax", "log_softmax") and o.get("dim") is None:
        return f"{op} needs an explicit dim"
    return None


def _emit_call(b: _Builder, name: str, sig: _Sig, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Ref | None:
    if sig.op in ("add", "sub") and "alpha" in kwargs:
        alpha = kwargs.pop("alpha")
        if alpha != 1:
            args = (args[0], _scaled(b, name, args[1], alpha))
    for dropped in ("inplace", "dtype", "_stacklevel", "rounding_mode"):
        if dropped == "rounding_mode" and kwargs.get(dropped) is not None:
            b.problems.append(f"{name}: division with rounding_mode is not supported on shares")
            return None
        kwargs.pop(dropped, None)
    try:
        bound = _bind(sig, args, kwargs)
    except TypeError as e:
        b.problems.append(f"{name}: {sig.op}: {e}")
        return None
    why = _check_options(sig.op, bound)
    if why:
        b.problems.append(f"{name}: {why}")
        return None
    names = sig.params
    operands = [_to_arg(bound[p]) for p in names[:sig.operands]]
    attrs = {p: _to_arg(bound[p]) for p in names[sig.operands:]
             if p not in ("dilation", "ceil_mode", "return_indices", "count_include_pad", "divisor_override", "p",
                          "training", "inplace") or sig.op == "conv2d"}
    if sig.op == "identity":
        attrs = {}
    return b.emit(name, sig.op, *operands, **attrs)


def _scaled(b: _Builder, name: str, v: Any, alpha: Any) -> Any:
    return b.emit(f"{name}_alpha", "mul", v, alpha)


def _to_arg(v: Any) -> Any:
    if isinstance(v, Ref):
        return v
    if isinstance(v, torch.fx.Node):
        return Ref(v.name)
    if isinstance(v, torch.Size):
        return tuple(int(d) for d in v)
    if isinstance(v, (list, tuple)):
        return type(v)(_to_arg(x) for x in v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"argument of type {type(v).__name__} ({v!r}) cannot be expressed on shares")
