"""Exact matrix products and convolutions in Z_2^64, computed with floating-point BLAS.

PyTorch multiplies ``int64`` matrices and convolves ``int64`` images without BLAS (about 0.5
GMAC/s on one core of this machine, against about 15 for ``float64`` matrix products), and not at
all on CUDA. A bilinear ``op`` (matmul, convolutions and their gradients) runs instead on limbs:

1. Each operand's 64 bits are cut into unsigned limbs at public ``offsets``: ``x = sum_i x_i
   2^(o_i)`` with ``0 <= x_i < 2^(s_i)``. Cutting the two's complement bit pattern makes this exact
   for negative ring elements too.
2. For every pair of limbs with ``o_i + o_j < 64`` (the other pairs vanish modulo 2^64),
   ``op(x_i, y_j)`` runs in ``float64``. An output sums at most ``terms`` products, each a
   non-negative integer below ``2^(s_i + s_j)``; while ``terms * 2^(s_i + s_j) <= 2^53`` every
   partial sum is an integer below 2^53, which ``float64`` holds exactly, in whatever order the
   library adds (all terms are non-negative: nothing cancels). Pairs with the same shift
   ``o_i + o_j`` are added in ``float64`` as long as their bounds together stay below 2^53.
3. Each such sum is converted to ``int64``, shifted by ``o_i + o_j`` and added with the ring's
   wrap-around: the result is, bit for bit, ``op`` computed in ``int64``.

Limb layouts (the fewest products for the bound):

========================= ============================ ============ ==========================
terms (products per out)  offsets (limb sizes)         products     largest limb product
========================= ============================ ============ ==========================
<= 2^9                    0, 21, 43 (21, 22, 21 bits)  6            < 2^44
<= 2^21                   0, 16, 32, 48 (16 bits each) 10           < 2^32
larger                    the int64 op                 1
========================= ============================ ============ ==========================

A matrix product whose contraction is longer than 2^9 (up to :data:`MAX_SPLIT`) runs as a sum of
products over slices of at most 2^9 (6 products per slice instead of 10). Convolutions unfold
each limb's image patches once (im2col) and multiply them with the kernel's limbs, a few hundred
images at a time (:data:`COLUMN_BYTES`). Products smaller than :data:`MIN_MACS` multiply-accumulates
on the CPU keep the ``int64`` op, cheaper there than the limbs' overhead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

BilinearFn = Callable[..., torch.Tensor]

FLOAT_BITS = 53  # float64 holds every integer of magnitude up to 2^53 exactly
SMALL_TERMS = 1 << 9
LAYOUTS: tuple[tuple[int, tuple[int, ...]], ...] = ((SMALL_TERMS, (0, 21, 43)), (1 << 21, (0, 16, 32, 48)))
MIN_MACS = 1 << 15
MAX_SPLIT = 1 << 12  # longest contraction split into slices of SMALL_TERMS (else the 16-bit layout)
COLUMN_BYTES = 32 << 20  # unfolded patches of one limb, per block of images


def layout(terms: int) -> tuple[int, ...] | None:
    """Limb offsets for outputs that sum ``terms`` products; None when no layout is exact."""
    for limit, offsets in LAYOUTS:
        if terms <= limit:
            return offsets
    return None


def sizes(offsets: Sequence[int]) -> list[int]:
    return [b - a for a, b in zip(offsets, (*offsets[1:], 64))]


def limbs(x: torch.Tensor, offsets: Sequence[int]) -> list[torch.Tensor]:
    """The unsigned limbs of ``x``'s 64-bit patterns at ``offsets``, as ``float64``."""
    return [((x >> o) & ((1 << s) - 1)).to(torch.float64) for o, s in zip(offsets, sizes(offsets))]


def pair_groups(offsets: Sequence[int], terms: int) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """``(shift, [(i, j), ...])``: the limb pairs to multiply, those of one group summed in float64.

    Raises AssertionError if a single pair could round (the layout is too coarse for ``terms``)."""
    bound = [(1 << s) - 1 for s in sizes(offsets)]
    limit = 1 << FLOAT_BITS
    by_shift: dict[int, list[tuple[int, int]]] = {}
    for i, oi in enumerate(offsets):
        for j, oj in enumerate(offsets):
            if oi + oj < 64:
                by_shift.setdefault(oi + oj, []).append((i, j))
    for shift, pairs in sorted(by_shift.items()):
        group: list[tuple[int, int]] = []
        total = 0
        for i, j in pairs:
            b = terms * bound[i] * bound[j]
            if b >= limit:
                raise AssertionError(f"layout {tuple(offsets)} is not exact for {terms} terms")
            if group and total + b >= limit:
                yield shift, group
                group, total = [], 0
            group.append((i, j))
            total += b
        yield shift, group


def combine(parts: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Sum ``float64`` partial products (exact integers) shifted into place, modulo 2^64."""
    out: torch.Tensor | None = None
    for shift, part in parts:
        p = part.to(torch.int64)
        if shift:
            p.bitwise_left_shift_(shift)
        out = p if out is None else out.add_(p)
    assert out is not None
    return out


def exact(fn: BilinearFn, x: torch.Tensor, y: torch.Tensor, terms: int, **kwargs: Any) -> torch.Tensor:
    """``fn(x, y, **kwargs)`` over ``int64`` ring elements, bit for bit, from ``float64`` products of
    limbs (module docstring). ``terms`` bounds how many products an output sums."""
    offsets = layout(terms)
    if offsets is None:
        return fn(x, y, **kwargs)
    xs, ys = limbs(x, offsets), limbs(y, offsets)

    def parts() -> Iterator[tuple[int, torch.Tensor]]:
        for shift, pairs in pair_groups(offsets, terms):
            acc = fn(xs[pairs[0][0]], ys[pairs[0][1]], **kwargs)
            for i, j in pairs[1:]:
                acc += fn(xs[i], ys[j], **kwargs)
            yield shift, acc

    return combine(parts())


def _summed(left: Sequence[torch.Tensor], right: Sequence[torch.Tensor], offsets: tuple[int, ...], terms: int,
            finish: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`exact` for 2-D limbs: ``sum left[i] @ right[j]`` over each group of pairs, in float64
    (``addmm_``, no temporaries), through ``finish`` (e.g. col2im), then combined in the ring."""

    def parts() -> Iterator[tuple[int, torch.Tensor]]:
        for shift, pairs in pair_groups(offsets, terms):
            (i0, j0), rest = pairs[0], pairs[1:]
            acc = left[i0] @ right[j0]
            for i, j in rest:
                acc.addmm_(left[i], right[j])
            yield shift, acc if finish is None else finish(acc)

    return combine(parts())


def _cheap(x: torch.Tensor, macs: int) -> bool:
    """Whether the int64 op is the better choice: small work on a CPU."""
    return x.device.type == "cpu" and macs < MIN_MACS


def matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` in Z_2^64 (any shapes ``torch.matmul`` takes)."""
    k = int(x.shape[-1])
    if _cheap(x, x.numel() * max(y.numel() // max(k, 1), 1)):
        return x @ y
    if not SMALL_TERMS < k <= MAX_SPLIT:
        return exact(torch.matmul, x, y, k)
    ys = y if y.dim() > 1 else y.unsqueeze(-1)
    out = None
    for s in range(0, k, SMALL_TERMS):
        part = exact(torch.matmul, x[..., s:s + SMALL_TERMS], ys[..., s:s + SMALL_TERMS, :], min(SMALL_TERMS, k - s))
        out = part if out is None else out.add_(part)
    assert out is not None
    return out if y.dim() > 1 else out.squeeze(-1)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _columns(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
             dilation: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """im2col: ``[C kh kw, N OH OW]`` patches of ``x`` ``[N, C, H, W]`` (one copy), and ``OH, OW``."""
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    n, c, h, w = x.shape
    oh = (h - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    sn, sc, sh, sw = x.stride()
    view = x.as_strided((c, kernel[0], kernel[1], n, oh, ow),
                        (sc, dilation[0] * sh, dilation[1] * sw, sn, stride[0] * sh, stride[1] * sw))
    return view.reshape(c * kernel[0] * kernel[1], n * oh * ow), oh, ow


def _blocks(n: int, per_image: int, most: int | None = None) -> Iterator[slice]:
    """Slices of at most ``most`` of ``n`` images whose ``per_image`` float64 values fit COLUMN_BYTES."""
    step = max(1, COLUMN_BYTES // max(8 * per_image, 1))
    step = step if most is None else max(1, min(step, most))
    for s in range(0, n, step):
        yield slice(s, min(s + step, n))


def conv2d(x: torch.Tensor, w: torch.Tensor, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
           groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, w, ...)`` in Z_2^64: limbs of the image, their patches, a matrix product with
    the kernel's limbs, per block of images and per group."""
    if isinstance(padding, str):  # 'same' / 'valid': let PyTorch work out the geometry
        return exact(F.conv2d, x, w, conv_terms(x, w), stride=stride, padding=padding, dilation=dilation,
                     groups=groups)
    s2, p2, d2 = _pair(stride), _pair(padding), _pair(dilation)
    c_out, c_in_g, kh, kw = (int(d) for d in w.shape)
    terms = c_in_g * kh * kw
    offsets = layout(terms)
    n = int(x.shape[0])
    out_h = (int(x.shape[2]) + 2 * p2[0] - d2[0] * (kh - 1) - 1) // s2[0] + 1
    out_w = (int(x.shape[3]) + 2 * p2[1] - d2[1] * (kw - 1) - 1) // s2[1] + 1
    if offsets is None or _cheap(x, n * c_out * out_h * out_w * terms):
        return F.conv2d(x, w, stride=s2, padding=p2, dilation=d2, groups=groups)
    o_g = c_out // groups
    outs = []
    for g in range(groups):
        wl = [limb.reshape(o_g, terms) for limb in limbs(w[g * o_g:(g + 1) * o_g], offsets)]
        xg = x[:, g * c_in_g:(g + 1) * c_in_g]
        per_group = []
        for block in _blocks(n, terms * out_h * out_w):
            cols = [_columns(limb, (kh, kw), s2, p2, d2)[0] for limb in limbs(xg[block], offsets)]
            z = _summed(wl, cols, offsets, terms)  # [O/g, n_block OH OW]
            per_group.append(z.reshape(o_g, -1, out_h, out_w).transpose(0, 1))
        outs.append(torch.cat(per_group))
    return torch.cat(outs, 1) if groups > 1 else outs[0]


def conv2d_weight(x: torch.Tensor, grad: torch.Tensor, *, weight_shape: Sequence[int], stride: Any = 1,
                  padding: Any = 0, dilation: Any = 1, groups: int = 1) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, w, ...)`` with respect to ``w`` in Z_2^64: for each group, the
    output gradient ``[O/g, N OH OW]`` times the input's patches ``[N OH OW, C/g kh kw]``, summed
    over blocks of images (each block's contraction bounds its layout)."""
    c_out, c_in_g, kh, kw = (int(d) for d in weight_shape)
    s2, p2, d2 = _pair(stride), _pair(padding), _pair(dilation)
    n, _, out_h, out_w = (int(d) for d in grad.shape)
    o_g, taps = c_out // groups, c_in_g * kh * kw
    outs = []
    for g in range(groups):
        xg, gg = x[:, g * c_in_g:(g + 1) * c_in_g], grad[:, g * o_g:(g + 1) * o_g]
        total: torch.Tensor | None = None
        # An output of a block sums its images' positions: at most the largest layout's terms.
        for block in _blocks(n, max(taps, o_g) * out_h * out_w, LAYOUTS[-1][0] // (out_h * out_w)):
            terms = (block.stop - block.start) * out_h * out_w
            offsets = layout(terms)
            if offsets is None:
                raise ValueError(f"conv2d_weight: an output of {out_h}x{out_w} positions sums {terms} products, "
                                 f"more than the exact limb layouts allow ({LAYOUTS[-1][0]})")
            gl = [limb.transpose(0, 1).reshape(o_g, terms) for limb in limbs(gg[block], offsets)]
            cols = [_columns(limb, (kh, kw), s2, p2, d2)[0].t() for limb in limbs(xg[block], offsets)]
            z = _summed(gl, cols, offsets, terms)
            total = z if total is None else total.add_(z)
        assert total is not None
        outs.append(total.reshape(o_g, c_in_g, kh, kw))
    return torch.cat(outs) if groups > 1 else outs[0]


def conv_transpose2d(x: torch.Tensor, w: torch.Tensor, stride: Any = 1, padding: Any = 0,
                     output_padding: Any = 0, groups: int = 1, dilation: Any = 1) -> torch.Tensor:
    """``F.conv_transpose2d(x, w, ...)`` in Z_2^64: for each group, the kernel's transpose
    ``[C_out/g kh kw, C_in/g]`` times the input ``[C_in/g, N H W]``, then col2im (``F.fold``) adds
    the overlapping patches, still in ``float64`` (an output sums at most ``C_in/g kh kw``
    products)."""
    c_in, o_g, kh, kw = (int(d) for d in w.shape)
    s2, p2, d2, op2 = _pair(stride), _pair(padding), _pair(dilation), _pair(output_padding)
    n, _, h, wd = (int(d) for d in x.shape)
    c_in_g = c_in // groups
    terms = c_in_g * kh * kw
    offsets = layout(terms)
    if offsets is None:
        return F.conv_transpose2d(x, w, stride=s2, padding=p2, output_padding=op2, groups=groups, dilation=d2)
    size = tuple((i - 1) * s - 2 * p + d * (k - 1) + o + 1
                 for i, s, p, d, k, o in zip((h, wd), s2, p2, d2, (kh, kw), op2))
    outs = []
    for g in range(groups):
        wl = [limb.reshape(c_in_g, o_g * kh * kw).t() for limb in limbs(w[g * c_in_g:(g + 1) * c_in_g], offsets)]
        xg = x[:, g * c_in_g:(g + 1) * c_in_g]
        per_block = []
        for block in _blocks(n, o_g * kh * kw * h * wd):
            nb = block.stop - block.start
            xl = [limb.transpose(0, 1).reshape(c_in_g, nb * h * wd) for limb in limbs(xg[block], offsets)]

            def col2im(acc: torch.Tensor, nb: int = nb) -> torch.Tensor:
                cols = acc.reshape(o_g * kh * kw, nb, h * wd).transpose(0, 1)
                return F.fold(cols, size, (kh, kw), dilation=d2, padding=p2, stride=s2)

            per_block.append(_summed(wl, xl, offsets, terms, col2im))
        outs.append(torch.cat(per_block))
    return torch.cat(outs, 1) if groups > 1 else outs[0]


def conv1d(x: torch.Tensor, w: torch.Tensor, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
           groups: int = 1) -> torch.Tensor:
    """``F.conv1d`` in Z_2^64, as a convolution of height 1."""
    if isinstance(padding, str):
        return exact(F.conv1d, x, w, conv_terms(x, w), stride=stride, padding=padding, dilation=dilation,
                     groups=groups)
    first = lambda v: int(v if isinstance(v, int) else v[0])  # noqa: E731
    out = conv2d(x.unsqueeze(2), w.unsqueeze(2), stride=(1, first(stride)), padding=(0, first(padding)),
                 dilation=(1, first(dilation)), groups=groups)
    return out.squeeze(2)


# How many products an output of a convolution sums (the ``terms`` of :func:`exact`).
def conv_terms(x: torch.Tensor, w: torch.Tensor, **_: Any) -> int:
    """conv1d/conv2d: input channels per group times the kernel's taps (the weight's last dims)."""
    return math.prod(int(d) for d in w.shape[1:])


def on_ints(ring_fn: BilinearFn, fn: BilinearFn) -> BilinearFn:
    """``ring_fn`` for two ``int64`` tensors, ``fn`` otherwise (shape inference on float zeros)."""

    def run(x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if x.dtype == torch.int64 and y.dtype == torch.int64:
            return ring_fn(x, y, **kwargs)
        return fn(x, y, **kwargs)

    return run
