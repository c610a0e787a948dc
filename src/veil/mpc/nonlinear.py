"""Comparisons and piecewise-linear functions, composed from the protocol's ``msb`` and ``eqz``.

Costs with the 2-party + dealer protocol (``msb`` and ``eqz`` take 5 rounds):

============================ ====================================================== ========
function                     composition                                            rounds
============================ ====================================================== ========
``x < y``, ``x > y``         ``msb(x - y)``                                         5
``x == y``                   ``eqz(x - y)``                                         5
relu, abs, sign              ``msb(x)`` with the product ``x * msb(x)`` in the same   5
                             rounds (``relu = x - x*msb``, ``abs = x - 2 x*msb``)
max/argmax over ``k``        tournament: ``max(a, b) = a - (a - b) * msb(a - b)``,  5 ceil(log2 k)
                             the index carried along as a second product
max/argmax, 5 <= k <= 16     pairwise: all k(k-1)/2 comparisons at once, the        5 + ceil(log2(k-1))
                             winner's bit as a product of k-1 bits (AND tree)       + 1
max-pool k x k               max over the unfolded windows                          5 ceil(log2 k^2)
where(c, a, b)               ``b + c * (a - b)`` (one Beaver product)               1
============================ ====================================================== ========

Comparison results are exact (no approximation): a bit in fixed point (0 or 1).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from veil.mpc.tensor import SecretTensor


def _lift(bit: torch.Tensor, like: SecretTensor) -> SecretTensor:
    """An integer 0/1 share as a fixed-point SecretTensor."""
    return like._new(bit << like.frac_bits)


def _diff(x: SecretTensor, y: Any) -> SecretTensor:
    return x - y


def lt(x: SecretTensor, y: Any) -> SecretTensor:
    """``x < y`` elementwise, as a secret 0/1."""
    bit, _ = x.protocol.msb(_diff(x, y).share)
    return _lift(bit, x)


def eq(x: SecretTensor, y: Any) -> SecretTensor:
    """``x == y`` elementwise (equal fixed-point encodings), as a secret 0/1."""
    bit, _ = x.protocol.eqz(_diff(x, y).share)
    return _lift(bit, x)


def relu(x: SecretTensor) -> SecretTensor:
    _, (xb,) = x.protocol.msb(x.share, [x.share])
    return x._new(x.share - xb)


def abs(x: SecretTensor) -> SecretTensor:
    _, (xb,) = x.protocol.msb(x.share, [x.share])
    return x._new(x.share - 2 * xb)


def clamp(x: SecretTensor, lo: float | None = None, hi: float | None = None) -> SecretTensor:
    """``torch.clamp`` with public bounds, from ``lo + relu(x - lo)`` and ``x - relu(x - hi)``; both
    ReLUs go through one sign-bit call (5 rounds)."""
    if lo is None and hi is None:
        raise ValueError("clamp needs lo, hi or both")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"clamp: lo={lo} is above hi={hi}")
    bounds = [b for b in (lo, hi) if b is not None]
    stacked = torch.stack([(x - b).share for b in bounds])
    _, (prod,) = x.protocol.msb(stacked, [stacked])
    relus = [x._new(r) for r in stacked - prod]
    if lo is None:
        return x - relus[0]
    out = relus[0] + lo
    return out if hi is None else out - relus[1]


def sign(x: SecretTensor) -> SecretTensor:
    """-1, 0 or +1 as ``torch.sign``: ``[x > 0] - [x < 0]``, both sign bits (of ``x`` and ``-x``) in
    one call."""
    flat = x.share.reshape(-1)
    bits, _ = x.protocol.msb(torch.cat([flat, -flat]))
    n = flat.numel()
    return _lift((bits[n:] - bits[:n]).reshape(x.share.shape), x)


def where(cond: Any, a: Any, b: Any) -> SecretTensor:
    """``a`` where ``cond`` else ``b``. A public ``cond`` selects locally; a secret one (0/1) costs
    one multiplication."""
    if isinstance(cond, SecretTensor):
        return cond * (a - b) + b
    c = torch.as_tensor(cond, dtype=torch.bool)
    ref = a if isinstance(a, SecretTensor) else b
    if not isinstance(ref, SecretTensor):
        raise TypeError("where() needs at least one SecretTensor among cond, a, b")
    def share_of(v: Any) -> torch.Tensor:  # a public value as a share: party 0 holds it
        return v.share if isinstance(v, SecretTensor) else ref.protocol.add_public(
            torch.zeros((), dtype=torch.int64, device=ref.device), ref._encode(v))

    sa, sb = share_of(a), share_of(b)
    sa, sb = torch.broadcast_tensors(sa, sb)
    return ref._new(torch.where(c.to(sa.device), sa, sb))


def _tournament(vals: torch.Tensor, idx: torch.Tensor | None, proto: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Max (and argmax index shares) over the last dimension of share tensors."""
    while vals.shape[-1] > 1:
        k = vals.shape[-1]
        even = k - (k % 2)
        a, b = vals[..., 0:even:2], vals[..., 1:even:2]
        z = a - b
        ys = [z] if idx is None else [z, idx[..., 0:even:2] - idx[..., 1:even:2]]
        _, prods = proto.msb(z, ys)
        new_vals = a - prods[0]
        new_idx = None if idx is None else idx[..., 0:even:2] - prods[1]
        if k % 2:
            new_vals = torch.cat([new_vals, vals[..., -1:]], -1)
            if idx is not None and new_idx is not None:
                new_idx = torch.cat([new_idx, idx[..., -1:]], -1)
        vals, idx = new_vals, new_idx
    return vals[..., 0], None if idx is None else idx[..., 0]


PAIRWISE_MIN, PAIRWISE_MAX = 5, 16  # rows of this many elements may take the pairwise max ...
PAIRWISE_EXTRA = 1 << 15  # ... when it adds at most this many comparisons (one round ~ 4k comparisons)


def _pairwise(vals: torch.Tensor, proto: Any, frac_bits: int, index: int,
              want_index: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Max (and argmax) over the last dimension (k elements) in ``5 + ceil(log2(k - 1)) + 1`` rounds
    instead of the tournament's ``5 ceil(log2 k)``: all ``k (k - 1) / 2`` comparisons in one sign-bit
    call; element ``i`` wins when it beats every earlier element strictly and every later one or
    ties it (the first maximum wins, as in PyTorch); the winners' indicator is the product of those
    ``k - 1`` bits (a tree of integer Beaver products, exact), and the max is ``sum_i win_i x_i``."""
    k = vals.shape[-1]
    ii, jj = torch.triu_indices(k, k, 1, device=vals.device)
    bits, _ = proto.msb(vals[..., ii] - vals[..., jj])  # [x_i < x_j] for i < j
    one = torch.ones((), dtype=torch.int64, device=vals.device) if index == 0 else torch.zeros(
        (), dtype=torch.int64, device=vals.device)
    # factors[..., i, :] = the k - 1 bits element i needs: [x_j < x_i] for j < i, [x_i >= x_j] for j > i
    pos = {(int(a), int(b)): n for n, (a, b) in enumerate(zip(ii.tolist(), jj.tolist()))}
    cols = []
    for i in range(k):
        row = []
        for j in range(k):
            if j == i:
                continue
            n = pos[(j, i)] if j < i else pos[(i, j)]
            row.append((n, j < i))
        cols.append(row)
    gather = torch.tensor([[n for n, _ in row] for row in cols], device=vals.device)
    later = torch.tensor([[not earlier for _, earlier in row] for row in cols], device=vals.device)
    f = bits[..., gather]  # (..., k, k - 1)
    f = torch.where(later, one - f, f)
    while f.shape[-1] > 1:  # AND tree: one round per level, all elements together
        m = f.shape[-1]
        even = m - (m % 2)
        prod = proto.bilinear(f[..., 0:even:2].contiguous(), f[..., 1:even:2].contiguous(), "mul", {})
        f = torch.cat([prod, f[..., even:]], -1) if m % 2 else prod
    win = f[..., 0]  # (..., k) integer 0/1 shares, exactly one 1 per row
    best = proto.bilinear(win, vals, "mul", {}).sum(-1)
    idx = None
    if want_index:
        ar = torch.arange(k, dtype=torch.int64, device=vals.device) << frac_bits
        idx = (win * ar).sum(-1)
    return best, idx


def _row_max(vals: torch.Tensor, x: SecretTensor, want_index: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Max over the last dimension, by the cheaper of the tournament and the pairwise protocol: the
    pairwise one saves rounds and costs ``(k - 1)(k - 2) / 2`` more comparisons per row, worth it
    while the batch is small (latency-bound), not for large ones (bandwidth-bound)."""
    k = vals.shape[-1]
    rows = vals.numel() // builtins.max(k, 1)
    if PAIRWISE_MIN <= k <= PAIRWISE_MAX and rows * (k - 1) * (k - 2) // 2 <= PAIRWISE_EXTRA:
        return _pairwise(vals, x.protocol, x.frac_bits, x.session.index, want_index)
    idx = None
    if want_index:
        ar = torch.arange(k, dtype=torch.int64, device=x.device) << x.frac_bits
        idx = ar.expand_as(vals).clone() if x.session.index == 0 else torch.zeros_like(vals)
    return _tournament(vals, idx, x.protocol)


class MaxResult(NamedTuple):
    """``(values, indices)`` of :func:`max` with a ``dim``, as ``torch.return_types.max``."""

    values: SecretTensor
    indices: SecretTensor


def max(x: SecretTensor, dim: int | None = None, keepdim: bool = False) -> Any:
    """Maximum over ``dim`` (all elements when None). With ``dim``, returns ``(values, indices)`` like
    ``torch.max`` (also as ``.values``, ``.indices``): indices are secret (fixed-point integers), the
    first maximum wins ties."""
    if x.numel() == 0:
        raise ValueError(f"max of an empty SecretTensor (shape {tuple(x.shape)})")
    if dim is None:
        vals, _ = _row_max(x.share.reshape(-1), x, False)
        return x._new(vals)
    if x.dim() == 0:  # as torch: the value itself, index 0
        if dim not in (0, -1):
            raise IndexError(f"dim {dim} out of range for a 0-d SecretTensor (expected 0 or -1)")
        return MaxResult(x, x._new(torch.zeros_like(x.share)))
    d = dim % x.dim()
    vals, ids = _row_max(x.share.movedim(d, -1), x, True)
    assert ids is not None
    if keepdim:
        vals, ids = vals.unsqueeze(d), ids.unsqueeze(d)
    return MaxResult(x._new(vals), x._new(ids))


def amax(x: SecretTensor, dim: int, keepdim: bool = False) -> SecretTensor:
    """Maximum values over ``dim`` (no indices: cheaper than :func:`max`)."""
    d = dim % x.dim()
    vals, _ = _row_max(x.share.movedim(d, -1), x, False)
    return x._new(vals.unsqueeze(d) if keepdim else vals)


def argmax(x: SecretTensor, dim: int | None = None, keepdim: bool = False, one_hot: bool = False) -> SecretTensor:
    """Index of the maximum over ``dim`` (flattened when None), secret. ``one_hot=True`` returns a
    secret one-hot tensor shaped like ``x`` instead (one ``eqz`` more)."""
    src = x.reshape(-1) if dim is None else x
    d = 0 if dim is None else dim
    _, idx = max(src, dim=d, keepdim=True)
    if one_hot:
        n = src.shape[d]
        shape = [1] * src.dim()
        shape[d] = n
        grid = torch.arange(n, dtype=torch.float64).reshape(shape)
        hot = eq(idx.expand(*src.shape), grid)
        return hot.reshape(*x.shape)
    if dim is None:
        return idx.reshape(())
    return idx if keepdim else idx.squeeze(d)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _windows(x: SecretTensor, kernel: Any, stride: Any, padding: Any, fill: int) -> torch.Tensor:
    if x.dim() not in (3, 4):
        raise ValueError(f"pooling expects (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    kh, kw = _pair(kernel)
    sh, sw = _pair(kernel if stride is None else stride)
    ph, pw = _pair(padding)
    s = x.share
    if ph or pw:
        pad_val = fill if x.session.index == 0 else 0
        s = torch.nn.functional.pad(s, (pw, pw, ph, ph), value=pad_val)
    return s.unfold(-2, kh, sh).unfold(-2, kw, sw).flatten(-2)


def max_pool2d(x: SecretTensor, kernel_size: Any, stride: Any = None, padding: Any = 0) -> SecretTensor:
    """``F.max_pool2d``: the max of each window (tournament, or pairwise for small batches)."""
    lowest = -(1 << 62) + 1
    win = _windows(x, kernel_size, stride, padding, lowest)
    vals, _ = _row_max(win, x, False)
    return x._new(vals)


def avg_pool2d(x: SecretTensor, kernel_size: Any, stride: Any = None, padding: Any = 0) -> SecretTensor:
    """``F.avg_pool2d`` (zero padding counted in the average, as PyTorch's default): local."""
    win = _windows(x, kernel_size, stride, padding, 0)
    kh, kw = _pair(kernel_size)
    return x._new(win.sum(-1)) * (1.0 / (kh * kw))
