"""What each graph op computes, on secret shares or on plaintext tensors alike.

One function per op of :data:`veil.nn.graph.OPS`, registered in :data:`IMPLEMENTATIONS` with
``@implements(op)``. Every function accepts :class:`~veil.mpc.tensor.SecretTensor` operands (secure
execution) and plain ``torch.Tensor`` operands (the same program in the clear, which the tests use to
check a conversion against the original module). Costs of the secure versions are those of the engine
(see :mod:`veil.mpc.nonlinear` and :mod:`veil.mpc.approx`): linear layers are one Beaver round,
ReLU 5 rounds, a k x k max-pool ``5 ceil(log2 k^2)`` rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import veil
from veil.mpc.tensor import SecretTensor

Impl = Callable[..., Any]
IMPLEMENTATIONS: dict[str, Impl] = {}


def implements(op: str) -> Callable[[Impl], Impl]:
    def deco(fn: Impl) -> Impl:
        if op in IMPLEMENTATIONS:
            raise ValueError(f"op {op!r} implemented twice")
        IMPLEMENTATIONS[op] = fn
        return fn

    return deco


def is_secret(v: Any) -> bool:
    return isinstance(v, SecretTensor)


class SecureOpError(ValueError):
    """An op applied to operands it cannot take (e.g. a public input with secret weights)."""


# ---- linear layers -------------------------------------------------------------------------------
@implements("linear")
def linear(x: Any, weight: Any, bias: Any = None) -> Any:
    if not is_secret(x) and not is_secret(weight):
        return F.linear(x, weight, bias)
    out = matmul(x, weight.t())
    return out if bias is None else add(out, bias)


@implements("conv2d")
def conv2d(x: Any, weight: Any, bias: Any = None, *, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
           groups: int = 1) -> Any:
    if is_secret(x):
        return x.conv2d(weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    if is_secret(weight):
        raise SecureOpError("conv2d of a public input with secret weights: share the input first")
    return F.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


def _channel_view(v: Any, ndim: int) -> Any:
    """A per-channel vector shaped to broadcast over dimension 1 of an ``ndim``-dimensional input."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))


@implements("batch_norm")
def batch_norm(x: Any, scale: Any, shift: Any) -> Any:
    """Inference batch norm as the affine map ``x * scale + shift`` per channel (running statistics
    folded into ``scale`` and ``shift`` at conversion)."""
    return add(mul(x, _channel_view(scale, x.dim())), _channel_view(shift, x.dim()))


@implements("batch_norm_train")
def batch_norm_eval(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, *, eps: float,
                    momentum: float, prefix: str = "") -> Any:
    """A trainable BatchNorm outside training: normalise with the running statistics (an inverse
    square root of the secret running variance, see :func:`veil.mpc.approx.rsqrt_wide`)."""
    if not is_secret(x) and not is_secret(running_var):
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    from veil.mpc.approx import rsqrt_wide

    inv = rsqrt_wide(running_var + eps) if is_secret(running_var) else (running_var + eps).rsqrt()
    scale = mul(inv, weight) if weight is not None else inv
    y = mul(sub(x, _channel_view(running_mean, x.dim())), _channel_view(scale, x.dim()))
    return y if bias is None else add(y, _channel_view(bias, x.dim()))


# ---- activations ---------------------------------------------------------------------------------
@implements("relu")
def relu(x: Any) -> Any:
    return x.relu()


@implements("sigmoid")
def sigmoid(x: Any) -> Any:
    return x.sigmoid()


@implements("tanh")
def tanh(x: Any) -> Any:
    return x.tanh()


@implements("softmax")
def softmax(x: Any, *, dim: int) -> Any:
    return x.softmax(dim)


@implements("log_softmax")
def log_softmax(x: Any, *, dim: int) -> Any:
    """``x - max - log(sum(exp(x - max)))``: the log's argument lies in [1, n] along ``dim``."""
    if not is_secret(x):
        return F.log_softmax(x, dim)
    shifted = x - x.amax(dim, keepdim=True)
    return shifted - shifted.exp(upper=0.0).sum(dim, keepdim=True).log()


# ---- pooling -------------------------------------------------------------------------------------
@implements("max_pool2d")
def max_pool2d(x: Any, *, kernel_size: Any, stride: Any = None, padding: Any = 0) -> Any:
    if is_secret(x):
        return x.max_pool2d(kernel_size, stride, padding)
    return F.max_pool2d(x, kernel_size, stride, padding)


@implements("avg_pool2d")
def avg_pool2d(x: Any, *, kernel_size: Any, stride: Any = None, padding: Any = 0) -> Any:
    if is_secret(x):
        return x.avg_pool2d(kernel_size, stride, padding)
    return F.avg_pool2d(x, kernel_size, stride, padding)


def adaptive_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """``(size_out, size_in)`` averaging matrix of PyTorch's adaptive pooling along one axis: output
    ``i`` averages inputs ``floor(i n / m)`` to ``ceil((i + 1) n / m) - 1``."""
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        lo, hi = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


@implements("adaptive_avg_pool2d")
def adaptive_avg_pool2d(x: Any, *, output_size: Any) -> Any:
    """Average over PyTorch's adaptive windows: two public linear maps (rows, then columns)."""
    if not is_secret(x):
        return F.adaptive_avg_pool2d(x, output_size)
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    h, w = x.shape[-2], x.shape[-1]
    if (h, w) == (oh, ow):
        return x
    if h % oh == 0 and w % ow == 0:  # equal windows: one local sum and one scaling
        return x.avg_pool2d((h // oh, w // ow))
    rows, cols = adaptive_matrix(h, oh), adaptive_matrix(w, ow)
    return matmul(matmul(rows, x), cols.t())


# ---- arithmetic ----------------------------------------------------------------------------------
@implements("add")
def add(a: Any, b: Any) -> Any:
    return b + a if is_secret(b) and not is_secret(a) else a + b


@implements("sub")
def sub(a: Any, b: Any) -> Any:
    return (-b) + a if is_secret(b) and not is_secret(a) else a - b


@implements("mul")
def mul(a: Any, b: Any) -> Any:
    return b * a if is_secret(b) and not is_secret(a) else a * b


@implements("truediv")
def truediv(a: Any, b: Any) -> Any:
    if is_secret(b):
        return mul(a, b.reciprocal())
    return a / b


@implements("neg")
def neg(a: Any) -> Any:
    return -a


@implements("matmul")
def matmul(a: Any, b: Any) -> Any:
    if is_secret(a) or not is_secret(b):
        return a @ b
    return b.__rmatmul__(a)


@implements("sum")
def sum_(x: Any, *, dim: Any = None, keepdim: bool = False) -> Any:
    return x.sum() if dim is None else x.sum(dim, keepdim=keepdim)


@implements("mean")
def mean(x: Any, *, dim: Any = None, keepdim: bool = False) -> Any:
    return x.mean() if dim is None else x.mean(dim, keepdim=keepdim)


# ---- shape ---------------------------------------------------------------------------------------
@implements("flatten")
def flatten(x: Any, *, start_dim: int = 0, end_dim: int = -1) -> Any:
    return x.flatten(start_dim, end_dim)


@implements("reshape")
def reshape(x: Any, shape: Sequence[int]) -> Any:
    return x.reshape(*shape)


@implements("transpose")
def transpose(x: Any, *, dim0: int, dim1: int) -> Any:
    return x.transpose(dim0, dim1)


@implements("permute")
def permute(x: Any, *, dims: Sequence[int]) -> Any:
    return x.permute(*dims)


@implements("cat")
def cat(tensors: Sequence[Any], *, dim: int = 0) -> Any:
    if all(is_secret(t) for t in tensors):
        return veil.cat(list(tensors), dim)
    if any(is_secret(t) for t in tensors):
        raise SecureOpError("cat of secret and public tensors: add the public ones to a zero secret first")
    return torch.cat(list(tensors), dim)


@implements("identity")
def identity(x: Any) -> Any:
    return x


@implements("size")
def size(x: Any, *, dim: int | None = None) -> Any:
    return tuple(x.shape) if dim is None else int(x.shape[dim])


@implements("getitem")
def getitem(x: Any, index: Any) -> Any:
    return x[index]
