"""The ONNX op converters of :func:`veil.nn.onnx.from_onnx`, one function per op family, registered in
:data:`veil.nn.onnx.CONVERTERS` with ``@converts(...)`` (the table in ``onnx.py``'s docstring says
what each op becomes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from veil.nn.graph import Ref
from veil.nn.onnx import (
    _FLOAT_TYPES,
    Value,
    _axes,
    _check_2d,
    _Const,
    _Dim,
    _Importer,
    _ints,
    _Node,
    _Problem,
    _Shape,
    _symmetric,
    converts,
)


# ---- layers --------------------------------------------------------------------------------------
@converts("Conv")
def _conv(imp: _Importer, n: _Node) -> Value:
    w = n.inputs[1]
    kernel = list(np.shape(w.value))[2:] if isinstance(w, _Const) else _ints(n.attrs.get("kernel_shape", []))
    _check_2d(n, kernel)
    pads = _symmetric(n, kernel)
    x = imp.ref(n.inputs[0])
    weight = imp.operand(w, n, "weight")
    bias = imp.operand(n.inputs[2], n, "bias") if len(n.inputs) > 2 and n.inputs[2] is not None else None
    return imp.b.emit(n.base, "conv2d", x, weight, bias, stride=_ints(n.attrs.get("strides", [1, 1])),
                      padding=pads, dilation=_ints(n.attrs.get("dilations", [1, 1])),
                      groups=int(n.attrs.get("group", 1)))


@converts("Gemm")
def _gemm(imp: _Importer, n: _Node) -> Value:
    a = imp.ref(n.inputs[0])
    alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
    trans_b = int(n.attrs.get("transB", 0))
    if int(n.attrs.get("transA", 0)):
        a = imp.b.emit(f"{n.base}.transpose", "transpose", a, dim0=0, dim1=1)
    b_in, c_in = n.inputs[1], n.inputs[2] if len(n.inputs) > 2 else None
    if isinstance(b_in, _Const):
        w = b_in.value if trans_b else b_in.value.T
        weight = imp.param(b_in, f"{n.base}.weight") if trans_b and alpha == 1.0 else \
            imp.new_param(f"{n.base}.weight", w * alpha)
        bias = None
        if isinstance(c_in, _Const):
            out_features = w.shape[0]
            if c_in.value.shape == (out_features,) and beta == 1.0:
                bias = imp.param(c_in, f"{n.base}.bias")
            elif c_in.value.size == 1 or c_in.value.shape in ((out_features,), (1, out_features)):
                bias = imp.new_param(f"{n.base}.bias", np.broadcast_to(c_in.value.reshape(-1) * beta, out_features))
            else:
                raise _Problem(f"its bias C of shape {list(c_in.value.shape)} is not one value per output "
                               f"feature ({out_features},)")
            c_in = None
        out = imp.b.emit(n.base, "linear", a, weight, bias)
    else:
        b_ref = imp.ref(b_in, "B")
        if trans_b:
            b_ref = imp.b.emit(f"{n.base}.transpose_b", "transpose", b_ref, dim0=0, dim1=1)
        out = imp.b.emit(n.base, "matmul", a, b_ref)
        if alpha != 1.0:
            out = imp.b.emit(f"{n.base}.alpha", "mul", out, alpha)
    if c_in is not None:
        c_arg = imp.operand(c_in, n, "bias")
        if beta != 1.0:
            c_arg = imp.b.emit(f"{n.base}.beta", "mul", c_arg, beta)
        out = imp.b.emit(f"{n.base}.add", "add", out, c_arg)
    return out


@converts("MatMul")
def _matmul(imp: _Importer, n: _Node) -> Value:
    a, b = n.inputs[0], n.inputs[1]
    if isinstance(b, _Const) and b.value.ndim == 2 and isinstance(a, Ref):
        return imp.b.emit(n.base, "linear", a, imp.new_param(f"{n.base}.weight", b.value.T), None)
    return imp.b.emit(n.base, "matmul", imp.operand(a, n, "A"), imp.operand(b, n, "B"))


@converts("BatchNormalization")
def _batch_norm(imp: _Importer, n: _Node) -> Value:
    if int(n.attrs.get("training_mode", 0)):
        raise _Problem("training_mode=1 normalises by batch statistics; export the model in eval() mode")
    imp.unused(n, 1, 2)
    x = imp.ref(n.inputs[0])
    gamma, beta, mean, var = (imp.const(v, w).astype(np.float64)
                              for v, w in zip(n.inputs[1:5], ("scale", "B", "mean", "var")))
    scale = gamma / np.sqrt(var + float(n.attrs.get("epsilon", 1e-5)))
    shift = beta - mean * scale
    src = n.inputs[1]
    prefix = src.name[:-len(".weight")] if isinstance(src, _Const) and src.name.endswith(".weight") else n.base
    return imp.b.emit(n.base, "batch_norm", x, imp.new_param(f"{prefix}.scale", scale),
                      imp.new_param(f"{prefix}.shift", shift))


# ---- activations ---------------------------------------------------------------------------------
@converts("Relu", "Sigmoid", "Tanh", "Neg")
def _unary(imp: _Importer, n: _Node) -> Value:
    return imp.b.emit(n.base, n.op.lower(), imp.ref(n.inputs[0]))


@converts("Softmax", "LogSoftmax")
def _softmax(imp: _Importer, n: _Node) -> Value:
    axis = int(n.attrs.get("axis", -1 if imp.opset >= 13 else 1))
    if imp.opset < 13:  # before opset 13: softmax over all dimensions from axis on, flattened
        rank = imp.rank(n.input_names[0])
        if rank is None or axis % rank != rank - 1:
            raise _Problem(f"opset {imp.opset} {n.op} with axis={axis} normalises over the flattened "
                           f"dimensions from axis on; re-export with opset_version >= 13")
    return imp.b.emit(n.base, "softmax" if n.op == "Softmax" else "log_softmax", imp.ref(n.inputs[0]), dim=axis)


# ---- pooling -------------------------------------------------------------------------------------
def _pool_options(n: _Node) -> dict[str, Any]:
    kernel = _ints(n.attrs.get("kernel_shape", []))
    _check_2d(n, kernel)
    if int(n.attrs.get("ceil_mode", 0)):
        raise _Problem("ceil_mode=1 is not supported; export with ceil_mode=False")
    if any(d != 1 for d in _ints(n.attrs.get("dilations", [1, 1]))):
        raise _Problem("dilated pooling is not supported")
    pads = _symmetric(n, kernel)
    if any(p > k // 2 for p, k in zip(pads, kernel)):
        raise _Problem(f"pads {pads} exceed half the kernel {kernel}")
    return {"kernel_size": kernel, "stride": _ints(n.attrs.get("strides", [1, 1])), "padding": pads}


@converts("MaxPool")
def _max_pool(imp: _Importer, n: _Node) -> Value:
    imp.unused(n, 1)
    options = _pool_options(n)
    return imp.b.emit(n.base, "max_pool2d", imp.ref(n.inputs[0]), **options)


@converts("AveragePool")
def _avg_pool(imp: _Importer, n: _Node) -> Value:
    options = _pool_options(n)
    if any(options["padding"]) and not int(n.attrs.get("count_include_pad", 0)):
        raise _Problem("count_include_pad=0 with padding divides border windows by fewer elements; Veil's "
                       "avg_pool2d counts the padding: use AvgPool2d(count_include_pad=True) or pad explicitly")
    return imp.b.emit(n.base, "avg_pool2d", imp.ref(n.inputs[0]), **options)


@converts("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(imp: _Importer, n: _Node) -> Value:
    shape = imp.shapes.get(n.input_names[0])
    if shape is not None and len(shape) != 4:
        raise _Problem(f"{n.op} of a {len(shape)}-D tensor is not supported (only N x C x H x W)")
    x = imp.ref(n.inputs[0])
    if n.op == "GlobalAveragePool":
        return imp.b.emit(n.base, "adaptive_avg_pool2d", x, output_size=[1, 1])
    if shape is None or shape[2] is None or shape[3] is None:
        raise _Problem("GlobalMaxPool needs a known spatial size; export with a fixed input size")
    kernel = [int(shape[2]), int(shape[3])]
    return imp.b.emit(n.base, "max_pool2d", x, kernel_size=kernel, stride=kernel, padding=[0, 0])


# ---- arithmetic ----------------------------------------------------------------------------------
@converts("Add", "Sub", "Mul", "Div")
def _arith(imp: _Importer, n: _Node) -> Value:
    a, b = n.inputs[0], n.inputs[1]
    op = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "truediv"}[n.op]
    if op == "truediv" and isinstance(b, _Const) and not (b.public and b.value.size == 1):
        if np.any(b.value == 0):
            raise _Problem("division by a constant that holds zeros")
        recip = 1.0 / b.value.astype(np.float64)  # a weight divisor: multiply by its reciprocal, no secret division
        return imp.b.emit(n.base, "mul", imp.operand(a, n, "A"), imp.new_param(f"{n.base}.reciprocal", recip))
    return imp.b.emit(n.base, op, imp.operand(a, n, "A"), imp.operand(b, n, "B"))


@converts("ReduceMean", "ReduceSum")
def _reduce(imp: _Importer, n: _Node) -> Value:
    x = imp.ref(n.inputs[0])
    axes = _axes(imp, n) if "axes" in n.attrs or (len(n.inputs) > 1 and n.inputs[1] is not None) else []
    if not axes:
        if int(n.attrs.get("noop_with_empty_axes", 0)):
            return x
        rank = imp.rank(n.input_names[0])
        if rank is None:
            raise _Problem(f"{n.op} over all dimensions of a tensor of unknown rank")
        axes = list(range(rank))
    op = "mean" if n.op == "ReduceMean" else "sum"
    return imp.b.emit(n.base, op, x, dim=axes, keepdim=bool(int(n.attrs.get("keepdims", 1))))


# ---- shape ---------------------------------------------------------------------------------------
@converts("Identity", "Dropout")
def _pass_through(imp: _Importer, n: _Node) -> Value | None:
    if n.op == "Dropout":
        imp.unused(n, 1)
        training = n.inputs[2] if len(n.inputs) > 2 else None
        if isinstance(training, _Const) and bool(training.value.reshape(-1)[0]):
            raise _Problem("training_mode=True drops activations at random; export the model in eval() mode")
    return n.inputs[0]


@converts("Cast")
def _cast(imp: _Importer, n: _Node) -> Value | None:
    if isinstance(n.inputs[0], Ref) and int(n.attrs.get("to", 1)) not in _FLOAT_TYPES:
        raise _Problem("casting a tensor to an integer or boolean type is not supported on shares")
    return n.inputs[0]


@converts("Flatten")
def _flatten(imp: _Importer, n: _Node) -> Value:
    x = imp.ref(n.inputs[0])
    axis = int(n.attrs.get("axis", 1))
    if axis < 0:
        rank = imp.rank(n.input_names[0])
        if rank is None:
            raise _Problem(f"Flatten with axis={axis} of a tensor of unknown rank")
        axis += rank
    if axis == 0:
        return imp.b.emit(n.base, "reshape", x, (1, -1))
    out = imp.b.emit(n.base, "flatten", x, start_dim=axis)  # ONNX's Flatten always gives 2-D
    return out if axis == 1 else imp.b.emit(f"{n.base}.outer", "flatten", out, start_dim=0, end_dim=axis - 1)


@converts("Reshape")
def _reshape(imp: _Importer, n: _Node) -> Value:
    x = imp.ref(n.inputs[0])
    target = n.inputs[1]
    items = list(target.items) if isinstance(target, _Shape) else list[int | _Dim](_ints(imp.const(target, "shape")))
    if not int(n.attrs.get("allowzero", 0)):  # 0 copies the input's dimension
        items = [_Dim(x, n.input_names[0], i) if d == 0 else d for i, d in enumerate(items)]
    static = imp.shapes.get(n.input_names[0]) or []
    first = items[0] if items else None
    keeps_first = (isinstance(first, _Dim) and first.ref == x and first.index == 0) or (
        isinstance(first, int) and first > 0 and bool(static) and static[0] == first)
    if not keeps_first:
        return imp.b.emit(n.base, "reshape", x, tuple(imp.size(d, n.base) if isinstance(d, _Dim) else d for d in items))
    rest = [imp.size(d, n.base) if isinstance(d, _Dim) else d for d in items[1:]]
    if rest == [-1]:
        return imp.b.emit(n.base, "flatten", x, start_dim=1)
    ints = [d for d in rest if isinstance(d, int)]
    if len(ints) == len(rest):
        if -1 not in ints:
            return imp.b.emit(n.base, "reshape", x, (-1, *ints))
        tail = [d for d in static[1:] if d is not None]
        if static and len(tail) == len(static) - 1:  # the -1 is known: the first dimension can be the free one
            free = _prod(tail) // -_prod(ints)
            return imp.b.emit(n.base, "reshape", x, (-1, *(free if d == -1 else d for d in ints)))
    return imp.b.emit(n.base, "reshape", x, (imp.b.emit(f"{n.base}.size", "size", x, dim=0), *rest))


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


@converts("Transpose")
def _transpose(imp: _Importer, n: _Node) -> Value:
    x = imp.ref(n.inputs[0])
    perm = n.attrs.get("perm")
    if perm is None:
        rank = imp.rank(n.input_names[0])
        if rank is None:
            raise _Problem("Transpose without perm of a tensor of unknown rank")
        perm = list(reversed(range(rank)))
    return imp.b.emit(n.base, "permute", x, dims=_ints(perm))


@converts("Concat")
def _concat(imp: _Importer, n: _Node) -> Value:
    axis = int(n.attrs["axis"])
    if any(isinstance(v, _Shape) for v in n.inputs):
        items: list[int | _Dim] = []
        for v in n.inputs:
            items.extend(v.items if isinstance(v, _Shape) else _ints(imp.const(v, "shape part")))
        return _Shape(tuple(items))
    return imp.b.emit(n.base, "cat", [imp.operand(v, n, f"input{i}") for i, v in enumerate(n.inputs)], dim=axis)


@converts("Constant")
def _constant(imp: _Importer, n: _Node) -> Value:
    import onnx.numpy_helper

    a = n.attrs
    if "value" in a:
        value = onnx.numpy_helper.to_array(a["value"])
    elif "value_float" in a or "value_int" in a:
        value = np.array(a.get("value_float", a.get("value_int")))
    elif "value_floats" in a or "value_ints" in a:
        value = np.array(a.get("value_floats", a.get("value_ints")))
    else:
        raise _Problem(f"a Constant with {sorted(a)} is not supported")
    return _Const(value, n.outputs[0], True)


@converts("Shape")
def _shape(imp: _Importer, n: _Node) -> Value:
    x = imp.ref(n.inputs[0])
    rank = imp.rank(n.input_names[0])
    if rank is None:
        raise _Problem("Shape of a tensor of unknown rank")
    dims = range(rank)[slice(n.attrs.get("start"), n.attrs.get("end"))]
    return _Shape(tuple(_Dim(x, n.input_names[0], i) for i in dims))


@converts("Gather")
def _gather(imp: _Importer, n: _Node) -> Value:
    data, indices = n.inputs[0], imp.const(n.inputs[1], "indices")
    if not isinstance(data, _Shape) or int(n.attrs.get("axis", 0)) != 0:
        raise _Problem("indexing a tensor with Gather is not supported; only the shape arithmetic of "
                       "x.view(x.size(0), -1) is")
    picked = tuple(data.items[i] for i in _ints(indices))
    return _Shape(picked, scalar=indices.ndim == 0)


@converts("Unsqueeze", "Squeeze")
def _unsqueeze(imp: _Importer, n: _Node) -> Value:
    data = n.inputs[0]
    if not isinstance(data, _Shape) or _axes(imp, n) not in ([0], [-1]) or data.scalar == (n.op == "Squeeze"):
        raise _Problem(f"{n.op} of a tensor is not supported; use reshape/view with explicit sizes")
    return _Shape(data.items, scalar=n.op == "Squeeze")


@converts("Slice")
def _slice(imp: _Importer, n: _Node) -> Value:
    data = n.inputs[0]
    if not isinstance(data, _Shape):
        raise _Problem("slicing a tensor is not supported; only slicing a shape is")
    starts, ends = _ints(imp.const(n.inputs[1], "starts")), _ints(imp.const(n.inputs[2], "ends"))
    steps = _ints(imp.const(n.inputs[4], "steps")) if len(n.inputs) > 4 and n.inputs[4] is not None else [1]
    return _Shape(data.items[slice(starts[0], ends[0], steps[0])])
