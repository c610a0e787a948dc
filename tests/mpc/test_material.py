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


def msb_table(k: torch.Tensor, m: torch.Tensor, r63: torch.Tensor) -> torch.Tensor:
    """Last step of msb: mask bits (alpha, beta, gamma); entry k = opened (v ^ beta, w ^ gamma);
    the table holds alpha ^ r63 ^ (v & w) (the dealer folds r's top bit in)."""
    alpha, beta, gamma = m & 1, (m >> 1) & 1, (m >> 2) & 1
    return alpha ^ r63 ^ (((k & 1) ^ beta) & (((k >> 1) & 1) ^ gamma))


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
        "mask_products": dict(name="mask_products", n=N, values=3, pairs=[[0, 0], [0, 1], [2, 1]]),
    }
    for key, params in requests.items():
        params = dict(params)
        mat = take(params.pop("name"), **params)
        fields = {"triple": ["a", "b", "c"], "square": ["a", "a2"], "mask_products": ["masks", "products"]}.get(
            requests[key]["name"], ["r", "tree", "m", "t", "masks"])
        out[key] = {f: _plain(mat[f]) for f in fields}
    return out


@pytest.fixture(scope="module")
def shares() -> dict[str, Any]:
    run = run_parties(_take_all)
    assert not run.errors, run.errors
    assert run.results["dealer"] == 7
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


def test_mask_products_reconstruct_the_products_of_the_masks(shares: dict[str, Any]) -> None:
    s0, s1 = shares["alice"]["mask_products"], shares["bob"]["mask_products"]
    masks = [a + b for a, b in zip(s0["masks"], s1["masks"])]
    for (i, j), c0, c1 in zip([(0, 0), (0, 1), (2, 1)], s0["products"], s1["products"]):
        assert torch.equal(c0 + c1, masks[i] * masks[j]), f"c_{i}{j} != a_{i} a_{j} in Z_2^64"
    assert len({int(m[0]) for m in masks}) == 3  # one fresh mask per value


@pytest.mark.parametrize("kind", ["msb", "eqz"])
def test_comparison_material_reconstructs(shares: dict[str, Any], kind: str) -> None:
    s0, s1 = shares["alice"][kind], shares["bob"][kind]
    r = s0["r"] + s1["r"]
    t0, t1 = s0["tree"], s1["tree"]
    source = r & circuits.MASK63 if kind == "msb" else r
    assert torch.equal(t0["mono"] ^ t1["mono"], circuits.monomials(circuits.planes(source))), \
        "XOR shares of the monomials of r's planes"
    # AND triples of the three tree levels, products packed in two int16 words
    levels = []
    for s, l0, l1 in zip(circuits.LEVEL_SPACINGS, t0["levels"], t1["levels"]):
        trio = tuple(x ^ y for x, y in zip(l0, l1))
        mask = torch.tensor(circuits.PAIR_MASKS[s], dtype=torch.int16)
        for t in trio:
            assert int((t & ~mask).abs().sum()) == 0, "level masks stay on their node positions"
        assert len(trio) == (3 if kind == "msb" else 2)
        levels.append(trio)
    assert torch.equal(t0["products"] ^ t1["products"], circuits.pack_products(levels))
    # truth table of the last step, and the masked products with the multiplicands
    m = s0["m"] ^ s1["m"]
    bits = 3 if kind == "msb" else 2
    assert int(m.max()) < 2**bits and int(m.min()) >= 0
    table = s0["t"] + s1["t"]
    k = torch.arange(4)[None, :]
    want = msb_table(k, m[:, None], ((r >> 63) & 1)[:, None]) if kind == "msb" else eq_table(k, m[:, None])
    assert torch.equal(table, want)
    assert set(table.unique().tolist()) <= {0, 1}
    assert len(s0["masks"]) == (2 if kind == "msb" else 1)
    for (a0, at0), (a1, at1) in zip(s0["masks"], s1["masks"]):
        a = a0 + a1
        assert torch.equal(at0 + at1, a[:, None] * table)

