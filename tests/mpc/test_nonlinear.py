"""Comparisons, piecewise-linear functions, max/argmax and pooling (veil.mpc.nonlinear).

Comparisons open exact bits, so their results are compared for equality with float64 PyTorch on the
quantized inputs. relu/abs/sign are exact on the ring (``x - x * msb(x)``, no truncation): they are
checked against float64 PyTorch on the quantized inputs with ``PIECEWISE_ATOL`` = 0 and against the
unquantized inputs within 2^-16 (the encoding's half-ULP, rounded up). ``where`` with a secret
condition and ``avg_pool2d`` take one truncated product: ``TRUNC_ATOL``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from mpc_testing import ULP, assert_close, quantize, randn, secure_eval, uniform

import veil

EXACT = 0.0
PIECEWISE_ATOL = 0.0  # vs quantized inputs
UNQUANTIZED_ATOL = ULP  # vs the raw float inputs: quantization only
TRUNC_ATOL = ULP
PUBLIC_REL = 2.0**-17


def _tricky_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs covering both signs, equality, neighbours one ULP apart, zero, and large magnitudes."""
    edge = torch.tensor([0.0, ULP, -ULP, 2 * ULP, -2 * ULP, 1.0, -1.0, 1e6, -1e6, 3.5, -3.5])
    xs, ys = torch.meshgrid(edge, edge, indexing="ij")
    rx, ry = randn(100, 200, scale=50), randn(101, 200, scale=50)
    ry[:50] = rx[:50]  # equal values
    ry[50:100] = rx[50:100] + ULP  # one ULP apart
    return torch.cat([xs.flatten(), rx]).double(), torch.cat([ys.flatten(), ry]).double()


def _assert_bits(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert torch.equal(got, want.double()), f"{name}: {int((got != want.double()).sum())} wrong bits"


def test_comparisons_are_exact_including_ties_and_one_ulp_gaps() -> None:
    x, y = _tricky_pairs()

    def fn(a: veil.SecretTensor, b: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {"lt": a < b, "gt": a > b, "le": a <= b, "ge": a >= b, "eq": a == b, "ne": a != b,
                "eq_method": a.eq(b)}

    got = secure_eval(fn, x, y)
    want = {"lt": x < y, "gt": x > y, "le": x <= y, "ge": x >= y, "eq": x == y, "ne": x != y,
            "eq_method": x == y}
    for name, w in want.items():
        _assert_bits(got[name], w, name)


def test_comparisons_with_public_operands_both_sides() -> None:
    x = torch.cat([randn(110, 100, scale=3), torch.tensor([0.0, ULP, -ULP, 1.0, 2.0])]).double()
    t = randn(111, 105, scale=3)

    def fn(a: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {"lt0": a < 0, "gt0": a > 0, "le1": a <= 1.0, "ge_t": a >= t, "eq1": a == 1, "ne2": a != 2.0,
                "t_lt_a": t < a, "t_gt_a": t > a, "zero_le_a": 0 <= a}

    got = secure_eval(fn, x)
    want = {"lt0": x < 0, "gt0": x > 0, "le1": x <= 1, "ge_t": x >= t, "eq1": x == 1, "ne2": x != 2,
            "t_lt_a": t < x, "t_gt_a": t > x, "zero_le_a": x >= 0}
    for name, w in want.items():
        _assert_bits(got[name], w, name)


def test_comparison_results_compose_as_numbers() -> None:
    x, y = randn(120, 64, scale=4), randn(121, 64, scale=4)

    def fn(a: veil.SecretTensor, b: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        c = a < b
        return {"count": c.sum(), "select": c * a + (1 - c) * b, "bits_times_int": (a == a) * 3}

    got = secure_eval(fn, x, y)
    assert got["count"].item() == float((x < y).sum())
    assert_close(got["select"], torch.where(x < y, x, y), 2 * TRUNC_ATOL, "c*a + (1-c)*b")
    assert torch.equal(got["bits_times_int"], torch.full((64,), 3.0, dtype=torch.float64))


def test_relu_abs_sign_exact() -> None:
    raw = torch.cat([torch.randn(500, generator=torch.Generator().manual_seed(130), dtype=torch.float64) * 20,
                     torch.tensor([0.0, ULP, -ULP, 0.4 * ULP, -0.4 * ULP, -0.6 * ULP, 1e9, -1e9])])
    x = quantize(raw)

    def fn(a: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {"relu": a.relu(), "abs": a.abs(), "sign": a.sign()}

    got = secure_eval(fn, raw)  # the owner shares the raw floats; encoding quantizes them
    sign = torch.sign(x)  # as torch.sign: 0 at 0
    assert_close(got["relu"], torch.relu(x), PIECEWISE_ATOL, "relu")
    assert_close(got["abs"], x.abs(), PIECEWISE_ATOL, "abs")
    assert_close(got["sign"], sign, EXACT, "sign")
    assert_close(got["relu"], torch.relu(raw), UNQUANTIZED_ATOL, "relu vs raw input")
    assert_close(got["abs"], raw.abs(), UNQUANTIZED_ATOL, "abs vs raw input")
    nonzero = x != 0
    assert torch.equal(got["sign"][nonzero], torch.sign(raw)[nonzero]), "sign vs torch.sign"


def test_where_with_public_and_secret_conditions() -> None:
    x, y = randn(140, 3, 40, scale=5), randn(141, 3, 40, scale=5)
    cond = torch.rand(3, 40, generator=torch.Generator().manual_seed(142)) < 0.5
    row = randn(143, 40)

    def fn(a: veil.SecretTensor, b: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        c = a < b
        return {"public": a.where(cond, b), "public_other": a.where(cond, 2.5),
                "public_row": a.where(cond, row), "fn_public_a": veil.mpc.nonlinear.where(cond, 1.0, b),
                "secret": a.where(c, b), "secret_public_other": a.where(c, -1.0)}

    got = secure_eval(fn, x, y)
    c = x < y
    assert_close(got["public"], torch.where(cond, x, y), EXACT, "where(public cond)")
    assert_close(got["public_other"], torch.where(cond, x, 2.5), EXACT, "where(public cond, scalar)")
    assert_close(got["public_row"], torch.where(cond, x, row), EXACT, "where(public cond, row)")
    assert_close(got["fn_public_a"], torch.where(cond, 1.0, y), EXACT, "where(cond, public, secret)")
    assert_close(got["secret"], torch.where(c, x, y), TRUNC_ATOL, "where(secret cond)")
    assert_close(got["secret_public_other"], torch.where(c, x, -1.0), TRUNC_ATOL,
                 "where(secret cond, scalar)")


def _with_ties(seed: int, *shape: int) -> torch.Tensor:
    """Values on a coarse grid (many ties), plus a row that is constant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).double() * 0.5
    x.view(-1, shape[-1])[0] = 1.25
    return x


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_max_along_dims_with_ties_first_index_wins(dim: int) -> None:
    x = _with_ties(150, 5, 7, 9)

    def fn(a: veil.SecretTensor) -> dict[str, object]:
        vals, idx = a.max(dim)
        kv, ki = a.max(dim, keepdim=True)
        return {"vals": vals, "idx": idx, "kv": kv, "ki": ki, "amax": a.amax(dim),
                "amax_k": a.amax(dim, keepdim=True), "argmax": a.argmax(dim),
                "argmax_k": a.argmax(dim, keepdim=True)}

    got = secure_eval(fn, x)
    ref = torch.max(x, dim)
    refk = torch.max(x, dim, keepdim=True)
    assert torch.equal(got["vals"], ref.values)
    assert torch.equal(got["idx"], ref.indices.double()), "max(dim) indices: first maximum must win ties"
    assert torch.equal(got["kv"], refk.values) and torch.equal(got["ki"], refk.indices.double())
    assert torch.equal(got["amax"], torch.amax(x, dim))
    assert torch.equal(got["amax_k"], torch.amax(x, dim, keepdim=True))
    assert torch.equal(got["argmax"], torch.argmax(x, dim).double())
    assert torch.equal(got["argmax_k"], torch.argmax(x, dim, keepdim=True).double())


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 13])
def test_max_over_every_length(k: int) -> None:
    x = randn(160 + k, 4, k, scale=10)
    x[0] = x[0, 0]  # all equal: index 0

    got = secure_eval(lambda a: list(a.max(-1)), x)
    ref = torch.max(x, -1)
    assert torch.equal(got[0], ref.values)
    assert torch.equal(got[1], ref.indices.double())


def test_global_max_argmax_and_one_hot() -> None:
    x = _with_ties(170, 4, 6)
    flat_ties = torch.tensor([1.0, 3.0, -2.0, 3.0, 3.0, 0.0], dtype=torch.float64)

    def fn(a: veil.SecretTensor, b: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {"max": a.max(), "argmax": a.argmax(), "one_hot1": a.argmax(1, one_hot=True),
                "one_hot0": a.argmax(0, one_hot=True), "one_hot_flat": a.argmax(one_hot=True),
                "ties_argmax": b.argmax(), "ties_hot": b.argmax(0, one_hot=True)}

    got = secure_eval(fn, x, flat_ties)
    assert got["max"].shape == () and got["max"].item() == x.max().item()
    assert got["argmax"].shape == () and got["argmax"].item() == x.argmax().item()
    for name, dim in [("one_hot1", 1), ("one_hot0", 0)]:
        hot = F.one_hot(x.argmax(dim), x.shape[dim]).double()
        want = hot if dim == 1 else hot.T
        assert torch.equal(got[name], want), name
    assert torch.equal(got["one_hot_flat"], F.one_hot(x.argmax(), x.numel()).double().reshape(x.shape))
    assert got["ties_argmax"].item() == 1.0
    assert torch.equal(got["ties_hot"], torch.tensor([0.0, 1, 0, 0, 0, 0], dtype=torch.float64))


POOLS: list[tuple[Any, Any, Any]] = [  # (kernel, stride, padding)
    (2, None, 0), (2, 1, 0), (3, None, 0), (3, 2, 1), (3, 1, 1), ((2, 3), (1, 2), (1, 0)), (2, 2, 1)]


def test_max_pool2d_matches_torch() -> None:
    x = randn(180, 2, 3, 7, 8, scale=5) - 20  # all negative: padding must not win
    x3 = randn(181, 3, 6, 6, scale=5)

    def fn(a: veil.SecretTensor, b: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        out = {f"{i}": a.max_pool2d(k, s, p) for i, (k, s, p) in enumerate(POOLS)}
        out["3d"] = b.max_pool2d(2)
        return out

    got = secure_eval(fn, x, x3)
    for i, (k, s, p) in enumerate(POOLS):
        want = F.max_pool2d(x, k, s, p)
        assert torch.equal(got[f"{i}"], want), f"max_pool2d(kernel={k}, stride={s}, padding={p})"
    assert torch.equal(got["3d"], F.max_pool2d(x3, 2))


def test_avg_pool2d_matches_torch() -> None:
    x = randn(190, 2, 3, 7, 8, scale=5)

    def fn(a: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {f"{i}": a.avg_pool2d(k, s, p) for i, (k, s, p) in enumerate(POOLS)}

    got = secure_eval(fn, x)
    for i, (k, s, p) in enumerate(POOLS):
        want = F.avg_pool2d(x, k, s, p)
        n = k * k if isinstance(k, int) else k[0] * k[1]
        bound = TRUNC_ATOL + float(want.abs().max()) * n * PUBLIC_REL  # exact sum times quantized 1/n
        assert_close(got[f"{i}"], want, bound, f"avg_pool2d(kernel={k}, stride={s}, padding={p})")


def test_pooling_rejects_wrong_ranks() -> None:
    def prog(session: veil.Session) -> list[str]:
        a = session.share(torch.zeros(4, 4) if session.party == "alice" else None, owner="alice")
        errors = []
        for pool in (a.max_pool2d, a.avg_pool2d):
            try:
                pool(2)
            except ValueError as e:
                errors.append(str(e))
        return errors

    from mpc_testing import run_local

    for errors in run_local(prog).values():
        assert len(errors) == 2 and all("(4, 4)" in e for e in errors)


def test_relu_of_large_batch_and_uniform_inputs() -> None:
    x = uniform(200, 5000, lo=-1000.0, hi=1000.0)
    got = secure_eval(lambda a: a.relu(), x)
    assert_close(got, torch.relu(x), PIECEWISE_ATOL, "relu over [-1000, 1000]")
