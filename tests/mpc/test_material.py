"""The dealer's recipes (veil.mpc.material): what the two parties receive reconstructs to correct
correlated randomness. Runs the real dealer and clients over the in-process transport and
recombines the parties' shares here, in the test (which no party ever does)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from mpc_testing import run_parties

import veil
from veil.mpc import circuits

N = 257


def msb_table(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Last step of msb: mask bits (alpha, beta, gamma); entry k = opened (v ^ beta, w ^ gamma);
    the table holds alpha ^ (v & w)."""
    alpha, beta, gamma = m & 1, (m >> 1) & 1, (m >> 2) & 1
    return alpha ^ (((k & 1) ^ beta) & (((k >> 1) & 1) ^ gamma))


def eq_table(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Last step of eqz: mask bits (beta, gamma); the table holds v & w."""
    return ((k & 1) ^ (m & 1)) & (((k >> 1) & 1) ^ ((m >> 1) & 1))


def _plain(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _take_all(session: veil.Session) -> dict[str, Any]:
    take = session.dealer.take
    out = {}
    requests: dict[str, dict[str, Any]] = {
        "mul": dict(name="triple", op="mul", shape_x=[3, 5], shape_y=[1, 5], shape_z=[3, 5], kwargs={}),
        "matmul": dict(name="triple", op="matmul", shape_x=[4, 6], shape_y=[6, 3], shape_z=[4, 3], kwargs={}),
        "conv2d": dict(name="triple", op="conv2d", shape_x=[1, 2, 5, 5], shape_y=[3, 2, 3, 3],
                       shape_z=[1, 3, 3, 3], kwargs={"stride": 1, "padding": 0}),
        "square": dict(name="square", n=N),
        "msb": dict(name="msb", n=N, ys=2),
        "eqz": dict(name="eqz", n=N, ys=1),
    }
    for key, params in requests.items():
        params = dict(params)
        mat = take(params.pop("name"), **params)
        fields = {"triple": ["a", "b", "c"], "square": ["a", "a2"]}.get(
            requests[key]["name"], ["r", "r_bin", "mono", "triples", "m", "t", "masks"])
        out[key] = {f: _plain(mat[f]) for f in fields}
    return out


@pytest.fixture(scope="module")
def shares() -> dict[str, Any]:
    run = run_parties(_take_all)
    assert not run.errors, run.errors
    assert run.results["dealer"] == 6
    return run.results


@pytest.mark.parametrize("op", ["mul", "matmul", "conv2d"])
def test_beaver_triples_reconstruct(shares: dict[str, Any], op: str) -> None:
    s0, s1 = shares["alice"][op], shares["bob"][op]
    a, b, c = (s0[k] + s1[k] for k in ("a", "b", "c"))
    ops: dict[str, Callable[..., torch.Tensor]] = {"mul": torch.mul, "matmul": torch.matmul,
                                                   "conv2d": F.conv2d}
    fn = ops[op]
    assert torch.equal(c, fn(a, b)), f"{op}: c != op(a, b) in Z_2^64"
    # each party's shares alone look nothing like the secret values
    assert not torch.equal(s0["a"], a) and not torch.equal(s1["a"], a)


def test_square_pairs_reconstruct(shares: dict[str, Any]) -> None:
    s0, s1 = shares["alice"]["square"], shares["bob"]["square"]
    a = s0["a"] + s1["a"]
    assert torch.equal(s0["a2"] + s1["a2"], a * a)


@pytest.mark.parametrize("kind", ["msb", "eqz"])
def test_comparison_material_reconstructs(shares: dict[str, Any], kind: str) -> None:
    s0, s1 = shares["alice"][kind], shares["bob"][kind]
    r = s0["r"] + s1["r"]
    assert torch.equal(s0["r_bin"] ^ s1["r_bin"], r), "XOR shares of r's bits"
    source = r & circuits.MASK63 if kind == "msb" else r
    assert torch.equal(s0["mono"] ^ s1["mono"], circuits.monomial_words(source)), "monomials of r's groups"
    # AND triples of the three tree levels, products packed in one word
    levels0, levels1 = s0["triples"]["levels"], s1["triples"]["levels"]
    word = torch.zeros(N, dtype=torch.int64)
    for lvl, (s, (a0, b10, b20), (a1, b11, b21)) in enumerate(zip(circuits.LEVEL_SPACINGS, levels0, levels1)):
        mask = circuits.PAIR_MASKS[s]
        a, b1 = a0 ^ a1, b10 ^ b11
        assert int(((a | b1) & ~mask).abs().sum()) == 0, "level masks stay on their node positions"
        word |= (a & b1) << (2 * lvl)
        if kind == "msb":
            word |= (a & (b20 ^ b21)) << (2 * lvl + 1)
        else:
            assert b20 is None and b21 is None
    assert torch.equal(s0["triples"]["c"] ^ s1["triples"]["c"], word)
    # truth table of the last step, and the masked products with the multiplicands
    m = s0["m"] ^ s1["m"]
    bits = 3 if kind == "msb" else 2
    assert int(m.max()) < 2**bits and int(m.min()) >= 0
    fn = msb_table if kind == "msb" else eq_table
    table = s0["t"] + s1["t"]
    assert torch.equal(table, fn(torch.arange(4)[None, :], m[:, None]))
    assert set(table.unique().tolist()) <= {0, 1}
    assert len(s0["masks"]) == (2 if kind == "msb" else 1)
    for (a0, at0), (a1, at1) in zip(s0["masks"], s1["masks"]):
        a = a0 + a1
        assert torch.equal(at0 + at1, a[:, None] * table)

