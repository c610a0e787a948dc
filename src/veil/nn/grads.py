"""The backward rules of :mod:`veil.nn.autodiff`, one per graph op, beside the forward rules of the
ops whose backward needs something from the forward pass (a ReLU's sign bit, a max-pool's tournament
bits, a sigmoid's output, BatchNorm's normalised input). See :mod:`veil.nn.autodiff` for their costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from veil.mpc.tensor import SecretTensor
from veil.nn.autodiff import (
    Ctx,
    UnsupportedGradientError,
    _pair,
    _products,
    _shape,
    backward_rule,
    forward_rule,
    times_bit,
    unbroadcast,
)
from veil.nn.ops import IMPLEMENTATIONS, is_secret


# ---- linear layers -------------------------------------------------------------------------------
@backward_rule("linear")
def _linear_back(ctx: Ctx, g: SecretTensor, want: list[bool]) -> tuple[Any, ...]:
    x, w = ctx["args"][0], ctx["args"][1]
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    gx, gw = _products(want[:2], [(g, w, "matmul", {}), (g2.t(), x2, "matmul", {})])
    gb = g2.sum(0) if len(want) > 2 and want[2] else None
    return gx, gw, gb


@backward_rule("matmul")
def _matmul_back(ctx: Ctx, g: SecretTensor, want: list[bool]) -> tuple[Any, ...]:
    a, b = ctx["args"]
    if a.dim() < 2 or b.dim() < 2:
        raise UnsupportedGradientError("matmul backward needs operands with at least two dimensions")
    ga, gb = _products(want, [(g, b.transpose(-1, -2), "matmul", {}), (a.transpose(-1, -2), g, "matmul", {})])
    return (unbroadcast(ga, _shape(a)) if ga is not None else None,
            unbroadcast(gb, _shape(b)) if gb is not None else None)


@backward_rule("conv2d")
def _conv_back(ctx: Ctx, g: SecretTensor, want: list[bool], *, stride: Any = 1, padding: Any = 0,
               dilation: Any = 1, groups: int = 1) -> tuple[Any, ...]:
    x, w = ctx["args"][0], ctx["args"][1]
    if isinstance(padding, str):
        raise UnsupportedGradientError("conv2d backward with string padding: give explicit padding")
    if not is_secret(g):
        raise UnsupportedGradientError("conv2d backward needs a secret output gradient")
    if want[1] and not is_secret(x):
        raise UnsupportedGradientError("training a first convolution on a public input: share the input")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = w.shape[-2], w.shape[-1]
    h, wd = x.shape[-2], x.shape[-1]
    out_pad = ((h + 2 * ph - dh * (kh - 1) - 1) % sh, (wd + 2 * pw - dw * (kw - 1) - 1) % sw)
    geometry = {"stride": (sh, sw), "padding": (ph, pw), "dilation": (dh, dw), "groups": groups}
    gx, gw = _products(want[:2], [
        (g, w, "conv_transpose2d", {**geometry, "output_padding": out_pad}),
        (x, g, "conv2d_weight", {**geometry, "weight_shape": list(w.shape)}),
    ])
    gb = g.sum((0, 2, 3)) if len(want) > 2 and want[2] else None
    return gx, gw, gb


# ---- activations ---------------------------------------------------------------------------------
@forward_rule("relu")
def _relu_fwd(x: Any) -> tuple[Any, Ctx]:
    if not is_secret(x):
        return x.relu(), {"mask": (x > 0).to(x.dtype)}
    bit, (xb,) = x.protocol.msb(x.share, [x.share])
    return x._new(x.share - xb), {"bit": bit}


@backward_rule("relu")
def _relu_back(ctx: Ctx, g: Any, want: list[bool]) -> tuple[Any, ...]:
    if "mask" in ctx:
        return (g * ctx["mask"],)
    return (g - times_bit(g, ctx["bit"]),)  # d relu = 1 - [x < 0]


@forward_rule("sigmoid")
def _sigmoid_fwd(x: Any) -> tuple[Any, Ctx]:
    y = x.sigmoid()
    return y, {"y": y}


@backward_rule("sigmoid")
def _sigmoid_back(ctx: Ctx, g: Any, want: list[bool]) -> tuple[Any, ...]:
    y = ctx["y"]
    return (g * (y - y.square() if is_secret(y) else y * (1 - y)),)


@forward_rule("tanh")
def _tanh_fwd(x: Any) -> tuple[Any, Ctx]:
    y = x.tanh()
    return y, {"y": y}


@backward_rule("tanh")
def _tanh_back(ctx: Ctx, g: Any, want: list[bool]) -> tuple[Any, ...]:
    y = ctx["y"]
    return (g * (1 - (y.square() if is_secret(y) else y * y)),)


@forward_rule("softmax")
def _softmax_fwd(x: Any, *, dim: int) -> tuple[Any, Ctx]:
    y = x.softmax(dim)
    return y, {"y": y}


@backward_rule("softmax")
def _softmax_back(ctx: Ctx, g: Any, want: list[bool], *, dim: int) -> tuple[Any, ...]:
    y = ctx["y"]
    return (y * (g - (g * y).sum(dim, keepdim=True)),)


@forward_rule("log_softmax")
def _log_softmax_fwd(x: Any, *, dim: int) -> tuple[Any, Ctx]:
    y = IMPLEMENTATIONS["log_softmax"](x, dim=dim)
    return y, {"y": y}


@backward_rule("log_softmax")
def _log_softmax_back(ctx: Ctx, g: Any, want: list[bool], *, dim: int) -> tuple[Any, ...]:
    y = ctx["y"]
    p = y.exp(upper=0.0) if is_secret(y) else y.exp()  # y <= 0: a log-probability
    return (g - p * g.sum(dim, keepdim=True),)


# ---- pooling -------------------------------------------------------------------------------------
def _window_view(x: Any, kernel: Any, stride: Any, padding: Any, fill: float) -> tuple[Any, tuple]:
    """Windows of ``x`` as the last dimension (shares or plaintext), and the geometry to fold back."""
    kh, kw = _pair(kernel)
    sh, sw = _pair(kernel if stride is None else stride)
    ph, pw = _pair(padding)
    geometry = (tuple(x.shape), kh, kw, sh, sw, ph, pw)
    return x, geometry


def fold_windows(gw: Any, geometry: tuple) -> Any:
    """Scatter-add per-window gradients ``(..., OH, OW, kh*kw)`` back to the input's positions (the
    transpose of unfolding; local on shares)."""
    shape, kh, kw, sh, sw, ph, pw = geometry
    secret = is_secret(gw)
    t = gw.share if secret else gw
    lead = shape[:-2]
    h, w = shape[-2] + 2 * ph, shape[-1] + 2 * pw
    oh, ow = t.shape[-3], t.shape[-2]
    out = torch.zeros((*lead, h, w), dtype=t.dtype, device=t.device)
    t = t.reshape(*lead, oh, ow, kh, kw)
    for i in range(kh):
        for j in range(kw):
            out[..., i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += t[..., i, j]
    out = out[..., ph:ph + shape[-2], pw:pw + shape[-1]]
    return gw._new(out) if secret else out


@forward_rule("max_pool2d")
def _max_pool_fwd(x: Any, *, kernel_size: Any, stride: Any = None, padding: Any = 0) -> tuple[Any, Ctx]:
    _, geometry = _window_view(x, kernel_size, stride, padding, 0.0)
    if not is_secret(x):
        out, idx = torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, return_indices=True)
        return out, {"geometry": geometry, "indices": idx}
    from veil.mpc.nonlinear import _windows

    win = _windows(x, kernel_size, stride, padding, -(1 << 62) + 1)
    vals, levels = win, []
    proto = x.protocol
    while vals.shape[-1] > 1:
        k = vals.shape[-1]
        even = k - (k % 2)
        a, b = vals[..., 0:even:2], vals[..., 1:even:2]
        bit, (prod,) = proto.msb(a - b, [a - b])  # bit = [a < b]: b wins
        new = a - prod
        if k % 2:
            new = torch.cat([new, vals[..., -1:]], -1)
        levels.append((bit, k))
        vals = new
    return x._new(vals[..., 0]), {"geometry": geometry, "levels": levels}


@backward_rule("max_pool2d")
def _max_pool_back(ctx: Ctx, g: Any, want: list[bool], **_: Any) -> tuple[Any, ...]:
    geometry = ctx["geometry"]
    if "indices" in ctx:
        shape = geometry[0]
        flat = torch.zeros(shape, dtype=g.dtype).flatten(-2)
        flat.scatter_add_(-1, ctx["indices"].flatten(-2), g.flatten(-2))
        return (flat.reshape(shape),)
    cur = g.unsqueeze(-1)  # gradient of the winners of the last level
    for bit, k in reversed(ctx["levels"]):
        even = k - (k % 2)
        head = cur[..., : even // 2]
        to_b = times_bit(head, bit)  # b won where bit = 1
        to_a = head - to_b
        parts = torch.stack([to_a.share, to_b.share], -1).flatten(-2)
        if k % 2:
            parts = torch.cat([parts, cur.share[..., -1:]], -1)
        cur = g._new(parts)
    return (fold_windows(cur, geometry),)


@backward_rule("avg_pool2d")
def _avg_pool_back(ctx: Ctx, g: Any, want: list[bool], *, kernel_size: Any, stride: Any = None,
                   padding: Any = 0) -> tuple[Any, ...]:
    x = ctx["args"][0]
    _, geometry = _window_view(x, kernel_size, stride, padding, 0.0)
    kh, kw = _pair(kernel_size)
    spread = (g * (1.0 / (kh * kw))).unsqueeze(-1)
    spread = spread.expand(*spread.shape[:-1], kh * kw).contiguous()
    return (fold_windows(spread, geometry),)


@backward_rule("adaptive_avg_pool2d")
def _adaptive_back(ctx: Ctx, g: Any, want: list[bool], *, output_size: Any) -> tuple[Any, ...]:
    from veil.nn.ops import adaptive_matrix, matmul

    x = ctx["args"][0]
    h, w = x.shape[-2], x.shape[-1]
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    rows, cols = adaptive_matrix(h, oh), adaptive_matrix(w, ow)
    return (matmul(matmul(rows.t(), g), cols),)


# ---- arithmetic ----------------------------------------------------------------------------------
@backward_rule("add")
def _add_back(ctx: Ctx, g: Any, want: list[bool]) -> tuple[Any, ...]:
    a, b = ctx["args"]
    return (unbroadcast(g, _shape(a)) if want[0] else None, unbroadcast(g, _shape(b)) if want[1] else None)


@backward_rule("sub")
def _sub_back(ctx: Ctx, g: Any, want: list[bool]) -> tuple[Any, ...]:
    a, b = ctx["args"]
    return (unbroadcast(g, _shape(a)) if want[0] else None, unbroadcast(-g, _shape(b)) if want[1] else None)


@backward_rule("neg")
def _neg_back(ctx: Ctx, g: Any, want: list[bool]) -> tuple[Any, ...]:
    return (-g,)


@backward_rule("mul")
def _mul_back(ctx: Ctx, g: Any, want: list[bool]) -> tuple[Any, ...]:
    a, b = ctx["args"]
    if not is_secret(g):
        from veil.nn.ops import mul

        return (unbroadcast(mul(g, b), _shape(a)) if want[0] else None,
                unbroadcast(mul(g, a), _shape(b)) if want[1] else None)
    ga, gb = _products(want, [(g, b, "mul", {}), (g, a, "mul", {})])
    return (unbroadcast(ga, _shape(a)) if ga is not None else None,
            unbroadcast(gb, _shape(b)) if gb is not None else None)


@backward_rule("truediv")
def _div_back(ctx: Ctx, g: Any, want: list[bool]) -> tuple[Any, ...]:
    a, b = ctx["args"]
    if want[1] or is_secret(b):
        raise UnsupportedGradientError("training through a division by a secret is not supported")
    return (unbroadcast(g * (1.0 / torch.as_tensor(b, dtype=torch.float64)), _shape(a)), None)


@backward_rule("sum", "mean")
def _sum_back(ctx: Ctx, g: Any, want: list[bool], *, dim: Any = None, keepdim: bool = False) -> tuple[Any, ...]:
    x = ctx["args"][0]
    shape = _shape(x)
    dims = tuple(range(len(shape))) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    dims = tuple(d % len(shape) for d in dims)
    if not keepdim:
        for d in sorted(dims):
            g = g.unsqueeze(d)
    g = g.expand(*shape)
    count = 1
    for d in dims:
        count *= shape[d]
    return (g * (1.0 / count) if ctx.get("mean") else g,)


@forward_rule("mean")
def _mean_fwd(x: Any, *, dim: Any = None, keepdim: bool = False) -> tuple[Any, Ctx]:
    return IMPLEMENTATIONS["mean"](x, dim=dim, keepdim=keepdim), {"args": (x,), "mean": True}


@backward_rule("batch_norm")
def _bn_back(ctx: Ctx, g: Any, want: list[bool]) -> tuple[Any, ...]:
    from veil.nn.ops import _channel_view, mul

    x, scale, _shift = ctx["args"]
    nd = x.dim()
    gx = mul(g, _channel_view(scale, nd)) if want[0] else None
    reduce_dims = (0, *range(2, nd))
    gs = mul(g, x).sum(reduce_dims) if want[1] else None
    gsh = g.sum(reduce_dims) if want[2] else None
    return gx, gs, gsh


@forward_rule("batch_norm_train")
def _bn_train_fwd(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, *, eps: float,
                  momentum: float, prefix: str = "") -> tuple[Any, Ctx]:
    """Batch statistics over every dimension but the channels (1): ``xhat = (x - mean) rsqrt(var + eps)``
    (one square, :func:`veil.mpc.approx.rsqrt_wide`, one product), ``y = xhat w + b`` (one product);
    the running statistics move by ``momentum`` (the variance unbiased, as PyTorch)."""
    from veil.mpc.approx import rsqrt_wide
    from veil.nn.ops import _channel_view, add, mul

    if not is_secret(x):
        raise UnsupportedGradientError("training BatchNorm on a public input: share the input")
    nd = x.dim()
    dims = (0, *range(2, nd))
    count = x.numel() // x.shape[1] if nd > 1 and x.shape[1] else 0
    if count < 2:
        raise ValueError(f"BatchNorm {prefix!r}: training needs more than one value per channel, got an "
                         f"input of shape {tuple(x.shape)} (a batch of one row: choose a batch size that "
                         f"leaves none, as PyTorch's drop_last)")
    mean = x.mean(dims)
    xc = x - _channel_view(mean, nd)
    var = xc.square().mean(dims)
    inv = rsqrt_wide(var + eps)
    xhat = xc * _channel_view(inv, nd)
    y = mul(xhat, _channel_view(weight, nd)) if weight is not None else xhat
    if bias is not None:
        y = add(y, _channel_view(bias, nd))
    unbiased = var * (count / max(count - 1, 1))
    updates = {3: running_mean * (1 - momentum) + mean * momentum,
               4: running_var * (1 - momentum) + unbiased * momentum}
    return y, {"xhat": xhat, "inv": inv, "weight": weight, "count": count, "updates": updates}


@backward_rule("batch_norm_train")
def _bn_train_back(ctx: Ctx, g: Any, want: list[bool], **_: Any) -> tuple[Any, ...]:
    """``dx = inv (dxhat - mean(dxhat) - xhat mean(dxhat xhat))`` with ``dxhat = g w``;
    ``dw = sum(g xhat)``, ``db = sum(g)`` (over every dimension but the channels)."""
    from veil.nn.ops import _channel_view

    xhat, inv, weight = ctx["xhat"], ctx["inv"], ctx["weight"]
    nd = xhat.dim()
    dims = (0, *range(2, nd))
    w_view = _channel_view(weight, nd) if weight is not None else None
    dxhat, g_xhat = _products([w_view is not None, want[1]],
                              [(g, w_view, "mul", {}), (g, xhat, "mul", {})])
    dxhat = g if dxhat is None else dxhat
    dw = g_xhat.sum(dims) if g_xhat is not None else None
    db = g.sum(dims) if len(want) > 2 and want[2] else None
    gx = None
    if want[0]:
        (proj,) = _products([True], [(dxhat, xhat, "mul", {})])
        centered = dxhat - _channel_view(dxhat.mean(dims), nd)
        (corr,) = _products([True], [(xhat, _channel_view(proj.mean(dims), nd), "mul", {})])
        (gx,) = _products([True], [(centered - corr, _channel_view(inv, nd), "mul", {})])
    return gx, dw, db, None, None


# ---- shape ---------------------------------------------------------------------------------------
@backward_rule("flatten", "reshape")
def _reshape_back(ctx: Ctx, g: Any, want: list[bool], **_: Any) -> tuple[Any, ...]:
    return (g.reshape(*_shape(ctx["args"][0])), None)


@backward_rule("transpose")
def _transpose_back(ctx: Ctx, g: Any, want: list[bool], *, dim0: int, dim1: int) -> tuple[Any, ...]:
    return (g.transpose(dim0, dim1),)


@backward_rule("permute")
def _permute_back(ctx: Ctx, g: Any, want: list[bool], *, dims: Sequence[int]) -> tuple[Any, ...]:
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d % len(dims)] = i
    return (g.permute(*inverse),)


@backward_rule("identity")
def _identity_back(ctx: Ctx, g: Any, want: list[bool]) -> tuple[Any, ...]:
    return (g,)


@backward_rule("cat")
def _cat_back(ctx: Ctx, g: Any, want: list[bool], *, dim: int = 0) -> tuple[Any, ...]:
    parts, start = [], 0
    for t in ctx["args"][0]:
        n = t.shape[dim]
        index = [slice(None)] * g.dim()
        index[dim] = slice(start, start + n)
        parts.append(g[tuple(index)])
        start += n
    return (parts,)
