"""Truncation after a product: local (SecureML, probabilistic) and exact (one round, dealer-assisted).

Products of values near 2^12 sit near 2^56 in the ring before truncation, where local truncation
fails (a huge error) with probability about 2^56 / 2^64 = 1/256 per element: over 20,000 elements it
fails dozens of times. The exact protocol never does: its error stays within one unit (2^-16).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mpc_testing import run_local

import veil

N = 20_000


def _big_products(session: veil.Session, a: torch.Tensor, b: torch.Tensor) -> Any:
    sa = session.share(a if session.party == "alice" else None, owner="alice")
    sb = session.share(b if session.party == "bob" else None, owner="bob")
    with session.measure() as m:
        z = sa @ sb  # (N, 1) @ (1, 1): N products, truncated per the session's option
    return z.reveal(to=["alice", "bob"]), m["rounds"]


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    a = (torch.rand(N, 1, generator=g, dtype=torch.float64) * 2 - 1) * 4096
    return torch.round(a * 2**16) / 2**16, torch.tensor([[4000.25]], dtype=torch.float64)


@pytest.mark.parametrize("mode", ["local", "exact"])
def test_exact_truncation_never_fails_where_local_truncation_does(mode: str) -> None:
    a, b = _inputs()
    options = veil.SessionOptions(truncation=mode)
    got, rounds = run_local(_big_products, a, b, options=options)["alice"]
    err = (got - a @ b).abs()
    failures = int((err > 1.0).sum())
    if mode == "local":
        assert failures > 10, f"expected local truncation to fail here, got {failures} failures"
        assert rounds == 1
    else:
        assert failures == 0
        assert float(err.max()) <= 2.0**-16 * 2 + 1e-12
        assert rounds == 2  # the product's round and the truncation's


def test_exact_truncation_of_convolutions_and_of_both_backward_products_in_one_round() -> None:
    from veil.mpc.products import products

    def program(session: veil.Session, x: torch.Tensor, w: torch.Tensor) -> Any:
        sx = session.share(x if session.party == "alice" else None, owner="alice")
        sw = session.share(w if session.party == "bob" else None, owner="bob")
        with session.measure() as m:
            y, z = products([(sx, sw, "conv2d", {}), (sx.reshape(2, -1), sx.reshape(2, -1).t(), "matmul", {})])
        return y.reveal(to="alice"), z.reveal(to="alice"), m["rounds"]

    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64), torch.randn(3, 1, 3, 3, generator=g,
                                                                                 dtype=torch.float64)
    y, z, rounds = run_local(program, x, w, options=veil.SessionOptions(truncation="exact"))["alice"]
    assert float((y - torch.nn.functional.conv2d(x, w)).abs().max()) < 1e-3
    assert float((z - x.reshape(2, -1) @ x.reshape(2, -1).t()).abs().max()) < 1e-2
    assert rounds == 2


def test_truncation_option_is_checked() -> None:
    with pytest.raises(ValueError, match="truncation must be 'local' or 'exact'"):
        veil.SessionOptions(truncation="fast")


def _exp(session: veil.Session, x: torch.Tensor) -> Any:
    sx = session.share(x if session.party == "alice" else None, owner="alice")
    with session.measure() as m:
        y = sx.exp()
    return y.reveal(to="alice"), m["rounds"]


@pytest.mark.parametrize("mode", ["local", "exact"])
def test_exp_truncates_exactly_the_squarings_local_truncation_would_get_wrong(mode: str) -> None:
    # At 24 fractional bits exp squares values near 1 at 2 (24 + 3) = 54 bits, where a local
    # truncation would fail with probability ~2^-10 per squaring (20,000 elements x 9 squarings: often).
    # exp sees it from the precision and truncates those squarings exactly in either mode; at the
    # default 16 bits and x <= 5 they stay local (below 2^39: failure < 2^-25).
    g = torch.Generator().manual_seed(7)
    x = torch.round(-4 * torch.rand(N, generator=g, dtype=torch.float64) * 2**24) / 2**24
    options = veil.SessionOptions(truncation=mode).replace(precision=24)
    got, rounds = run_local(_exp, x, options=options)["alice"]
    assert int(((got - x.exp()).abs() > 1.0).sum()) == 0
    assert float((got - x.exp()).abs().max()) < 1e-3
    assert rounds == 18  # t^2 and the 8 squarings: one square and one truncation round each
    _, rounds16 = run_local(_exp, x, options=veil.SessionOptions(truncation=mode))["alice"]
    assert rounds16 == (18 if mode == "exact" else 12)  # local at 16 bits: e^5 and up are exact
