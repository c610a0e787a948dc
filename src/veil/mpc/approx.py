"""Smooth functions on secrets, approximated with the protocol's primitives.

All errors below are for the default 16 fractional bits, measured against float64 PyTorch by the
tests in ``tests/mpc/test_approx.py`` (which assert these bounds) and by ``benchmarks/primitives.py``.

============== ================================================================ ====== ======================
function       method                                                           rounds max error (domain)
============== ================================================================ ====== ======================
exp            ``t = x / 2^8`` at 22 fractional bits, ``1 + t + t^2/2``, then   9..12   rel 3e-3 on [-4, 4],
               8 squarings back down to 16 bits (the 3 that pass e^5 truncated        3e-2 at 20;
               exactly when ``upper`` allows x > 5: 12 rounds by default, 9            abs 2e-3 on [-500, 0]
               with ``upper=0``)
reciprocal     the domain moved around 1 by a power of two (local), linear     4..16    rel 1e-3 or 4 ulp
               minimax guess, Goldschmidt iterations (``y += y e; e = e^2`` in          (2^-14) in domain;
               one round each, y and e opened once, count chosen from the               ratio hi/lo up to
               domain), one Newton step when the domain is wider than 16x;              2^11
               default domain [1/32, 32]
rsqrt, sqrt    the domain moved around 1 by a power of 4, linear guess,         3..25   rel 2e-3 or 3 ulp
               Goldschmidt square-root iterations (2 rounds each; 19 rounds on          in domain
               the default domain [1/32, 32])
log            Householder iterations on ``exp(-y)`` (order 4)                   ~45    abs 5e-3 on [0.05, 100]
sigmoid        ``e = exp(-|x|)``, ``s = 1 / (1 + e)`` by a degree-4 Chebyshev         17     abs 1e-3 on [-500, 500]
               polynomial in e, ``sigmoid = s + [x<0] (1 - 2s)``
tanh           ``2 sigmoid(2x) - 1``                                              17     abs 2e-3 on [-250, 250]
softmax        max along ``dim`` (tournament), exp of ``x - max`` (<= 0), sum,  5 ceil(log2 k) abs 2e-3 when a
               reciprocal on [1, k + 0.5] (rows of up to 2047 values)           + 13..22  row spans < 500
============== ================================================================ ====== ======================

Products that share a factor in one round (powers, the Goldschmidt steps) go through the protocol's
``products``: each factor is opened once, not once per product.

Outside a stated domain results are wrong: reciprocal and rsqrt diverge; exp's base ``1 + t + t^2/2``
exceeds 1 below x = -512 and overflows above ``upper`` (at most 20) (see README "Precision"). Inputs that may leave
the domain can be saturated first with ``x.clamp(lo, hi)`` (5 rounds).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from numpy.polynomial import Chebyshev, Polynomial

from veil.mpc import nonlinear
from veil.mpc.tensor import SecretTensor

EXP_SQUARINGS = 8
EXP_EXTRA_BITS = 3
EXP_MAX = 20.0
EXP_MIN_INPUT = 500.0  # |x| of the documented domain's low end
RING_HEADROOM_BITS = 62  # a square at 2f bits must stay below 2^62 (exact truncation's bound)
SAFE_TRUNCATION_BITS = 39  # local truncation of a value below 2^39 fails with probability < 2^-25
DEFAULT_DOMAIN = (1.0 / 32, 32.0)
NEWTON_CLEANUP_RATIO = 16.0


def _mul_batch(proto: Any, pairs: list[tuple[torch.Tensor, torch.Tensor]], trunc: int) -> list[torch.Tensor]:
    """Several elementwise secret products in one round. Operands of one shape go through
    ``proto.products``: each distinct tensor is opened once, however many products use it (powers,
    Goldschmidt steps). Otherwise one Beaver triple over the broadcast operands' concatenation."""
    shape = pairs[0][0].shape
    if all(a.shape == shape and b.shape == shape for a, b in pairs):
        values: list[torch.Tensor] = []
        index: dict[int, int] = {}
        for t in (t for pair in pairs for t in pair):
            if id(t) not in index:
                index[id(t)] = len(values)
                values.append(t)
        zs = proto.products(values, [(index[id(a)], index[id(b)]) for a, b in pairs])
        return [proto.truncate(z, trunc) for z in zs]
    shapes = [np.broadcast_shapes(a.shape, b.shape) for a, b in pairs]
    xs = torch.cat([a.expand(s).reshape(-1) for (a, _), s in zip(pairs, shapes)])
    ys = torch.cat([b.expand(s).reshape(-1) for (_, b), s in zip(pairs, shapes)])
    z = proto.truncate(proto.bilinear(xs, ys, "mul", {}), trunc)
    out, off = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(z[off:off + n].reshape(s))
        off += n
    return out


def _const(x: SecretTensor, value: float, bits: int) -> torch.Tensor:
    """Share of a public constant at ``bits`` fractional bits (party 0 holds it)."""
    v = round(value * (1 << bits))
    return torch.full_like(x.share, v if x.session.index == 0 else 0)


def exp_limit(frac_bits: int) -> float:
    """The largest ``x`` whose ``e^x`` can be squared into the ring: ``e^x 2^(2 f) < 2^62``."""
    return min(EXP_MAX, (RING_HEADROOM_BITS - 2 * frac_bits) * math.log(2))


def exp(x: SecretTensor, upper: float | None = None) -> SecretTensor:
    """``e^x`` by the limit ``(1 + t + t^2/2)^(2^8)`` with ``t = x / 2^8``, for x in [-500, upper].

    ``upper``: a public bound on ``x`` (default and largest: 20 at 16 fractional bits, see
    :func:`exp_limit`); softmax, sigmoid and log-softmax pass 0.

    Precision: ``t`` is read at ``f + 6`` fractional bits (``x / 4``, exact to 1 ulp) and squared
    from ``f`` bits, the polynomial is rounded to ``f + 3`` bits, and the squarings return to ``f``
    bits one bit at a time, so values near 1 are squared at most at ``2 (f + 3)`` bits. The polynomial's error grows
    with x: relative ``x^3 / 2^18`` (3e-3 at 4, 3e-2 at 20). Truncated locally, a squaring fails (a
    huge error) with probability about ``|square| 2^(2 p) / 2^63`` per element: the squarings whose
    result can exceed ``2^(39 - 2 p)`` (``e^5`` and above at ``upper = 20``: 3 of them, 3 rounds) are
    truncated exactly, so that none fails with probability above ~2^-25; a softmax per training
    batch makes that a few percent per epoch of digits, more for MNIST. Under
    ``SessionOptions(truncation="exact")`` every square is truncated exactly (one more round each:
    18 rounds per call), and none fails.
    """
    proto, f = x.protocol, x.frac_bits
    limit = exp_limit(f)
    upper = limit if upper is None else float(upper)
    if not upper <= limit:
        raise ValueError(f"exp: upper bound {upper:g} above {limit:.4g}, the largest x whose e^x can be squared "
                         f"in Z_2^64 with {f} fractional bits")
    always_exact = x.session.options.truncation == "exact"

    def trunc_square(v: torch.Tensor, frac: int, bits: int, peak: float) -> torch.Tensor:
        """``v^2`` (``v`` at ``frac`` fractional bits, so the square at ``2 frac``) truncated by
        ``bits``; ``peak`` bounds the square's value: where ``peak 2^(2 frac)`` may reach
        ``2^SAFE_TRUNCATION_BITS``, local truncation could fail and the exact one runs."""
        square = proto.square(v)
        if always_exact or math.log2(peak) + 2 * frac >= SAFE_TRUNCATION_BITS:
            return proto.truncate_exact([square], bits)[0]
        return proto.truncate(square, bits)

    p0 = f + EXP_SQUARINGS - 2
    t = proto.truncate(x.share, 2)  # x / 2^8 at p0 = f + 6 bits
    # t^2 / 2 at p0 bits, squared from t at f bits: at -500, t^2 ~ 3.8 is then 2^34 in the ring, not 2^46
    # (which local truncation would get wrong with probability 2^-17); it costs t^2 2^-f of precision
    t_f = proto.truncate(x.share, EXP_SQUARINGS)
    t2 = trunc_square(t_f, f, 2 * f - p0 + 1, (max(EXP_MIN_INPUT, upper) / 2.0 ** EXP_SQUARINGS) ** 2)
    p = f + EXP_EXTRA_BITS
    y = proto.truncate(_const(x, 1.0, p0) + t + t2, p0 - p)
    for i in range(EXP_SQUARINGS):
        drop = 1 if p > f else 0
        y = trunc_square(y, p, p + drop, math.exp(upper / 2.0 ** (EXP_SQUARINGS - 1 - i)))
        p -= drop
    return x._new(y)


def _linear_fit(fn: Any, lo: float, hi: float) -> tuple[float, float]:
    """Coefficients ``(a, b)`` of ``a - b x`` fitting ``fn`` on [lo, hi] in relative error (least
    squares on a geometric grid; the iteration count that follows is chosen by simulation)."""
    xs = np.geomspace(lo, hi, 512)
    t = fn(xs)
    design = np.stack([1 / t, -xs / t], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(xs), rcond=None)
    return float(a), float(b)


def _goldschmidt_steps(eps0: float, bits: int) -> int:
    """Iterations so that ``eps0^(2^k) < 2^-bits``."""
    if not 0 <= eps0 < 1:
        raise ValueError(f"initial approximation error {eps0:.3f} >= 1: the domain is too wide")
    if eps0 == 0:
        return 1
    return max(1, math.ceil(math.log2(bits * math.log(2) / -math.log(eps0))))


def _check_domain(lo: float, hi: float) -> None:
    if not 0 < lo < hi:
        raise ValueError(f"domain must satisfy 0 < lo < hi, got ({lo}, {hi})")


def _shift(proto: Any, share: torch.Tensor, k: int) -> torch.Tensor:
    """Share of ``v / 2^k`` (k > 0: truncation, k < 0: an exact shift left)."""
    if k > 0:
        return proto.truncate(share, k)
    return share * (1 << -k) if k < 0 else share


def _centre(lo: float, hi: float, even: bool = False) -> int:
    """``k`` such that ``domain / 2^k`` is centred on 1 (geometrically); even for square roots."""
    k = math.log2(lo * hi) / 2
    return 2 * round(k / 2) if even else round(k)


def reciprocal(x: SecretTensor, domain: tuple[float, float] = DEFAULT_DOMAIN) -> SecretTensor:
    """``1 / x`` for ``x`` in ``domain`` (positive). Error stated in the module table.

    The domain is first moved around 1 by a power of two (``1/x = (1/(x/2^k)) / 2^k``, local), so
    that what matters is its ratio ``hi / lo``, not where it lies."""
    lo, hi = domain
    _check_domain(lo, hi)
    proto, f = x.protocol, x.frac_bits
    k = _centre(lo, hi)
    if k:
        y = reciprocal(x._new(_shift(proto, x.share, k)), (lo / 2.0 ** k, hi / 2.0 ** k))
        return x._new(_shift(proto, y.share, k))
    b = 8.0 / ((hi + lo) ** 2 + 4 * hi * lo)  # minimax relative error of a - b x with a = b (hi + lo)
    a = b * (hi + lo)
    eps0 = 1 - b * hi * lo
    # At the top of the domain the guess is small; one ulp of error there must not push the
    # initial error to 1 (where the iteration diverges). Margin 4.
    if 1 - eps0 < 4 * hi * 2.0 ** -f:
        raise ValueError(f"reciprocal: domain ({lo:g}, {hi:g}) is too wide for {f} fractional bits "
                         f"(ratio hi/lo = {hi / lo:.4g}; ratios up to about 2^{(2 * f + 2) // 3} work): "
                         f"narrow it, or split the values")
    steps = _goldschmidt_steps(eps0, f + 2)
    # one ulp above the fit: at the top of the domain the guess is a few ulps, and rounding it down
    # would leave Goldschmidt its worst start
    y = (x * (-b) + (a + 2.0 ** -f)).share
    e = _const(x, 1.0, f) - proto.truncate(proto.bilinear(x.share, y, "mul", {}), f)
    for k in range(steps):
        # y (1 + e) = y + y e: y and e are opened once for both products
        if k == steps - 1:
            (ye,) = _mul_batch(proto, [(y, e)], f)
        else:
            ye, e = _mul_batch(proto, [(y, e), (e, e)], f)
        y = y + ye
    if hi / lo > NEWTON_CLEANUP_RATIO:
        # Goldschmidt does not correct its rounding errors, which a small first guess amplifies
        # over a wide domain; one Newton step y (2 - x y) does (2 rounds).
        xy = proto.truncate(proto.bilinear(x.share, y, "mul", {}), f)
        (y,) = _mul_batch(proto, [(y, _const(x, 2.0, f) - xy)], f)
    return x._new(y)


def _sqrt_pair(x: SecretTensor, domain: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Shares of ``(sqrt(x), 1 / (2 sqrt(x)))`` by Goldschmidt's iteration, on the domain moved
    around 1 by an even power of two first (``sqrt(x) = sqrt(x / 4^j) 2^j``, local)."""
    lo, hi = domain
    _check_domain(lo, hi)
    proto, f = x.protocol, x.frac_bits
    k = _centre(lo, hi, even=True)
    if k:
        g, h = _sqrt_pair(x._new(_shift(proto, x.share, k)), (lo / 2.0 ** k, hi / 2.0 ** k))
        return _shift(proto, g, -k // 2), _shift(proto, h, k // 2)
    a, b = _linear_fit(lambda v: 1 / np.sqrt(v), lo, hi)
    y0 = (x * (-b) + a).share
    g = proto.truncate(proto.bilinear(x.share, y0, "mul", {}), f)
    h = proto.truncate(y0, 1)
    xs = np.geomspace(lo, hi, 256)
    gg, hh = xs * (a - b * xs), (a - b * xs) / 2
    steps = 0
    while np.max(np.abs(gg / np.sqrt(xs) - 1)) > 2.0 ** -(f + 1) and steps < 12:
        rr = 0.5 - gg * hh
        gg, hh, steps = gg + gg * rr, hh + hh * rr, steps + 1
    for _ in range(steps):
        (gh,) = _mul_batch(proto, [(g, h)], f)
        r = _const(x, 0.5, f) - gh
        gr, hr = _mul_batch(proto, [(g, r), (h, r)], f)
        g, h = g + gr, h + hr
    return g, h


def sqrt(x: SecretTensor, domain: tuple[float, float] = DEFAULT_DOMAIN) -> SecretTensor:
    """``sqrt(x)`` for ``x`` in ``domain``."""
    g, _ = _sqrt_pair(x, domain)
    return x._new(g)


def rsqrt(x: SecretTensor, domain: tuple[float, float] = DEFAULT_DOMAIN) -> SecretTensor:
    """``1 / sqrt(x)`` for ``x`` in ``domain``."""
    _, h = _sqrt_pair(x, domain)
    return x._new(2 * h)


def log(x: SecretTensor, iterations: int = 3, order: int = 4) -> SecretTensor:
    """Natural logarithm for ``x`` in [0.05, 100]: Householder steps ``y -= sum_k h^k / k`` with
    ``h = 1 - x exp(-y)``, from the initial guess ``x/120 - 20 exp(-2x - 1) + 3``."""
    y = x * (1.0 / 120) - exp(x * -2 - 1, upper=0.0) * 20 + 3.0
    for _ in range(iterations):
        h = 1 - x * exp(-y, upper=0.0)
        for k, hk in enumerate(powers(h, order), start=1):
            y = y - hk * (1.0 / k)
    return y


def power(x: SecretTensor, k: int) -> SecretTensor:
    """``x ** k`` by repeated squaring; each step's product and square share one round
    (``floor(log2 k) + 1`` rounds at most)."""
    if k == 0:
        return x * 0 + 1
    f = x.frac_bits
    result: torch.Tensor | None = None
    base = x.share
    while k:
        pairs = []
        if k & 1 and result is not None:
            pairs.append((result, base))
        if k > 1:
            pairs.append((base, base))
        new = _mul_batch(x.protocol, pairs, f) if pairs else []
        if k & 1:
            result = base if result is None else new.pop(0)
        if k > 1:
            base = new.pop(0)
        k >>= 1
    assert result is not None
    return x._new(result)


def powers(x: SecretTensor, k: int) -> list[SecretTensor]:
    """``[x, x^2, ..., x^k]`` in ``ceil(log2 k)`` rounds (all products of a round in one opening)."""
    out = [x.share]
    while len(out) < k:
        have = len(out)
        pairs = [(out[(j + 1) // 2 - 1], out[j // 2 - 1]) for j in range(have + 1, min(k, 2 * have) + 1)]
        out += _mul_batch(x.protocol, pairs, x.frac_bits)
    return [x._new(s) for s in out]


def polynomial(x: SecretTensor, coeffs: list[float]) -> SecretTensor:
    """``sum_i coeffs[i] x^i`` with public coefficients: the powers, then one local dot product and
    one truncation."""
    f = x.frac_bits
    pw = powers(x, len(coeffs) - 1) if len(coeffs) > 1 else []
    acc = _const(x, float(coeffs[0]), 2 * f)
    for c, p in zip(coeffs[1:], pw):
        acc = acc + p.share * round(c * (1 << f))
    return x._new(x.protocol.truncate(acc, f))


LOGISTIC_DEGREE = 4


@functools.cache
def _logistic_tail() -> list[float]:
    """Monomial coefficients of the degree-4 Chebyshev interpolant of ``1 / (1 + e)`` on [0, 1]
    (max error 3e-4, all coefficients in [-1, 1]; its powers take 2 rounds)."""
    poly = Chebyshev.interpolate(lambda e: 1 / (1 + e), LOGISTIC_DEGREE, domain=[0, 1]).convert(kind=Polynomial)
    return [float(c) for c in poly.coef]


def sigmoid(x: SecretTensor) -> SecretTensor:
    """Logistic function for |x| <= 500: ``e = exp(-|x|)`` in (0, 1], ``s = 1 / (1 + e)`` by a
    degree-4 polynomial in ``e``, then ``sigmoid = s + [x<0] (1 - 2 s)``."""
    bit, (xb,) = x.protocol.msb(x.share, [x.share])
    e = exp(x._new(2 * xb - x.share), upper=0.0)  # exp(-|x|)
    s = polynomial(e, _logistic_tail())
    b = x._new(bit << x.frac_bits)
    return s + b * (1 - 2 * s)


def tanh(x: SecretTensor) -> SecretTensor:
    return sigmoid(x * 2) * 2 - 1


def softmax(x: SecretTensor, dim: int = -1) -> SecretTensor:
    """Softmax along ``dim``: ``exp(x - max) / sum``; the sum is in [1, k], its reciprocal on that domain."""
    if x.dim() == 0:
        return softmax(x.reshape(1), 0).reshape(())
    k = x.shape[dim]
    widest = 2 ** ((2 * x.frac_bits + 2) // 3)  # the reciprocal's widest domain, see reciprocal()
    if k + 0.5 > widest:
        raise ValueError(f"softmax over {k} values along dim {dim}: the sum's reciprocal works on rows of up "
                         f"to {widest - 1} values at {x.frac_bits} fractional bits")
    m = nonlinear.amax(x, dim=dim, keepdim=True) if k > 1 else x
    e = exp(x - m.expand(*x.shape), upper=0.0)
    s = e.sum(dim, keepdim=True)
    inv = reciprocal(s, domain=(1.0, float(k) + 0.5))
    return e * inv.expand(*x.shape)


def rsqrt_wide(x: SecretTensor, lo: float = 2.0**-8, mid: float = 2.0**4) -> SecretTensor:
    """``1 / sqrt(x)`` over ``[lo, mid^2 / lo]`` (ratio 2^24 at the defaults: [2^-8, 2^16]) with one
    Goldschmidt run on ``[lo, mid]``: one sign-bit call (5 rounds) saturates ``x`` into the range and
    tells ``b = [x < mid]``; ``x`` or ``x lo / mid`` lands in ``[lo, mid]``; ``rsqrt`` (~23 rounds) is
    scaled back by ``1`` or ``sqrt(lo / mid)`` (1 round). Values below ``lo`` count as ``lo``, above
    the range as its top (relative error 4e-3 over the range at 16 fractional bits)."""
    if not 0 < lo < mid:
        raise ValueError(f"rsqrt_wide needs 0 < lo < mid, got lo={lo}, mid={mid}")
    s = lo / mid
    top = mid / s
    proto = x.protocol
    x_lo, x_mid, x_top = (x - lo).share.reshape(-1), (x - mid).share.reshape(-1), (x - top).share.reshape(-1)
    n = x_lo.numel()
    bits, (prod,) = proto.msb(torch.cat([x_lo, x_mid, x_top]), [torch.cat([x_lo, x.share.reshape(-1), x_top])])
    raise_lo = -prod[:n]  # (lo - x) [x < lo]
    b_mid, x_b = bits[n:2 * n], prod[n:2 * n]  # [x < mid], x [x < mid]
    relu_top = x_top - prod[2 * n:]  # relu(x - top)
    clamped = x.share.reshape(-1) + raise_lo - relu_top
    clamped_b = x_b + raise_lo  # clamped * [x < mid]
    scaled = x._new(clamped.reshape(x.shape)) * s + x._new(clamped_b.reshape(x.shape)) * (1 - s)
    r = scaled.rsqrt(domain=(lo, mid))
    root = float(np.sqrt(s))
    return r * root + r._new(proto.bilinear(r.share, b_mid.reshape(x.shape), "mul", {})) * (1 - root)
