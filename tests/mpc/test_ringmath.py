"""Ring matrix products and convolutions on float64 limbs (veil.mpc.ringmath) equal PyTorch's int64
ops bit for bit, on full-range ring elements (negative ones included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.mpc import ringmath
from veil.mpc.material import BILINEAR_OPS, conv2d_weight


def ring(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, generator=g, dtype=torch.int64)


def top(*shape: int) -> torch.Tensor:
    """Ring elements whose limbs are all at their largest: the worst case for the float64 sums."""
    return torch.full(shape, -1, dtype=torch.int64)


@pytest.mark.parametrize(("limit", "offsets"), ringmath.LAYOUTS)
def test_every_layout_is_exact_at_its_limit_and_refused_past_it(limit: int, offsets: tuple[int, ...]) -> None:
    pairs = [p for _, group in ringmath.pair_groups(offsets, limit) for p in group]
    assert len(pairs) == len(set(pairs)) == sum(oi + oj < 64 for oi in offsets for oj in offsets)
    with pytest.raises(AssertionError, match="not exact"):
        list(ringmath.pair_groups(offsets, 4 * limit))


def test_pairs_of_one_shift_share_a_float_sum_only_within_the_bound() -> None:
    sizes = ringmath.sizes((0, 21, 43))
    for terms in (1, 100, 512):
        for shift, group in ringmath.pair_groups((0, 21, 43), terms):
            assert all((0, 21, 43)[i] + (0, 21, 43)[j] == shift for i, j in group)
            assert sum(terms * ((1 << sizes[i]) - 1) * ((1 << sizes[j]) - 1) for i, j in group) < 2**53


@pytest.mark.parametrize("k", [1, 7, 512, 513, 784, 4096, 5000])
def test_matmul_equals_int64_at_and_past_each_layouts_limit(k: int) -> None:
    for x, y in ((ring(9, k, seed=k), ring(k, 11, seed=k + 1)), (top(9, k), top(k, 11))):
        assert torch.equal(ringmath.exact(torch.matmul, x, y, k), x @ y)
        assert torch.equal(ringmath.matmul(x, y), x @ y)  # slices of 512 up to 4096, then 16-bit limbs


def test_limbs_reassemble_the_bit_pattern() -> None:
    x = torch.cat([ring(1000), torch.tensor([0, -1, -(2**63), 2**63 - 1])])
    for _, offsets in ringmath.LAYOUTS:
        parts = ringmath.limbs(x, offsets)
        back = sum(p.to(torch.int64) << o for p, o in zip(parts, offsets))
        assert torch.equal(back, x)
        assert all(float(p.min()) >= 0 for p in parts)


def test_past_the_last_layout_the_int64_op_runs() -> None:
    assert ringmath.layout((1 << 21) + 1) is None
    x, y = ring(2, 3), ring(3, 2)
    assert torch.equal(ringmath.exact(torch.matmul, x, y, (1 << 21) + 1), x @ y)


@settings(max_examples=25, deadline=None)
@given(batch=st.lists(st.integers(1, 3), max_size=2), m=st.integers(1, 40), k=st.integers(1, 700),
       n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_registry_matmul_equals_int64_for_any_shapes(batch: list[int], m: int, k: int, n: int, seed: int) -> None:
    x, y = ring(*batch, m, k, seed=seed), ring(k, n, seed=seed + 1)
    assert torch.equal(BILINEAR_OPS["matmul"](x, y), x @ y)


def test_registry_matmul_of_vectors_batches_and_small_products() -> None:
    v, m = ring(600, seed=3), ring(600, 70, seed=4)
    assert torch.equal(BILINEAR_OPS["matmul"](v, m), v @ m)
    assert torch.equal(BILINEAR_OPS["matmul"](m.t(), v), m.t() @ v)
    assert torch.equal(BILINEAR_OPS["matmul"](v, v), v @ v)
    bx, by = ring(3, 20, 700, seed=13), ring(3, 700, 30, seed=14)
    assert torch.equal(BILINEAR_OPS["matmul"](bx, by), bx @ by)
    a, b = ring(2, 2), ring(2, 2)  # below MIN_MACS: the int64 op itself
    assert torch.equal(BILINEAR_OPS["matmul"](a, b), a @ b)


@pytest.mark.parametrize("kw", [{}, {"stride": 2, "padding": 1}, {"dilation": 2, "padding": 2},
                                {"groups": 4, "padding": 1}, {"stride": (1, 2), "padding": (2, 0)},
                                {"padding": "same"}])
def test_conv2d_equals_int64(kw: dict) -> None:
    x, w = ring(3, 8, 13, 11, seed=1), ring(12, 8 // kw.get("groups", 1), 5, 5, seed=2)
    assert torch.equal(BILINEAR_OPS["conv2d"](x, w, **kw), F.conv2d(x, w, **kw))
    xt, wt = top(2, 8, 9, 9), top(12, 8 // kw.get("groups", 1), 5, 5)
    assert torch.equal(BILINEAR_OPS["conv2d"](xt, wt, **kw), F.conv2d(xt, wt, **kw))


def test_conv2d_with_more_than_512_terms_per_output_equals_int64() -> None:
    x, w = ring(2, 32, 10, 10, seed=5), ring(4, 32, 5, 5, seed=6)  # 800 terms
    assert torch.equal(BILINEAR_OPS["conv2d"](x, w, padding=2), F.conv2d(x, w, padding=2))


def test_conv2d_in_blocks_of_images_equals_int64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ringmath, "COLUMN_BYTES", 8 * 25 * 24 * 24 * 3)  # blocks of 3 images
    x, w = ring(10, 1, 28, 28, seed=15), ring(16, 1, 5, 5, seed=16)
    assert torch.equal(ringmath.conv2d(x, w), F.conv2d(x, w))


@pytest.mark.parametrize("kw", [{"padding": 3}, {"stride": 2, "dilation": 2, "groups": 2}, {"padding": "same"}])
def test_conv1d_equals_int64(kw: dict) -> None:
    x, w = ring(4, 6, 50, seed=7), ring(4, 6 // kw.get("groups", 1), 7, seed=8)
    assert torch.equal(BILINEAR_OPS["conv1d"](x, w, **kw), F.conv1d(x, w, **kw))


@pytest.mark.parametrize("kw", [{"stride": 2}, {"stride": 2, "padding": 1, "output_padding": 1},
                                {"groups": 2, "stride": 1, "padding": 1}])
def test_conv_transpose2d_equals_int64(kw: dict) -> None:
    x, w = ring(3, 8, 7, 7, seed=9), ring(8, 6 // kw.get("groups", 1), 4, 4, seed=10)
    assert torch.equal(BILINEAR_OPS["conv_transpose2d"](x, w, **kw), F.conv_transpose2d(x, w, **kw))


@pytest.mark.parametrize("kw", [{}, {"stride": 2, "padding": 1}, {"groups": 2, "padding": 1}])
def test_conv2d_weight_gradient_equals_int64(kw: dict) -> None:
    groups = kw.get("groups", 1)
    x, w_shape = ring(16, 4, 12, 12, seed=11), (6, 4 // groups, 3, 3)
    out = F.conv2d(torch.zeros(16, 4, 12, 12), torch.zeros(w_shape), **kw)
    grad = ring(*out.shape, seed=12)  # 16 x OH x OW > 512 terms per output: the 16-bit layout
    want = conv2d_weight(x, grad, weight_shape=w_shape, **kw)  # the plain function: int64 convolutions
    assert torch.equal(BILINEAR_OPS["conv2d_weight"](x, grad, weight_shape=w_shape, **kw), want)
    assert 16 * out.shape[2] * out.shape[3] > ringmath.SMALL_TERMS  # the case this test is for


def test_float_operands_pass_straight_through() -> None:
    x, y = torch.randn(3, 4), torch.randn(4, 5)
    assert torch.equal(BILINEAR_OPS["matmul"](x, y), x @ y)


def test_gradients_in_blocks_of_images_equal_int64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ringmath, "COLUMN_BYTES", 8 * 36 * 6 * 6 * 2)  # blocks of 2 images
    x, grad, w_shape = ring(7, 4, 8, 8, seed=17), ring(7, 6, 6, 6, seed=18), (6, 4, 3, 3)
    kw = {"weight_shape": w_shape}
    assert torch.equal(ringmath.conv2d_weight(x, grad, **kw), conv2d_weight(x, grad, **kw))  # 72 terms: 21-bit limbs
    w = ring(6, 4, 3, 3, seed=19)
    assert torch.equal(ringmath.conv_transpose2d(grad, w), F.conv_transpose2d(grad, w))
