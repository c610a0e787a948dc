"""Every kind of correlated randomness the dealer hands out (the registry of recipes).

Each recipe runs on the dealer (full values) and on both compute parties (their shares), see
:mod:`veil.mpc.dealer`. Shapes and counts are the only parameters; all are public.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from veil.mpc import circuits, ringmath
from veil.mpc.dealer import recipe
from veil.mpc.ringmath import on_ints

Shape = tuple[int, ...]
MAX_PRODUCT_VALUES = 16  # factors of one mask_products request

def conv2d_weight(x: torch.Tensor, grad: torch.Tensor, *, weight_shape: Sequence[int], stride: Any = 1,
                  padding: Any = 0, dilation: Any = 1, groups: int = 1) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, w, ...)`` with respect to ``w`` (shape ``weight_shape``) given the
    output gradient ``grad``: bilinear in ``(x, grad)``, and written as one convolution per group so
    that it runs on int64 ring tensors (PyTorch's own ``conv2d_weight`` has no integer kernel):
    ``dW[o, i] = conv2d(x[:, i]^T, grad[:, o]^T, stride=dilation, dilation=stride)`` cropped to the
    kernel size."""
    c_out, c_in_g, kh, kw = (int(d) for d in weight_shape)
    out_g = c_out // groups
    parts = []
    for g in range(groups):
        xg = x[:, g * c_in_g:(g + 1) * c_in_g].transpose(0, 1)  # (C_in/g, N, H, W)
        dg = grad[:, g * out_g:(g + 1) * out_g].transpose(0, 1)  # (C_out/g, N, OH, OW)
        w = F.conv2d(xg, dg, padding=padding, stride=dilation, dilation=stride)  # (C_in/g, C_out/g, kh', kw')
        parts.append(w[:, :, :kh, :kw].transpose(0, 1))
    return torch.cat(parts, 0)


# The bilinear ops of products of secrets. On int64 ring elements, matrix products and
# convolutions run exactly on float64 BLAS (veil.mpc.ringmath); on floats (shape inference) as is.
BILINEAR_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "mul": lambda a, b, **kw: a * b,
    "matmul": on_ints(ringmath.matmul, lambda a, b, **kw: a @ b),
    "conv1d": on_ints(ringmath.conv1d, lambda a, b, **kw: F.conv1d(a, b, **kw)),
    "conv2d": on_ints(ringmath.conv2d, lambda a, b, **kw: F.conv2d(a, b, **kw)),
    "conv_transpose2d": on_ints(ringmath.conv_transpose2d, lambda a, b, **kw: F.conv_transpose2d(a, b, **kw)),
    "conv2d_weight": on_ints(ringmath.conv2d_weight, conv2d_weight),
}


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def output_shape(op: str, shape_x: Shape, shape_y: Shape, kwargs: dict[str, Any]) -> Shape:
    """Shape of ``op(x, y)`` from the operands' shapes alone."""
    if op == "mul":
        return tuple(np.broadcast_shapes(shape_x, shape_y))
    if op == "matmul":
        if len(shape_x) == 0 or len(shape_y) == 0:
            raise ValueError("matmul needs operands with at least one dimension")
        sx = (1, *shape_x) if len(shape_x) == 1 else tuple(shape_x)
        sy = (*shape_y, 1) if len(shape_y) == 1 else tuple(shape_y)
        if sx[-1] != sy[-2]:
            raise ValueError(f"matmul: shapes {tuple(shape_x)} and {tuple(shape_y)} cannot be multiplied")
        out = (*np.broadcast_shapes(sx[:-2], sy[:-2]), sx[-2], sy[-1])
        if len(shape_x) == 1:
            out = out[:-2] + out[-1:]
        if len(shape_y) == 1:
            out = out[:-1]
        return tuple(out)
    if op == "conv2d" and not isinstance(kwargs.get("padding", 0), str) and len(shape_x) == 4:
        (n, c_in, h, w), (c_out, c_in_g, kh, kw) = shape_x, shape_y
        groups = int(kwargs.get("groups", 1))
        if c_in != c_in_g * groups or c_out % groups:
            raise ValueError(f"conv2d: input {tuple(shape_x)} and weight {tuple(shape_y)} do not fit with "
                             f"groups={groups} (the input needs {c_in_g * groups} channels)")
        (sh, sw), (ph, pw) = _pair(kwargs.get("stride", 1)), _pair(kwargs.get("padding", 0))
        dh, dw = _pair(kwargs.get("dilation", 1))
        return (n, c_out, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
    # Other cases: run the op on zeros (small cost, rare).
    z = BILINEAR_OPS[op](torch.zeros(shape_x), torch.zeros(shape_y), **kwargs)
    return tuple(z.shape)


@recipe("triple")
def triple(box: Any, op: str, shape_x: list[int], shape_y: list[int], shape_z: list[int],
           kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Beaver triple ``(a, b, c = op(a, b))`` for a bilinear ``op`` (mul, matmul, convolutions)."""
    fn = BILINEAR_OPS[op]
    kw = kwargs or {}
    a = box.rand_arith(tuple(shape_x))
    b = box.rand_arith(tuple(shape_y))
    c = box.arith(tuple(shape_z), lambda: fn(a, b, **kw))
    return {"a": a, "b": b, "c": c}


@recipe("mask_products")
def mask_products(box: Any, n: int, values: int, pairs: list[list[int]]) -> dict[str, Any]:
    """A uniform mask per value and the product of the masks of each pair (``c_ij = a_i a_j``), for
    products that share factors; the products' corrections alternate between the parties."""
    if not isinstance(values, int) or not 1 <= values <= MAX_PRODUCT_VALUES:
        raise ValueError(f"mask_products: values must be in [1, {MAX_PRODUCT_VALUES}], got {values!r}")
    if not isinstance(pairs, list) or not 1 <= len(pairs) <= MAX_PRODUCT_VALUES ** 2 or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(k, int) and 0 <= k < values for k in p)
            for p in pairs):
        raise ValueError(f"mask_products: pairs must be a list of [i, j] with 0 <= i, j < {values}")
    masks = [box.rand_arith((n,)) for _ in range(values)]
    products = [box.arith((n,), lambda i=i, j=j: masks[i] * masks[j], to=k % 2)
                for k, (i, j) in enumerate(pairs)]
    return {"masks": masks, "products": products}


@recipe("trunc")
def trunc(box: Any, n: int, bits: int) -> dict[str, Any]:
    """For exact truncation: a uniform mask ``r``, and as arithmetic shares ``r >> bits`` (logical
    shift) and ``r``'s top bit (0/1 integer). 16 bytes per element from the dealer, split between the
    two parties."""
    if not isinstance(bits, int) or not 0 < bits < 62:
        raise ValueError(f"trunc: bits must be in (0, 62), got {bits!r}")
    r = box.rand_arith((n,))
    hi = box.arith((n,), lambda: (r >> bits) & ((1 << (64 - bits)) - 1), to=1)
    top = box.arith((n,), lambda: (r >> 63) & 1, to=0)
    return {"r": r, "hi": hi, "top": top}


@recipe("square")
def square(box: Any, n: int) -> dict[str, Any]:
    """Pair ``(a, a^2)`` for squaring a secret in one opening of 8 bytes per element."""
    a = box.rand_arith((n,))
    return {"a": a, "a2": box.arith((n,), lambda: a * a)}


def _tree_material(box: Any, n: int, r: torch.Tensor, with_lt: bool) -> dict[str, Any]:
    """XOR shares of the 15 monomials of r's planes (2 bytes each), and the AND triples of the three
    tree levels: random masks, products packed in two int16 words."""
    mono = box.bin((len(circuits.MONOMIALS), n), lambda: circuits.monomials(circuits.planes(r)), nbytes=2)
    draw = box.rand_bin((len(circuits.MASK_ROWS), n), dtype=torch.int16)
    levels, final = circuits.level_masks(draw, with_lt)
    prods = box.bin((2, n), lambda: circuits.pack_products(levels), nbytes=2)
    return {"mono": mono, "levels": levels, "products": prods, "m": final}


def _table(box: Any, n: int, m: torch.Tensor, fn: Any, ys: int) -> tuple[Any, ...]:
    """For the XOR-shared final mask ``m``: the truth table ``T[k] = fn(k, m)`` over the 4 values of
    the two opened bits ``k``, as arithmetic shares; and for each of ``ys`` multiplicands a mask
    ``a`` with ``a * T``."""

    def table() -> torch.Tensor:
        k = torch.arange(4, dtype=torch.int64)
        return fn(k[None, :], m[:, None])

    # Tables are needed last: their corrections go to party 0, the early fields' to party 1, so
    # the dealer's two links carry the load in parallel.
    t = box.arith((n, 4), table, to=0)
    masks = []
    for _ in range(ys):
        a = box.rand_arith((n,))
        masks.append((a, box.arith((n, 4), lambda a=a: a[:, None] * t, to=0)))
    return m, t, masks


def _and2(k: torch.Tensor) -> torch.Tensor:
    return k & (k >> 1) & 1


def _msb_fn(k: torch.Tensor, m: torch.Tensor, r63: torch.Tensor) -> torch.Tensor:
    # m = (alpha, beta, gamma); k = opened (v ^ beta, w ^ gamma); entry = alpha ^ r63 ^ (v & w)
    return (m & 1) ^ r63 ^ _and2(k ^ (m >> 1))


def _eq_fn(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # m = (beta, gamma); k = opened (v ^ beta, w ^ gamma); entry = v & w
    return _and2(k ^ m)


@recipe("msb")
def msb(box: Any, n: int, ys: int = 0) -> dict[str, Any]:
    """Material for the most significant bit of ``n`` secrets, and its products with ``ys`` secrets:
    a mask ``r``, the tree's material for ``r mod 2^63``, then (second part, needed last) the final
    truth table, into which the dealer folds r's top bit."""
    r = box.rand_arith((n,))
    tree = _tree_material(box, n, r & circuits.MASK63, with_lt=True)
    box.flush()  # the tree's material goes out while the dealer computes the tables
    m, t, masks = _table(box, n, tree["m"],
                         lambda k, m: _msb_fn(k, m, ((r >> 63) & 1)[:, None]), ys)
    return {"r": r, "tree": tree, "m": m, "t": t, "masks": masks}


@recipe("eqz")
def eqz(box: Any, n: int, ys: int = 0) -> dict[str, Any]:
    """Material for testing ``n`` secrets against zero (all 64 bits), and products with ``ys``."""
    r = box.rand_arith((n,))
    tree = _tree_material(box, n, r, with_lt=False)
    box.flush()
    m, t, masks = _table(box, n, tree["m"] & 3, _eq_fn, ys)
    return {"r": r, "tree": tree, "m": m, "t": t, "masks": masks}
