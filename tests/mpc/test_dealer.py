"""The dealer and how parties take its material (veil.mpc.dealer).

The dealer hands out seeds where it can and corrections where it must; it takes requests only from
party 0, only for registered recipes, and only with sane public parameters.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import torch
from mpc_testing import PARTIES, RecordingHub, randn, run_parties

import veil
from veil.mpc.dealer import RECIPES, serve
from veil.net.local import LocalHub
from veil.net.transport import HEADER, PartyError

MAX_REPLY_OVERHEAD = HEADER.size + 32  # frame header and the reply's own numbering
MAX_REQUEST_BYTES = 512
HEADERS = 4 * HEADER.size  # one opening: a frame each way


def _serve_requests(*requests: bytes) -> int:
    """Run the dealer on a hub where alice already sent ``requests``; return what serve returns."""
    hub = LocalHub([*PARTIES, "dealer"])
    alice = hub.transport("alice", timeout=5)
    for r in requests:
        alice.send("dealer", r)
    return serve(hub.transport("dealer", timeout=5), PARTIES)


def _request(recipe: str | None, **params: Any) -> bytes:
    return json.dumps({"recipe": recipe, "params": params}).encode()


def test_serve_answers_registered_recipes_until_told_to_stop() -> None:
    served = _serve_requests(_request("square", n=4), _request("msb", n=3, ys=1), _request(None))
    assert served == 2


def test_unknown_recipe_is_refused_by_name() -> None:
    with pytest.raises(PartyError) as info:
        _serve_requests(_request("give_me_the_inputs"))
    message = str(info.value)
    assert "give_me_the_inputs" in message
    for name in RECIPES:
        assert name in message  # the allowlist is shown


@pytest.mark.parametrize("n", [-1, 2**40, 3.5, "10"])
def test_insane_sizes_are_refused(n: object) -> None:
    with pytest.raises(PartyError, match=r"refused 'square' request with n="):
        _serve_requests(_request("square", n=n))


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"params": {}}',
                                 b'{"recipe": "square", "params": 3}'])
def test_malformed_requests_are_refused(raw: bytes) -> None:
    with pytest.raises(PartyError, match="malformed request"):
        _serve_requests(raw)


def _products(session: veil.Session, x: torch.Tensor, w: torch.Tensor) -> dict[str, Any]:
    a = session.share(x if session.party == "alice" else None, owner="alice")
    b = session.share(w if session.party == "bob" else None, owner="bob")
    with session.measure() as m_mul:
        a * a
    with session.measure() as m_matmul:
        a @ b
    return {"mul": m_mul, "matmul": m_matmul}


def test_dealer_sends_corrections_only_for_derived_values() -> None:
    """A triple's ``a`` and ``b`` are seeds: only ``c`` travels (8 bytes per element of ``c``, to one
    party or split between them), plus small per-message headers."""
    x, w = randn(1, 16, 64), randn(2, 64, 8)  # |x| = |x*x| = 1024, |w| = 512, |x @ w| = 128
    hub = RecordingHub([*PARTIES, "dealer"])
    run = run_parties(_products, x, w, hub=hub)
    assert not run.errors, run.errors
    keys = [hub.between("dealer", p)[0].payload for p in PARTIES]
    assert [len(k) for k in keys] == [16, 16] and keys[0] != keys[1]  # one PRG key each
    replies = [f for p in PARTIES for f in hub.between("dealer", p)[1:]]
    corrections = 8 * (1024 + 128)
    overhead = len(replies) * MAX_REPLY_OVERHEAD
    assert corrections <= sum(len(f.payload) for f in replies) <= corrections + overhead


def test_dealer_traffic_is_counted_apart_from_the_peer() -> None:
    x, w = randn(1, 16, 64), randn(2, 64, 8)
    costs = run_parties(_products, x, w).results
    for party in PARTIES:
        mul, matmul = costs[party]["mul"], costs[party]["matmul"]
        assert mul["bytes_with_dealer"] > 0 and matmul["bytes_with_dealer"] > 0
        # with the peer: exactly the openings (+ headers), whatever the dealer sent
        assert 32 * 1024 <= mul["bytes_with_peer"] <= 32 * 1024 + HEADERS
        assert 16 * (1024 + 512) <= matmul["bytes_with_peer"] <= 16 * (1024 + 512) + HEADERS
    # with the dealer: the corrections of c, the request and small headers
    for op, c in [("mul", 1024), ("matmul", 128)]:
        dealer = sum(costs[p][op]["bytes_with_dealer"] for p in PARTIES)
        assert 8 * c <= dealer <= 8 * c + MAX_REQUEST_BYTES + 8 * MAX_REPLY_OVERHEAD, (op, dealer)


def _loop_with_changing_requests(session: veil.Session) -> list[torch.Tensor | None]:
    """Repeated, alternating and changing requests: the dealer's guesses of the next request are
    right, wrong, and right again; every result must still be exact."""
    x = session.share(randn(3, 64) if session.party == "alice" else None, owner="alice")
    y = session.share(randn(4, 64) if session.party == "bob" else None, owner="bob")
    out = []
    for step in range(6):
        z = (x * y).relu() if step % 2 else (x - y).relu() * x
        if step == 3:
            z = z + (x[:32] < y[:32]).sum()  # a request the dealer has never seen
        out.append(z.reveal(to="alice"))
    return out


def test_the_dealers_guesses_never_change_results() -> None:
    got = veil.launch(_loop_with_changing_requests, transport="local")["alice"]
    x, y = randn(3, 64).double(), randn(4, 64).double()
    for step, z in enumerate(got):
        want = (x * y).relu() if step % 2 else (x - y).relu() * x
        if step == 3:
            want = want + (x[:32] < y[:32]).sum()
        assert float((z.double() - want).abs().max()) < 1e-3, f"step {step}"


def test_the_dealer_sends_nothing_before_it_is_asked() -> None:
    hub = RecordingHub([*PARTIES, "dealer"])
    served = run_parties(_loop_with_changing_requests, hub=hub)
    requests = [json.loads(f.payload) for f in hub.between("alice", "dealer")]
    assert served is not None and requests[-1]["recipe"] is None  # the last one says goodbye
    asked = len(requests) - 1
    numbers = [struct.unpack_from("<Q", f.payload)[0]
               for who in PARTIES for f in hub.between("dealer", who)[1:]]  # after the master key
    # Guesses prepared for a request that never came are never sent.
    assert numbers and max(numbers) == asked - 1


@pytest.mark.parametrize("shape", [[1 << 20, 1 << 20], [-1, 3], "3x3", [2.5]])
def test_the_dealer_refuses_absurd_triple_shapes(shape: Any) -> None:
    with pytest.raises(PartyError, match="refused 'triple' request"):
        _serve_requests(_request("triple", op="mul", shape_x=shape, shape_y=[1], shape_z=[1]))
