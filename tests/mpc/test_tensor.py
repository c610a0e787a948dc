"""SecretTensor arithmetic and shape methods against plaintext PyTorch (veil.mpc.tensor).

References are float64 PyTorch on the quantized inputs (see ``mpc_testing``). Error bounds:

- linear operations (add, sub, neg, sums, shapes, indexing, products with public integers) are
  exact: the ring computes exactly what float64 computes on quantized values;
- one truncated product (secret * secret, secret * public float, matmul, conv2d) is within
  ``TRUNC_ATOL`` = 1 unit in the last place of the exact product of the quantized operands (local
  truncation: one party rounds down, the other up);
- a public float operand is itself quantized, which adds ``|other factor| * 2^-17`` (see ``PUBLIC_REL``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes
from mpc_testing import ULP, assert_close, max_abs_err, quantize, randn, run_local, secure_eval, uniform

import veil

EXACT = 0.0
TRUNC_ATOL = ULP  # one truncation of an exact product
PUBLIC_REL = 2.0**-17  # quantization of a public float operand, relative to the other factor
RECIPROCAL_REL = 1e-3  # reciprocal's stated error in its domain (veil.mpc.approx table)
FAST = settings(max_examples=12, deadline=None)


# ---- linear --------------------------------------------------------------------------------
def test_add_sub_neg_with_secret_and_public_operands() -> None:
    x, y = randn(1, 4, 5, scale=10), randn(2, 4, 5, scale=10)
    row, col = randn(3, 5), randn(4, 4, 1)
    k = 7

    def fn(a: veil.SecretTensor, b: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {"a+b": a + b, "a-b": a - b, "-a": -a, "a+row": a + row, "row+a": row + a,
                "a-col": a - col, "col-a": col - a, "a+k": a + k, "k-a": k - a, "a+2.5": a + 2.5,
                "1.5-a": 1.5 - a, "a-a": a - a, "b+a+a": b + a + a}

    got = secure_eval(fn, x, y)
    want = {"a+b": x + y, "a-b": x - y, "-a": -x, "a+row": x + row, "row+a": row + x, "a-col": x - col,
            "col-a": col - x, "a+k": x + k, "k-a": k - x, "a+2.5": x + 2.5, "1.5-a": 1.5 - x,
            "a-a": torch.zeros_like(x), "b+a+a": y + 2 * x}
    for name, w in want.items():
        assert_close(got[name], w, EXACT, name)


@FAST
@given(mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4),
       st.integers(0, 2**16))
def test_broadcasting_of_secret_secret_and_secret_public_operations(shapes, seed: int) -> None:  # type: ignore[no-untyped-def]
    sx, sy = shapes.input_shapes
    x, y = randn(seed, *sx, scale=4), randn(seed + 1, *sy, scale=4)

    def fn(a: veil.SecretTensor, b: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {"add": a + b, "sub": a - b, "mul": a * b, "mul_public": a * y, "add_public": a + y,
                "rsub_public": y - a}

    got = secure_eval(fn, x, y)
    assert_close(got["add"], x + y, EXACT, "add")
    assert_close(got["sub"], x - y, EXACT, "sub")
    assert_close(got["add_public"], x + y, EXACT, "add_public")
    assert_close(got["rsub_public"], y - x, EXACT, "rsub_public")
    assert_close(got["mul"], x * y, TRUNC_ATOL, "mul")
    assert_close(got["mul_public"], x * y, TRUNC_ATOL, "mul_public")


# ---- multiplicative ------------------------------------------------------------------------
def test_mul_secret_secret_public_float_and_public_int() -> None:
    x, y = randn(10, 3, 50, scale=8), randn(11, 3, 50, scale=8)
    w = quantize(torch.tensor(-0.3183))
    ints = torch.randint(-5, 6, (3, 50), generator=torch.Generator().manual_seed(12))

    def fn(a: veil.SecretTensor, b: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {"ab": a * b, "aw": a * float(w), "wa": float(w) * a, "a3": a * 3, "m4a": -4 * a,
                "aints": a * ints, "sq": a.square(), "aa": a * a, "half": a * 0.5}

    got = secure_eval(fn, x, y)
    assert_close(got["ab"], x * y, TRUNC_ATOL, "secret*secret")
    assert_close(got["aw"], x * w, TRUNC_ATOL, "secret*public float")
    assert_close(got["wa"], x * w, TRUNC_ATOL, "public float*secret")
    assert_close(got["a3"], 3 * x, EXACT, "secret*public int")
    assert_close(got["m4a"], -4 * x, EXACT, "public int*secret")
    assert_close(got["aints"], x * ints, EXACT, "secret*public int tensor")
    assert_close(got["sq"], x * x, TRUNC_ATOL, "square")
    assert_close(got["aa"], x * x, TRUNC_ATOL, "a*a")
    assert_close(got["half"], x * 0.5, TRUNC_ATOL, "a*0.5")


def test_mul_by_an_unquantized_public_float_is_within_its_quantization() -> None:
    x = randn(13, 100, scale=8)
    c = 1 / 3

    got = secure_eval(lambda a: a * c, x)
    assert_close(got, x * c, TRUNC_ATOL + float(x.abs().max()) * PUBLIC_REL, "a * (1/3)")


def test_matmul_secret_secret_secret_public_public_secret() -> None:
    a_, b_ = randn(20, 4, 6, scale=3), randn(21, 6, 5, scale=3)
    batch_a, batch_b = randn(22, 2, 3, 4, scale=3), randn(23, 2, 4, 3, scale=3)
    vec = randn(24, 6, scale=3)
    pub = randn(25, 6, 5, scale=3)
    pub_left = randn(26, 3, 4, scale=3)

    def fn(a: veil.SecretTensor, b: veil.SecretTensor, ba: veil.SecretTensor, bb: veil.SecretTensor,
           v: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {"ss": a @ b, "sp": a @ pub, "ps": pub_left @ a, "batched": ba @ bb, "mv": a @ v,
                "method": a.matmul(b), "vm": v @ b, "broadcast": ba @ a[:, :4].transpose(0, 1)}

    got = secure_eval(fn, a_, b_, batch_a, batch_b, vec)
    assert_close(got["ss"], a_ @ b_, TRUNC_ATOL, "secret @ secret")
    assert_close(got["sp"], a_ @ pub, TRUNC_ATOL, "secret @ public")
    assert_close(got["ps"], pub_left @ a_, TRUNC_ATOL, "public @ secret")
    assert_close(got["batched"], batch_a @ batch_b, TRUNC_ATOL, "batched")
    assert_close(got["mv"], a_ @ vec, TRUNC_ATOL, "matrix @ vector")
    assert_close(got["method"], a_ @ b_, TRUNC_ATOL, "matmul()")
    assert_close(got["vm"], vec @ b_, TRUNC_ATOL, "vector @ matrix")
    assert_close(got["broadcast"], batch_a @ a_[:, :4].T, TRUNC_ATOL, "broadcast batch")


def test_conv2d_secret_and_public_weights_stride_padding_groups_bias() -> None:
    x = randn(30, 2, 4, 7, 7)
    w = randn(31, 6, 4, 3, 3, scale=0.5)
    wg = randn(32, 6, 2, 3, 3, scale=0.5)
    wdw = randn(33, 4, 1, 2, 2, scale=0.5)
    bias = randn(34, 6)

    def fn(a: veil.SecretTensor, sw: veil.SecretTensor,
           sb: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {
            "secret_w": a.conv2d(sw),
            "secret_w_bias": a.conv2d(sw, sb, stride=2, padding=1),
            "public_w": a.conv2d(w, bias, padding=(1, 2)),
            "groups": a.conv2d(wg, stride=(2, 1), groups=2),
            "depthwise": a.conv2d(wdw, groups=4, dilation=2),
        }

    got = secure_eval(fn, x, w, bias)
    want = {
        "secret_w": F.conv2d(x, w),
        "secret_w_bias": F.conv2d(x, w, bias, stride=2, padding=1),
        "public_w": F.conv2d(x, w, bias, padding=(1, 2)),
        "groups": F.conv2d(x, wg, stride=(2, 1), groups=2),
        "depthwise": F.conv2d(x, wdw, groups=4, dilation=2),
    }
    for name, ref in want.items():
        assert_close(got[name], ref, TRUNC_ATOL, f"conv2d {name}")


def test_division_by_public_and_by_secret() -> None:
    x = randn(40, 200, scale=10)
    y = uniform(41, 200, lo=0.25, hi=16.0)
    d = torch.tensor(3.0)

    def fn(a: veil.SecretTensor, b: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {"by_int": a / 4, "by_float": a / 3.0, "by_tensor": a / d, "by_secret": a / b}

    got = secure_eval(fn, x, y)
    assert_close(got["by_int"], x / 4, TRUNC_ATOL, "a / 4")
    assert_close(got["by_float"], x / 3, TRUNC_ATOL + float(x.abs().max()) * PUBLIC_REL, "a / 3.0")
    assert_close(got["by_tensor"], x / 3, TRUNC_ATOL + float(x.abs().max()) * PUBLIC_REL, "a / tensor(3)")
    # a * (1/b): reciprocal's relative error carried by the product, plus one truncation and 1/b's last place
    excess = (got["by_secret"] - x / y).abs() - (RECIPROCAL_REL * (x / y).abs() + (1 + x.abs()) * ULP)
    rel = float(((got["by_secret"] - x / y) * y / x).abs().max())
    assert float(excess.max()) <= 0, f"a / b (b in [0.25, 16]): max relative error {rel:.3e}"


def test_division_by_a_public_zero_is_refused() -> None:
    def prog(session: veil.Session) -> str:
        a = session.share(torch.ones(2) if session.party == "alice" else None, owner="alice")
        try:
            a / 0
        except ZeroDivisionError as e:
            return str(e)
        return "no error"

    out = run_local(prog)
    assert all("zero" in v for v in out.values())


def test_pow_by_repeated_squaring() -> None:
    x = uniform(50, 100, lo=-1.5, hi=1.5)

    def fn(a: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {str(k): a**k for k in range(6)}

    got = secure_eval(fn, x)
    for k in range(6):
        # each of the <= 2 log2(k) + 1 products adds at most one ULP times the larger factor's growth
        bound = 0.0 if k <= 1 else 4 * k * ULP * max(1.0, 1.5 ** (k - 1))
        assert_close(got[str(k)], x**k, bound, f"x**{k}")


def test_pow_rejects_negative_and_non_integer_exponents() -> None:
    def prog(session: veil.Session) -> list[str]:
        a = session.share(torch.ones(2) if session.party == "alice" else None, owner="alice")
        errors = []
        for k in (-1, 0.5):
            try:
                a**k
            except ValueError as e:
                errors.append(str(e))
        return errors

    for errors in run_local(prog).values():
        assert len(errors) == 2 and all("non-negative integer" in e for e in errors)


# ---- reductions ----------------------------------------------------------------------------
def test_sum_and_mean_over_dims() -> None:
    x = randn(60, 3, 4, 5, scale=5)

    def fn(a: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {"sum": a.sum(), "sum0": a.sum(0), "sum-1k": a.sum(-1, keepdim=True), "sum01": a.sum((0, 1)),
                "mean": a.mean(), "mean1": a.mean(1), "mean02k": a.mean((0, 2), keepdim=True)}

    got = secure_eval(fn, x)
    assert_close(got["sum"], x.sum(), EXACT, "sum()")
    assert_close(got["sum0"], x.sum(0), EXACT, "sum(0)")
    assert_close(got["sum-1k"], x.sum(-1, keepdim=True), EXACT, "sum(-1, keepdim)")
    assert_close(got["sum01"], x.sum((0, 1)), EXACT, "sum((0, 1))")
    for name, ref, n in [("mean", x.mean(), 60), ("mean1", x.mean(1), 4),
                         ("mean02k", x.mean((0, 2), keepdim=True), 15)]:
        # the sum is exact, 1/n is quantized, then one truncation
        bound = TRUNC_ATOL + float(ref.abs().max()) * n * PUBLIC_REL
        assert_close(got[name], ref, bound, name)


# ---- shapes --------------------------------------------------------------------------------
def test_every_shape_method_matches_torch() -> None:
    x = randn(70, 2, 3, 4)
    pairs = {
        "reshape": (lambda a: a.reshape(6, 4), lambda t: t.reshape(6, 4)),
        "reshape_tuple": (lambda a: a.reshape((4, -1)), lambda t: t.reshape((4, -1))),
        "view": (lambda a: a.view(2, 12), lambda t: t.view(2, 12)),
        "transpose": (lambda a: a.transpose(0, 2), lambda t: t.transpose(0, 2)),
        "permute": (lambda a: a.permute(2, 0, 1), lambda t: t.permute(2, 0, 1)),
        "flatten": (lambda a: a.flatten(), lambda t: t.flatten()),
        "flatten1": (lambda a: a.flatten(1), lambda t: t.flatten(1)),
        "squeeze": (lambda a: a.unsqueeze(0).unsqueeze(3).squeeze(), lambda t: t),
        "squeeze_dim": (lambda a: a.unsqueeze(1).squeeze(1), lambda t: t),
        "unsqueeze": (lambda a: a.unsqueeze(-1), lambda t: t.unsqueeze(-1)),
        "expand": (lambda a: a[:, :1].expand(2, 5, 4), lambda t: t[:, :1].expand(2, 5, 4)),
        "repeat": (lambda a: a.repeat(2, 1, 3), lambda t: t.repeat(2, 1, 3)),
        "unfold": (lambda a: a.unfold(2, 2, 1), lambda t: t.unfold(2, 2, 1)),
        "t": (lambda a: a[0].t(), lambda t: t[0].t()),
        "T": (lambda a: a[1].T, lambda t: t[1].T),
        "contiguous": (lambda a: a.transpose(0, 1).contiguous(), lambda t: t.transpose(0, 1).contiguous()),
        "pad": (lambda a: a.pad((1, 2)), lambda t: F.pad(t, (1, 2))),
        "pad2d": (lambda a: a.pad([1, 0, 0, 2]), lambda t: F.pad(t, [1, 0, 0, 2])),
        "getitem_int": (lambda a: a[1], lambda t: t[1]),
        "getitem_slices": (lambda a: a[:, 1:, ::2], lambda t: t[:, 1:, ::2]),
        "getitem_neg": (lambda a: a[-1, -2], lambda t: t[-1, -2]),
        "getitem_ellipsis": (lambda a: a[..., 0], lambda t: t[..., 0]),
        "getitem_none": (lambda a: a[None, 0], lambda t: t[None, 0]),
        "getitem_index": (lambda a: a[:, torch.tensor([2, 0, 2])], lambda t: t[:, torch.tensor([2, 0, 2])]),
        "getitem_mask": (lambda a: a[torch.tensor([True, False])], lambda t: t[torch.tensor([True, False])]),
        "cat0": (lambda a: veil.cat([a, -a], 0), lambda t: torch.cat([t, -t], 0)),
        "cat-1": (lambda a: veil.cat([a, a[..., :1]], dim=-1), lambda t: torch.cat([t, t[..., :1]], -1)),
        "stack": (lambda a: veil.stack([a, a * 2], 1), lambda t: torch.stack([t, t * 2], 1)),
    }

    got = secure_eval(lambda a: {k: f(a) for k, (f, _) in pairs.items()}, x)
    for name, (_, ref) in pairs.items():
        want = ref(x)
        assert got[name].shape == want.shape, f"{name}: {tuple(got[name].shape)} != {tuple(want.shape)}"
        assert_close(got[name], want, EXACT, name)


def test_shape_queries_are_local_and_match_torch() -> None:
    x = randn(71, 2, 3, 4)

    def prog(session: veil.Session) -> list[object]:
        a = session.share(x if session.party == "alice" else None, owner="alice")
        return [tuple(a.shape), tuple(a.size()), a.size(1), a.dim(), a.numel(), len(a), str(a.device)]

    for r in run_local(prog).values():
        assert r == [(2, 3, 4), (2, 3, 4), 3, 3, 24, 2, "cpu"]


def test_setitem_with_secret_and_public_values() -> None:
    x, y = randn(80, 4, 5), randn(81, 2, 5)

    def fn(a: veil.SecretTensor, b: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        s = a * 1  # a fresh tensor: a's share stays untouched
        s[1:3] = b
        p = a * 1
        p[0, 2] = 7.25
        p[3] = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.5])
        q = a * 1
        q[:, 4] = 0
        return {"secret": s, "public": p, "zeroed": q, "original": a}

    got = secure_eval(fn, x, y)
    xs = x.clone()
    xs[1:3] = y
    xp = x.clone()
    xp[0, 2] = 7.25
    xp[3] = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.5])
    xq = x.clone()
    xq[:, 4] = 0
    assert_close(got["secret"], xs, TRUNC_ATOL, "setitem secret")
    assert_close(got["public"], xp, TRUNC_ATOL, "setitem public")
    assert_close(got["zeroed"], xq, TRUNC_ATOL, "setitem zero")
    assert_close(got["original"], x, EXACT, "setitem on a copy leaves the original")


@FAST
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**16))
def test_cat_and_stack_property(n: int, width: int, seed: int) -> None:
    xs = [randn(seed + i, 2, width) for i in range(n)]

    def fn(*secrets: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {"cat": veil.cat(list(secrets), dim=1), "stack": veil.stack(list(secrets))}

    got = secure_eval(fn, *xs)
    assert max_abs_err(got["cat"], torch.cat(xs, 1)) == 0.0
    assert max_abs_err(got["stack"], torch.stack(xs)) == 0.0


def test_results_keep_the_input_dtype_and_default_to_float32() -> None:
    def prog(session: veil.Session) -> list[torch.dtype]:
        mine = session.party == "alice"
        a = session.share(torch.ones(2, dtype=torch.float64) if mine else None, owner="alice")
        b = session.share(torch.ones(2, dtype=torch.int64) if mine else None, owner="alice")
        out = [a.reveal(to="alice"), (a * a).reveal(to="alice"), b.reveal(to="alice")]
        return [t.dtype for t in out if t is not None]

    res = run_local(prog)
    assert res["alice"] == [torch.float64, torch.float64, torch.float32]
    assert res["bob"] == []


def test_precision_is_a_session_option() -> None:
    x = randn(90, 50, scale=3)

    def prog(session: veil.Session) -> dict[str, object]:
        s20 = session.replace(precision=20)
        mine = session.party == "alice"
        a = s20.share(x if mine else None, owner="alice")
        b = session.share(x if mine else None, owner="alice")
        return {"frac": (s20.fixed_point.frac_bits, session.fixed_point.frac_bits),
                "a2": (a * a).reveal(to="alice"), "b2": (b * b).reveal(to="alice")}

    out = run_local(prog)["alice"]
    assert out["frac"] == (20, 16)
    exact = quantize(x, 20) ** 2
    assert_close(out["a2"], exact, 2.0**-20, "square at 20 fractional bits")
    assert max_abs_err(out["a2"], x * x) < max_abs_err(out["b2"], x * x)


def test_interactive_operations_on_views_scalars_and_empty_tensors() -> None:
    """Openings of transposed, expanded and sliced views (non-contiguous shares), 0-d and empty secrets."""
    m = randn(100, 4, 5, scale=3)
    s = quantize(torch.tensor(2.5))
    e = torch.zeros(0, 3, dtype=torch.float64)

    def fn(a: veil.SecretTensor, b: veil.SecretTensor, c: veil.SecretTensor) -> dict[str, veil.SecretTensor]:
        return {"t_mul": a.t() * a.t(), "expand_mul": a[:, :1].expand(4, 5) * a, "t_matmul": a.t() @ a,
                "slice_matmul": a[:, ::2].t() @ a[:, ::2], "t_square": a.t().square(), "t_reveal": a.t(),
                "expand_reveal": a[:, :1].expand(4, 5), "t_relu": a.t().relu(),
                "expand_eq": a[:1].expand(4, 5) == a, "scalar_mul": b * b, "scalar_relu": (-b).relu(),
                "scalar_lt": b < 3, "empty_mul": c * c, "empty_relu": c.relu(),
                "empty_matmul": c @ torch.ones(3, 2, dtype=torch.float64), "empty_sum": c.sum()}

    got = secure_eval(fn, m, s, e)
    want = {"t_mul": m.t() * m.t(), "expand_mul": m[:, :1].expand(4, 5) * m, "t_matmul": m.t() @ m,
            "slice_matmul": m[:, ::2].t() @ m[:, ::2], "t_square": m.t() ** 2, "t_reveal": m.t(),
            "expand_reveal": m[:, :1].expand(4, 5), "t_relu": torch.relu(m.t()),
            "expand_eq": (m[:1].expand(4, 5) == m).double(), "scalar_mul": s * s,
            "scalar_relu": torch.tensor(0.0), "scalar_lt": torch.tensor(1.0), "empty_mul": e, "empty_relu": e,
            "empty_matmul": torch.zeros(0, 2), "empty_sum": torch.tensor(0.0)}
    for name, w in want.items():
        assert_close(got[name], w.double(), TRUNC_ATOL, name)


def test_pow_takes_one_round_per_bit_of_the_exponent() -> None:
    def prog(session: veil.Session) -> dict[int, int]:
        a = session.share(torch.full((4,), 1.1) if session.party == "alice" else None, owner="alice")
        rounds = {}
        for k in (2, 5, 13):
            with session.measure() as m:
                a**k
            rounds[k] = m["rounds"]
        return rounds

    for rounds in run_local(prog).values():
        # one round per bit after the lowest set one, plus the final product: never more than floor(log2 k) + 1
        assert rounds == {2: 1, 5: 3, 13: 4}, rounds


# ---- small public factors, PyTorch idioms -----------------------------------------------------------
def test_a_mean_and_a_division_by_a_large_public_number_keep_full_precision() -> None:
    # 1/n at 16 fractional bits alone is n 2^-17 off, relatively (7% for n = 10,000): small factors get
    # as many significant bits as 1 has
    x = torch.full((100, 100), 3.0, dtype=torch.float64)
    out = secure_eval(lambda a: {"mean": a.mean(), "rows": a.mean(1), "div": a / 1000.0, "mul": a * 1e-3,
                                 "pool": a.reshape(1, 1, 100, 100).avg_pool2d(10)}, x)
    assert_close(out["mean"], torch.tensor(3.0, dtype=torch.float64), 2 * ULP, "mean of 10,000")
    assert_close(out["rows"], torch.full((100,), 3.0, dtype=torch.float64), 2 * ULP, "mean over rows")
    assert_close(out["div"], torch.full((100, 100), 0.003, dtype=torch.float64), 2 * ULP, "x / 1000")
    assert_close(out["mul"], torch.full((100, 100), 0.003, dtype=torch.float64), 2 * ULP, "x * 1e-3")
    assert_close(out["pool"], torch.full((1, 1, 10, 10), 3.0, dtype=torch.float64), 2 * ULP, "avg_pool2d(10)")


def test_pytorch_idioms_behave_as_in_pytorch() -> None:
    import numpy as np

    x = torch.tensor([[0.0, -2.0, 3.0], [1.0, 4.0, 0.5]], dtype=torch.float64)

    def fn(a: veil.SecretTensor) -> dict[str, object]:
        best = a.max(dim=1)
        scalar = a[0, 2].max(dim=0)
        return {"numpy_left": np.float64(2.0) * a, "numpy_array_left": np.array([1.0, 2.0, 3.0]) + a,
                "rdiv": 2.0 / a[:, 1:].abs(), "values": best.values, "indices": best.indices,
                "scalar": (scalar.values, scalar.indices), "sign": a.sign(),
                "sum_keepdim": a.sum(dim=None, keepdim=True),
                "conv_unbatched": a.reshape(1, 2, 3).conv2d(torch.full((2, 1, 1, 1), 0.5)),
                "softmax_0d": a[1, 1].softmax(0)}

    out = secure_eval(fn, x)
    assert_close(out["numpy_left"], 2 * x, EXACT, "np.float64 * x")
    assert_close(out["numpy_array_left"], x + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), EXACT, "array + x")
    assert_close(out["rdiv"], 2.0 / x[:, 1:].abs(), 1e-3 * 4, "2 / x")
    assert torch.equal(out["values"], x.max(dim=1).values)
    assert torch.equal(out["indices"], x.max(dim=1).indices.double())
    assert out["scalar"][0].shape == () and float(out["scalar"][0]) == 3.0 and float(out["scalar"][1]) == 0.0
    assert torch.equal(out["sign"], x.sign())  # 0 at 0
    assert out["sum_keepdim"].shape == (1, 1) and float(out["sum_keepdim"]) == float(x.sum())
    want = F.conv2d(x.reshape(1, 2, 3), torch.full((2, 1, 1, 1), 0.5, dtype=torch.float64))
    assert_close(out["conv_unbatched"], want, TRUNC_ATOL, "conv2d on (C, H, W)")
    assert out["softmax_0d"].shape == () and abs(float(out["softmax_0d"]) - 1.0) < 1e-3


def test_bad_reductions_and_convolutions_fail_at_once_with_their_shapes() -> None:
    def fn(a: veil.SecretTensor, w: veil.SecretTensor) -> list[str]:
        errors = []
        for call in (lambda: a[:0].max(), lambda: a.conv2d(w)):
            try:
                call()
            except ValueError as e:
                errors.append(str(e))
        return errors

    errors = secure_eval(fn, torch.ones(1, 3, 5, 5), torch.ones(2, 4, 3, 3))
    assert errors[0] == "max of an empty SecretTensor (shape (0, 3, 5, 5))"
    assert errors[1].startswith("conv2d: input (1, 3, 5, 5) and weight (2, 4, 3, 3) do not fit with groups=1")
