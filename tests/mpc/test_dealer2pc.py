"""Costs of the 2-party protocol with a dealer: rounds and bytes (veil.mpc.dealer2pc, nonlinear).

Bytes are what ``session.measure()`` reports with the other compute party: payload sent plus
received, frame headers included. Payload costs are the protocol's (``dealer2pc`` table: a Beaver
product opens 8 bytes per element of each factor); headers are allowed ``HEADER_SLACK_PER_ROUND``.
Round bounds are the documented ones (upper bounds: fewer is fine, except where one is the least
possible).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from mpc_testing import randn, run_local

import veil
from veil.net.transport import HEADER

N = 1000
HEADER_SLACK_PER_ROUND = 4 * HEADER.size  # one frame each way is 2 headers; allow twice that
MUL_BYTES_PER_ELEMENT = 32  # sent + received: (x - a) and (y - b), 8 bytes each, each way
MSB_BYTES_SENT_PER_ELEMENT = 41  # dealer2pc table, "msb ... ~41n"
EQZ_BYTES_SENT_PER_ELEMENT = 33  # dealer2pc table, "eqz ... ~33n"
COMPARE_ROUNDS = 5
MAXPOOL_2X2_ROUNDS = 16  # the engine's budget; the nonlinear table gives 5 ceil(log2 4) = 10
SOFTMAX_10_ROUNDS = 40


def max_rounds(k: int) -> int:
    """Max over k elements of a small batch (veil.mpc.nonlinear table): pairwise for 5 <= k <= 16,
    else a tournament."""
    if 5 <= k <= 16:
        return 5 + math.ceil(math.log2(k - 1)) + 1
    return 5 * math.ceil(math.log2(k)) if k > 1 else 0


def _costs(session: veil.Session, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, Any]]:
    mine = session.party == "alice"
    out: dict[str, dict[str, Any]] = {}

    def cost(name: str, fn: Any) -> Any:
        with session.measure() as m:
            r = fn()
        out[name] = m
        return r

    a = cost("share", lambda: session.share(x if mine else None, owner="alice"))
    b = cost("share_bob", lambda: session.share(y if not mine else None, owner="bob"))
    small = a[:10]
    cost("add", lambda: a + b - 3.5)
    cost("mul_public", lambda: a * 0.25 * 3)
    cost("sum_reshape", lambda: a.sum() + a.reshape(10, -1)[0].sum())
    cost("mul", lambda: a * b)
    cost("square", lambda: a.square())
    cost("products", lambda: session.protocol.products([a.share, b.share], [(0, 0), (0, 1), (1, 1), (1, 0)]))
    cost("matmul", lambda: a.reshape(20, 50) @ b.reshape(50, 20))
    for name, fn in {"lt": lambda: a < b, "gt": lambda: a > b, "le": lambda: a <= b, "ge": lambda: a >= 0,
                     "relu": lambda: a.relu(), "abs": lambda: a.abs(), "sign": lambda: a.sign(),
                     "relu_small": lambda: small.relu()}.items():
        cost(name, fn)
    for name, fn in {"eq": lambda: a == b, "ne": lambda: a != b, "eq_small": lambda: small == 1.0}.items():
        cost(name, fn)
    c = a < b
    cost("where_secret", lambda: a.where(c, b))
    cost("where_public", lambda: a.where(x > 0, b))
    for k in (2, 3, 4, 5, 8, 10, 16):
        cost(f"max{k}", lambda k=k: a[: 50 * k].reshape(50, k).max(-1))
        cost(f"amax{k}", lambda k=k: a[: 50 * k].reshape(50, k).amax(-1))
    cost("argmax_one_hot10", lambda: a[:500].reshape(50, 10).argmax(-1, one_hot=True))
    cost("maxpool2x2", lambda: a[:1000].reshape(1, 10, 10, 10).max_pool2d(2))
    cost("maxpool3x3", lambda: a[:1000].reshape(1, 10, 10, 10).max_pool2d(3, 1, 1))
    cost("avgpool2x2", lambda: a[:1000].reshape(1, 10, 10, 10).avg_pool2d(2))
    cost("softmax10", lambda: a[:500].reshape(50, 10).softmax(-1))
    cost("reveal_both", lambda: a.reveal(to=["alice", "bob"]))
    cost("reveal_alice", lambda: a.reveal(to="alice"))
    return out


@pytest.fixture(scope="module")
def costs() -> dict[str, dict[str, dict[str, Any]]]:
    return run_local(_costs, randn(1, N), randn(2, N))


PARTIES = ["alice", "bob"]


@pytest.mark.parametrize("party", PARTIES)
def test_local_operations_are_free(costs: dict[str, Any], party: str) -> None:
    for name in ("add", "mul_public", "sum_reshape", "where_public", "avgpool2x2"):
        m = costs[party][name]
        assert m["rounds"] == 0 and m["bytes_with_peer"] == 0 and m["bytes_with_dealer"] == 0, (name, m)


@pytest.mark.parametrize("party", PARTIES)
def test_sharing_costs_no_round_and_a_header_only(costs: dict[str, Any], party: str) -> None:
    for name in ("share", "share_bob"):
        m = costs[party][name]
        assert m["rounds"] == 0, (name, m)
        assert 0 < m["bytes_with_peer"] <= 128, f"{name}: {m['bytes_with_peer']} bytes for {N} elements"
        assert m["bytes_with_dealer"] == 0


@pytest.mark.parametrize("party", PARTIES)
def test_mul_is_one_round_of_32_bytes_per_element(costs: dict[str, Any], party: str) -> None:
    m = costs[party]["mul"]
    assert m["rounds"] == 1
    payload = MUL_BYTES_PER_ELEMENT * N
    assert payload <= m["bytes_with_peer"] <= payload + HEADER_SLACK_PER_ROUND
    assert m["bytes_with_dealer"] > 0


@pytest.mark.parametrize("party", PARTIES)
def test_square_and_matmul_open_only_their_operands(costs: dict[str, Any], party: str) -> None:
    sq, mm = costs[party]["square"], costs[party]["matmul"]
    assert sq["rounds"] == 1 and 16 * N <= sq["bytes_with_peer"] <= 16 * N + HEADER_SLACK_PER_ROUND
    # (20 x 50) @ (50 x 20): both factors opened, 1000 elements each
    assert mm["rounds"] == 1 and 32 * N <= mm["bytes_with_peer"] <= 32 * N + HEADER_SLACK_PER_ROUND


@pytest.mark.parametrize("party", PARTIES)
def test_products_open_each_factor_once_however_many_pairs_use_it(costs: dict[str, Any], party: str) -> None:
    m = costs[party]["products"]  # x^2, xy, y^2, yx: two factors, 8 bytes per element each way each
    assert m["rounds"] == 1 and 32 * N <= m["bytes_with_peer"] <= 32 * N + HEADER_SLACK_PER_ROUND


@pytest.mark.parametrize("party", PARTIES)
@pytest.mark.parametrize("name, per_element", [
    *[(name, MSB_BYTES_SENT_PER_ELEMENT) for name in ("lt", "gt", "le", "ge", "relu", "abs", "sign")],
    *[(name, EQZ_BYTES_SENT_PER_ELEMENT) for name in ("eq", "ne")]])
def test_comparisons_take_five_rounds(costs: dict[str, Any], party: str, name: str, per_element: int) -> None:
    m = costs[party][name]
    assert 0 < m["rounds"] <= COMPARE_ROUNDS, (name, m)
    budget = 2 * per_element * N + m["rounds"] * HEADER_SLACK_PER_ROUND
    got = m["bytes_with_peer"]
    assert 0 < got <= budget, f"{name}: {got} bytes > {budget} for {N} elements"
    assert m["bytes_with_dealer"] > 0


@pytest.mark.parametrize("party", PARTIES)
def test_rounds_do_not_depend_on_the_number_of_elements(costs: dict[str, Any], party: str) -> None:
    assert costs[party]["relu_small"]["rounds"] == costs[party]["relu"]["rounds"]
    assert costs[party]["eq_small"]["rounds"] == costs[party]["eq"]["rounds"]


@pytest.mark.parametrize("party", PARTIES)
def test_where_with_a_secret_condition_is_one_round(costs: dict[str, Any], party: str) -> None:
    assert costs[party]["where_secret"]["rounds"] == 1


@pytest.mark.parametrize("party", PARTIES)
@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 10, 16])
def test_max_round_counts(costs: dict[str, Any], party: str, k: int) -> None:
    assert costs[party][f"max{k}"]["rounds"] == max_rounds(k)
    assert costs[party][f"amax{k}"]["rounds"] == max_rounds(k)


@pytest.mark.parametrize("party", PARTIES)
def test_pooling_argmax_and_softmax_round_budgets(costs: dict[str, Any], party: str) -> None:
    c = costs[party]
    assert 0 < c["maxpool2x2"]["rounds"] <= MAXPOOL_2X2_ROUNDS
    assert 0 < c["maxpool2x2"]["rounds"] <= max_rounds(4)
    assert 0 < c["maxpool3x3"]["rounds"] <= max_rounds(9)
    assert 0 < c["argmax_one_hot10"]["rounds"] <= max_rounds(10) + COMPARE_ROUNDS
    assert 0 < c["softmax10"]["rounds"] <= SOFTMAX_10_ROUNDS


def test_reveal_is_one_round_of_8_bytes_per_element_each_way(costs: dict[str, Any]) -> None:
    for party in PARTIES:
        m = costs[party]["reveal_both"]
        assert m["rounds"] == 1
        assert 16 * N <= m["bytes_with_peer"] <= 16 * N + HEADER_SLACK_PER_ROUND
        assert m["bytes_with_dealer"] == 0
    # to alice only: bob sends his share, alice sends nothing
    for party in PARTIES:
        m = costs[party]["reveal_alice"]
        assert m["rounds"] == 1
        assert 8 * N <= m["bytes_with_peer"] <= 8 * N + HEADER_SLACK_PER_ROUND


def test_both_parties_count_the_same_rounds(costs: dict[str, Any]) -> None:
    for name in costs["alice"]:
        assert costs["alice"][name]["rounds"] == costs["bob"][name]["rounds"], name
        assert costs["alice"][name]["bytes_with_peer"] == costs["bob"][name]["bytes_with_peer"], name


# ---- comparisons on many elements run in chunks --------------------------------------------------
def _chunked_comparisons(session: veil.Session, x: torch.Tensor) -> dict[str, Any]:
    s = session.share(x if session.party == "alice" else None, owner="alice")
    with session.measure() as m:
        r = s.relu()
    with session.measure() as e:
        z = s == 0.0
    return {"relu": r.reveal(to=["alice", "bob"]), "eq": z.reveal(to=["alice", "bob"]),
            "relu_rounds": m["rounds"], "eq_rounds": e["rounds"]}


def test_large_comparisons_run_in_equal_chunks_with_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    from veil.mpc import compare2pc

    monkeypatch.setattr(compare2pc, "CHUNK_ELEMENTS", 1000)
    x = randn(40, 2, 1250, scale=4.0)  # 2,500 elements: 3 chunks of 834/834/832
    x[0, :7] = 0.0
    out = run_local(_chunked_comparisons, x)["alice"]
    assert torch.equal(out["relu"], x.relu())
    assert torch.equal(out["eq"], (x == 0).double())
    assert out["relu_rounds"] == out["eq_rounds"] == 3 * 5


def _row_max_rounds(session: veil.Session, x: torch.Tensor) -> int:
    s = session.share(x if session.party == "alice" else None, owner="alice")
    with session.measure() as m:
        s.amax(-1)
    return int(m["rounds"])


@pytest.mark.parametrize(("rows", "rounds"), [(64, 5 + 4 + 1), (5000, 5 * 4)])
def test_rows_of_ten_take_the_pairwise_max_when_small_and_the_tournament_when_large(rows: int, rounds: int) -> None:
    assert run_local(_row_max_rounds, randn(41, rows, 10))["alice"] == rounds


def test_products_of_shared_factors_are_the_exact_ring_products() -> None:
    x, y = randn(3, 4, 25, scale=8), randn(4, 4, 25, scale=8)
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 1)]

    def program(session: veil.Session) -> Any:
        a = session.share(x if session.party == "alice" else None, owner="alice")
        b = session.share(y if session.party == "bob" else None, owner="bob")
        zs = session.protocol.products([a.share, b.share], pairs)
        return [session.protocol.reveal(z, ["alice"]) for z in zs]

    got = run_local(program)["alice"]
    fp = veil.FixedPoint(16)
    ring = [fp.encode(x), fp.encode(y)]
    for (i, j), z in zip(pairs, got):
        assert z.shape == x.shape and torch.equal(z, ring[i] * ring[j]), (i, j)  # not truncated: exact


def test_products_refuse_factors_of_different_shapes() -> None:
    def program(session: veil.Session) -> Any:
        a = session.share(torch.ones(4) if session.party == "alice" else None, owner="alice")
        b = session.share(torch.ones(5) if session.party == "alice" else None, owner="alice")
        with pytest.raises(ValueError, match="values must have one shape"):
            session.protocol.products([a.share, b.share], [(0, 1)])
        return True

    assert run_local(program) == {"alice": True, "bob": True}
