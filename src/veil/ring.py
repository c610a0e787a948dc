"""Fixed-point encoding of real numbers in the ring Z_2^64.

A real value ``v`` is held as the integer ``round(v * 2**frac_bits)`` reduced mod 2^64, stored in a
``torch.int64`` tensor (two's complement: int64 arithmetic wraps, which *is* arithmetic mod 2^64).
With the default 16 fractional bits the resolution is 2^-16 ~ 1.5e-5.

Range. Encoding accepts ``|v| < 2**(62 - frac_bits)`` (2^46 ~ 7.0e13 at 16 bits): one bit of headroom
below the ring's signed range so that a sum of two encoded values cannot wrap. Products of secrets
are computed at ``2 * frac_bits`` and truncated back, so they are correct while
``|x * y| < 2**(62 - 2 * frac_bits)`` (2^30 ~ 1.07e9 at 16 bits) before truncation; the protocol's
documentation states its truncation error (see ``veil.mpc.truncate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RING_BITS = 64


class EncodingError(ValueError):
    """A value cannot be represented in the fixed-point ring (NaN, inf, or out of range)."""


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point options of a session: ``frac_bits`` fractional bits in Z_2^64."""

    frac_bits: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 30:
            raise ValueError(f"frac_bits must be in [0, 30], got {self.frac_bits}")

    @property
    def scale(self) -> int:
        return 1 << self.frac_bits

    @property
    def bound(self) -> float:
        """Encodable values are strictly inside (-bound, bound)."""
        return float(2 ** (RING_BITS - 2 - self.frac_bits))

    def describe_range(self) -> str:
        b = self.bound
        return f"(-{b:.4g}, {b:.4g}) = (-2^{int(math.log2(b))}, 2^{int(math.log2(b))})"

    def encode(self, value: torch.Tensor | float | int, *, what: str = "value") -> torch.Tensor:
        """Encode real numbers as ring elements (``torch.int64``), refusing NaN, inf and overflow."""
        t = torch.as_tensor(value)
        if t.dtype == torch.int64 and self.frac_bits == 0:
            return t.clone()
        if t.dtype == torch.bool:
            t = t.to(torch.float64)
        x = t.to(torch.float64)
        if x.numel():
            bad_nan = torch.isnan(x)
            if bool(bad_nan.any()):
                raise EncodingError(f"cannot encode {what}: it contains NaN at {int(bad_nan.sum())} "
                                    f"position(s); encodable values are finite and in {self.describe_range()}")
            bad_inf = torch.isinf(x)
            if bool(bad_inf.any()):
                raise EncodingError(f"cannot encode {what}: it contains inf at {int(bad_inf.sum())} "
                                    f"position(s); encodable values are finite and in {self.describe_range()}")
            peak = float(x.abs().max())
            if peak >= self.bound:
                raise EncodingError(
                    f"cannot encode {what}: |value| reaches {peak:.6g}, outside the fixed-point range "
                    f"{self.describe_range()} of Z_2^64 with {self.frac_bits} fractional bits; "
                    f"rescale the data or use fewer fractional bits")
        return torch.round(x * self.scale).to(torch.int64)

    def decode(self, ring: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode ring elements (as signed two's-complement integers) to real numbers."""
        if self.frac_bits == 0 and not dtype.is_floating_point:
            return ring.to(dtype)
        # Split to keep every bit exact in float64 before scaling.
        hi = torch.div(ring, 1 << 32, rounding_mode="floor")
        lo = ring - hi * (1 << 32)
        out = (hi.to(torch.float64) * float(1 << 32) + lo.to(torch.float64)) / self.scale
        return out.to(dtype)


def extra_fraction_bits(factor: torch.Tensor, frac_bits: int) -> int:
    """Fractional bits to add to a public factor whose largest magnitude is below 1/2, so that it is
    encoded with about ``frac_bits`` significant bits (at ``frac_bits`` alone, 1/1000 would be 66
    units, 0.7% off): ``k = floor(-log2 max|c|)``, at most ``frac_bits``. The product ``x * c * 2^k``
    is no larger than ``x`` itself, so it is computed and truncated (by ``frac_bits + k``) within the
    range of a product by a factor of magnitude <= 1."""
    if not factor.dtype.is_floating_point or factor.numel() == 0:
        return 0
    peak = float(factor.abs().max())
    if not 0 < peak < 0.5 or not math.isfinite(peak):
        return 0
    return min(frac_bits, math.floor(-math.log2(peak)))
