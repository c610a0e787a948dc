"""What a party, the dealer or the wire can see (veil.mpc: shares, reveal, dealer requests, repr).

- a party's share of a fixed secret is uniformly random (chi-square on its top and bottom bytes);
- no frame on any link carries a secret input's encoding, at any offset; the detector is shown to
  work on a deliberately leaky program;
- the dealer gets only small JSON requests from party 0, and nothing from party 1;
- ``reveal(to="alice")`` sends to alice only;
- a SecretTensor's repr shows its shape and owner, never values; it has no truth value.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from mpc_testing import PARTIES, RecordingHub, encodings, leaks, randn, run_local, run_parties, uniform

import veil
from veil.net.transport import HEADER

N_UNIFORM = 20_000
SOFTMAX_ABS = 2e-3  # veil.mpc.approx table
P_MIN = 1e-4
MAX_REQUEST_BYTES = 1024


def chi_square_p(values: torch.Tensor, bins: int = 256) -> float:
    """p-value of the chi-square goodness-of-fit test of ``values`` (ints in [0, bins)) to uniform."""
    counts = torch.bincount(values, minlength=bins).double()
    expected = values.numel() / bins
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = bins - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _top_byte(t: torch.Tensor) -> torch.Tensor:
    return (t >> 56) & 0xFF


def _bottom_byte(t: torch.Tensor) -> torch.Tensor:
    return t & 0xFF


def test_chi_square_helper_rejects_a_skewed_byte() -> None:
    g = torch.Generator().manual_seed(0)
    uniform_bytes = torch.randint(0, 256, (N_UNIFORM,), generator=g)
    assert chi_square_p(uniform_bytes) > P_MIN
    skewed = uniform_bytes.clone()
    skewed[: N_UNIFORM // 20] = 0  # 5% zeros
    assert chi_square_p(skewed) < P_MIN
    assert chi_square_p(_top_byte(torch.arange(N_UNIFORM, dtype=torch.int64))) < P_MIN


# ---- (a) shares are uniform ------------------------------------------------------------------
def _shares_of_constants(session: veil.Session) -> dict[str, torch.Tensor]:
    mine = session.party == "alice"
    zeros = session.share(torch.zeros(N_UNIFORM) if mine else None, owner="alice")
    const = session.share(None if mine else torch.full((N_UNIFORM,), 3.75), owner="bob")
    return {"zeros": zeros.share.clone(), "const": const.share.clone(),
            "relu_of_zeros": zeros.relu().share.clone()}


@pytest.fixture(scope="module")
def two_runs() -> list[dict[str, dict[str, torch.Tensor]]]:
    return [run_local(_shares_of_constants) for _ in range(2)]


@pytest.mark.parametrize("party", PARTIES)
@pytest.mark.parametrize("secret", ["zeros", "const", "relu_of_zeros"])
@pytest.mark.parametrize("byte", [_top_byte, _bottom_byte], ids=["top", "bottom"])
def test_a_share_of_a_constant_is_uniform(two_runs: list[Any], party: str, secret: str, byte: Any) -> None:
    share = two_runs[0][party][secret]
    assert share.numel() == N_UNIFORM
    p = chi_square_p(byte(share))
    assert p > P_MIN, f"{party}'s share of {secret}: chi-square p = {p:.2e} on the {byte.__name__}"


@pytest.mark.parametrize("secret", ["zeros", "const", "relu_of_zeros"])
def test_shares_sum_to_the_secret_and_change_every_run(two_runs: list[Any], secret: str) -> None:
    value = {"zeros": 0, "const": int(3.75 * 2**16), "relu_of_zeros": 0}[secret]
    for run in two_runs:
        assert torch.equal(run["alice"][secret] + run["bob"][secret], torch.full((N_UNIFORM,), value))
        assert len(set(run["alice"][secret].tolist())) == N_UNIFORM  # no two elements share a share
    for party in PARTIES:
        same = int((two_runs[0][party][secret] == two_runs[1][party][secret]).sum())
        assert same == 0, f"{party}'s shares of {secret} repeat across runs at {same} positions"


# ---- (b) nothing secret on the wire ----------------------------------------------------------
def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    # magnitudes in [0.5, 8], random fractions: encodings have no all-small bytes in common with masks
    g = torch.Generator().manual_seed(7)
    sign = torch.where(torch.rand(1, 2, 6, 6, generator=g) < 0.5, -1.0, 1.0).double()
    x = sign * uniform(8, 1, 2, 6, 6, lo=0.5, hi=8.0)
    return x, uniform(9, 1, 2, 6, 6, lo=0.5, hi=8.0)


def _mixed_computation(session: veil.Session, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    mine = session.party == "alice"
    a = session.share(x if mine else None, owner="alice")
    b = session.share(None if mine else y, owner="bob")
    z = (a * b).relu() + a.relu()
    pooled = z.max_pool2d(2)
    probs = pooled.reshape(2, 9).softmax(-1)
    return probs.reveal(to="alice")


def _leaky(session: veil.Session, x: torch.Tensor, y: torch.Tensor) -> None:
    """Sends alice's encoded input to bob in clear: what the detector must catch."""
    if session.party == "alice":
        session.transport.send("bob", session.fixed_point.encode(x[0, 0, 0]).numpy().tobytes())
    else:
        session.transport.recv("alice")


def test_no_frame_carries_a_secret_input() -> None:
    x, y = _inputs()
    run = run_parties(_mixed_computation, x, y)
    assert not run.errors, run.errors
    hub = run.hub
    assert isinstance(hub, RecordingHub)
    pooled = F.max_pool2d(torch.relu(x * y) + torch.relu(x), 2)
    want = torch.softmax(pooled.reshape(2, 9), -1)  # it did compute what it should
    assert run.results["bob"] is None
    assert float((run.results["alice"] - want).abs().max()) <= SOFTMAX_ABS
    links = {(f.sender, f.receiver) for f in hub.frames}
    assert {("alice", "bob"), ("bob", "alice"), ("dealer", "alice"), ("dealer", "bob")} <= links
    assert sum(len(f.data) for f in hub.frames) > 10_000
    assert leaks(hub.frames, encodings(x, y)) == []


def test_the_leak_detector_finds_a_leak() -> None:
    x, y = _inputs()
    run = run_parties(_leaky, x, y)
    assert not run.errors, run.errors
    found = leaks(run.hub.frames, encodings(x, y))  # type: ignore[attr-defined]
    assert found and all(s == "alice" and r == "bob" for s, r, _ in found)


def test_the_dealer_gets_small_json_requests_from_party_0_and_nothing_from_party_1() -> None:
    x, y = _inputs()
    run = run_parties(_mixed_computation, x, y)
    assert not run.errors
    hub = run.hub
    assert isinstance(hub, RecordingHub)
    assert hub.between("bob", "dealer") == []
    requests = hub.between("alice", "dealer")
    assert len(requests) >= 5

    def public_leaves(obj: Any) -> bool:  # names, shapes and counts: no float data
        if isinstance(obj, dict):
            return all(isinstance(k, str) and public_leaves(v) for k, v in obj.items())
        if isinstance(obj, list):
            return all(public_leaves(v) for v in obj)
        return obj is None or isinstance(obj, str | int | bool)

    for f in requests:
        assert len(f.payload) <= MAX_REQUEST_BYTES, f"a dealer request of {len(f.payload)} bytes"
        req = json.loads(f.payload)
        assert set(req) <= {"recipe", "params"} and public_leaves(req), req
    assert json.loads(requests[-1].payload) == {"recipe": None}
    assert run.results["dealer"] == len(requests) - 1


# ---- (c) reveal to one party -----------------------------------------------------------------
def _reveal_to_alice(session: veil.Session, x: torch.Tensor) -> dict[str, Any]:
    a = session.share(x if session.party == "alice" else None, owner="alice")
    b = a * 2
    before = session.stats.copy()
    value = b.reveal(to="alice")
    d = session.stats - before
    return {"value": value, "sent": d.bytes_sent, "received": d.bytes_received, "rounds": d.rounds}


def test_reveal_to_alice_sends_bobs_share_to_alice_only() -> None:
    x = randn(10, 50)
    hub = RecordingHub([*PARTIES, "dealer"])
    run = run_parties(_reveal_to_alice, x, hub=hub)
    assert not run.errors
    alice, bob = run.results["alice"], run.results["bob"]
    assert bob["value"] is None
    assert torch.equal(alice["value"], (2 * x).float())
    assert bob["received"] == {}, "bob must receive nothing when the value goes to alice"
    assert alice["sent"] == {}, "alice must send nothing when the value goes to her"
    assert set(bob["sent"]) == {"alice"} and bob["sent"]["alice"] == 8 * 50 + HEADER.size
    assert alice["received"] == {"bob": bob["sent"]["alice"]}
    assert alice["rounds"] == bob["rounds"] == 1
    # on the wire: the last frame between the two is bob's share, to alice
    last = [f for f in hub.frames if {f.sender, f.receiver} == {"alice", "bob"}][-1]
    assert (last.sender, last.receiver, len(last.payload)) == ("bob", "alice", 8 * 50)


# ---- (d, e) printing and truth values ----------------------------------------------------------
def _printing(session: veil.Session) -> dict[str, Any]:
    secret = torch.tensor([[12345.6789, -98765.4321, 31415.9265]])
    a = session.share(secret if session.party == "alice" else None, owner="alice")
    shown = [repr(a), str(a), f"{a}", repr([a]), repr(a + 1)]
    share_digits = [str(v) for v in a.share.flatten().tolist()]
    errors = []
    for attempt in (lambda: bool(a), lambda: bool(a < 0), lambda: not a, lambda: a and a,
                    lambda: 1 if a == a else 0):
        try:
            attempt()
        except TypeError as e:
            errors.append(str(e))
    return {"shown": shown, "share_digits": share_digits, "errors": errors}


def test_repr_shows_shape_and_owner_but_no_values() -> None:
    out = run_local(_printing)
    for party in PARTIES:
        shown = out[party]["shown"]
        for text in shown[:4]:
            assert "(1, 3)" in text and "'alice'" in text, text
        assert "(1, 3)" in shown[4] and "owner" not in shown[4], shown[4]
        for text in shown:
            for needle in ["12345", "98765", "31415", "1234", "9876", "3141", *out[party]["share_digits"]]:
                assert needle not in text, f"{text!r} shows {needle!r}"


def test_a_secret_tensor_has_no_truth_value() -> None:
    out = run_local(_printing)
    for party in PARTIES:
        errors = out[party]["errors"]
        assert len(errors) == 5, errors
        assert all("secret" in e and "reveal" in e for e in errors)

