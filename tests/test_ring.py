"""Fixed-point encoding in Z_2^64 (veil.ring)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.ring import EncodingError, FixedPoint

DEFAULT = FixedPoint()
BOUND16 = 2.0**46  # encodable: |v| < 2^(62 - 16)
ROUND_TRIP_ATOL16 = 2.0**-17  # half a unit in the last place at 16 fractional bits
FAST = settings(max_examples=60, deadline=None)

finite_in_range = st.floats(min_value=-BOUND16, max_value=BOUND16, exclude_min=True, exclude_max=True,
                            allow_nan=False, allow_infinity=False)


def test_default_precision_and_range() -> None:
    assert DEFAULT.frac_bits == 16
    assert DEFAULT.scale == 65536
    assert DEFAULT.bound == BOUND16
    assert "2^46" in DEFAULT.describe_range()


@FAST
@given(st.lists(finite_in_range, min_size=1, max_size=16))
def test_encode_decode_round_trip_within_half_ulp(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    ring = DEFAULT.encode(x)
    assert ring.dtype == torch.int64 and ring.shape == x.shape
    back = DEFAULT.decode(ring, torch.float64)
    assert float((back - x).abs().max()) <= ROUND_TRIP_ATOL16


@FAST
@given(st.integers(min_value=0, max_value=30), st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=8))
def test_round_trip_at_every_precision(frac_bits: int, unit: list[float]) -> None:
    fp = FixedPoint(frac_bits)
    # values spread over the whole range of this precision, strictly inside it
    x = torch.tensor(unit, dtype=torch.float64) * fp.bound * (1 - 2.0**-10)
    back = fp.decode(fp.encode(x), torch.float64)
    assert float((back - x).abs().max()) <= 2.0 ** -(frac_bits + 1)


@FAST
@given(st.integers(min_value=-(2**53), max_value=2**53))
def test_decode_is_exact_for_every_ring_integer_float64_can_hold(r: int) -> None:
    ring = torch.tensor([r, -r], dtype=torch.int64)
    got = DEFAULT.decode(ring, torch.float64)
    assert got.tolist() == [r / 65536, -r / 65536]


def test_decode_negative_values_exactly() -> None:
    ring = torch.tensor([-1, -65536, -65537, -(2**62), -(2**63), 2**63 - 1], dtype=torch.int64)
    got = DEFAULT.decode(ring, torch.float64)
    assert got.tolist() == [-(2.0**-16), -1.0, -1.0 - 2.0**-16, -(2.0**46), -(2.0**47), (2**63 - 1) / 65536]
    assert DEFAULT.decode(DEFAULT.encode(torch.tensor([-3.25, -(2.0**-16)])), torch.float64).tolist() == [
        -3.25, -(2.0**-16)]


@FAST
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=8), st.integers(-(2**63), 2**63 - 1))
def test_additive_masking_wraps_and_decodes_exactly(values: list[float], mask: int) -> None:
    """``(x - r) + r`` over the wrapping int64 ring gives back the encoding of x, for any r."""
    x = torch.tensor(values, dtype=torch.float64)
    ring = DEFAULT.encode(x)
    r = torch.full_like(ring, mask)
    share0, share1 = ring - r, r
    assert torch.equal(share0 + share1, ring)
    assert torch.equal(DEFAULT.decode(share0 + share1, torch.float64), DEFAULT.decode(ring, torch.float64))


def test_sum_of_two_encodable_values_does_not_wrap() -> None:
    near = math.nextafter(BOUND16, 0.0)
    ring = DEFAULT.encode(torch.tensor([near, -near], dtype=torch.float64))
    doubled = DEFAULT.decode(ring + ring, torch.float64)
    assert doubled.tolist() == [2 * near, -2 * near]


def test_encode_rounds_to_nearest() -> None:
    x = torch.tensor([0.4 * 2.0**-16, 0.6 * 2.0**-16, -0.6 * 2.0**-16, 1.0 + 0.75 * 2.0**-16])
    assert DEFAULT.encode(x.double()).tolist() == [0, 1, -1, 65537]


def test_encode_accepts_ints_bools_and_python_scalars() -> None:
    assert DEFAULT.encode(torch.tensor([1, -2, 3])).tolist() == [65536, -131072, 196608]
    assert DEFAULT.encode(torch.tensor([True, False])).tolist() == [65536, 0]
    assert DEFAULT.encode(2.5).item() == 163840
    raw = torch.tensor([5, -7], dtype=torch.int64)
    integral = FixedPoint(0)
    assert torch.equal(integral.encode(raw), raw)
    assert torch.equal(integral.decode(raw, torch.int64), raw)


def test_decode_default_dtype_is_float32() -> None:
    assert DEFAULT.decode(torch.tensor([65536])).dtype == torch.float32


@pytest.mark.parametrize("bad, what", [
    (float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "inf"),
    (BOUND16, "outside"), (-BOUND16, "outside"), (1e20, "outside")])
def test_unencodable_values_name_the_range(bad: float, what: str) -> None:
    x = torch.tensor([0.0, bad, 1.0], dtype=torch.float64)
    with pytest.raises(EncodingError) as info:
        DEFAULT.encode(x, what="my input")
    message = str(info.value)
    assert what in message and "my input" in message
    assert DEFAULT.describe_range() in message, message
    assert isinstance(info.value, ValueError)


def test_range_depends_on_precision() -> None:
    fp = FixedPoint(30)
    assert fp.bound == 2.0**32
    fp.encode(torch.tensor([math.nextafter(2.0**32, 0.0)], dtype=torch.float64))
    with pytest.raises(EncodingError, match=r"2\^32"):
        fp.encode(torch.tensor([2.0**32], dtype=torch.float64))
    assert FixedPoint(0).bound == 2.0**62


@pytest.mark.parametrize("frac_bits", [-1, 31, 64])
def test_frac_bits_validation(frac_bits: int) -> None:
    with pytest.raises(ValueError, match=r"frac_bits must be in \[0, 30\]"):
        FixedPoint(frac_bits)


def test_fixed_point_is_frozen() -> None:
    with pytest.raises(AttributeError):
        DEFAULT.frac_bits = 20  # type: ignore[misc]


def test_empty_tensor_encodes() -> None:
    assert DEFAULT.encode(torch.empty(0, 3)).shape == (0, 3)
