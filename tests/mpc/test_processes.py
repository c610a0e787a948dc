"""The same computations across real OS processes over mutual TLS (``transport="tcp"``).

Programs are module-level functions: the launcher's 'spawn' children import this module by name.
Each result is checked against plaintext PyTorch with the in-process tests' bounds, and against the
in-process run of the same program.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from mpc_testing import ULP, randn, run_local

import veil

TRUNC_ATOL = ULP  # one truncated product (see test_tensor.py)
SOFTMAX_ABS = 2e-3  # veil.mpc.approx table
DEATH_DEADLINE_S = 30.0
LAUNCH_TIMEOUT_S = 60.0
TENSORS_RETURNED = 16


def _inputs() -> dict[str, torch.Tensor]:
    return {"x": randn(1, 4, 6, scale=3), "y": randn(2, 4, 6, scale=3), "w": randn(3, 6, 5),
            "img": randn(4, 1, 2, 6, 6, scale=4), "logits": randn(5, 8, 10, scale=3)}


def ops_program(session: veil.Session, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    mine = session.party == "alice"
    x = session.share(data["x"] if mine else None, owner="alice")
    y = session.share(None if mine else data["y"], owner="bob")
    w = session.share(None if mine else data["w"], owner="bob")
    img = session.share(data["img"] if mine else None, owner="alice")
    logits = session.share(data["logits"] if mine else None, owner="alice")
    out = {"mul": x * y, "relu": x.relu(), "matmul": x @ w, "softmax": logits.softmax(-1),
           "max_pool2d": img.max_pool2d(2), "max_pool2d_3": img.max_pool2d(3, 1, 1)}
    with session.measure() as m:
        z = x * y
    # numpy arrays: torch tensors do not survive the trip back to the launcher (see
    # test_a_program_may_return_tensors_over_tcp)
    revealed = {k: _numpy(v.reveal(to=["alice", "bob"])) for k, v in out.items()}
    return {"values": revealed, "z": _numpy(z.reveal(to="alice")), "pid": os.getpid(), "mul_cost": m}


def _numpy(t: torch.Tensor | None) -> Any:
    return None if t is None else t.numpy()


def tensor_program(session: veil.Session) -> list[torch.Tensor]:
    x = session.share(torch.arange(3.0) if session.party == "alice" else None, owner="alice")
    opened = x.reveal(to=["alice", "bob"])
    assert opened is not None
    return [opened + i for i in range(TENSORS_RETURNED)]


def dying_program(session: veil.Session, data: dict[str, torch.Tensor]) -> None:
    mine = session.party == "alice"
    x = session.share(data["x"] if mine else None, owner="alice")
    y = x * x
    y = y.relu()
    if session.party == "bob":
        os.kill(os.getpid(), signal.SIGKILL)
    for _ in range(10):
        y = (y * x).relu()
    y.reveal(to="alice")


def _references(d: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, float]]:
    return {"mul": (d["x"] * d["y"], TRUNC_ATOL), "relu": (torch.relu(d["x"]), 0.0),
            "matmul": (d["x"] @ d["w"], TRUNC_ATOL),
            "softmax": (torch.softmax(d["logits"], -1), SOFTMAX_ABS),
            "max_pool2d": (F.max_pool2d(d["img"], 2), 0.0),
            "max_pool2d_3": (F.max_pool2d(d["img"], 3, 1, 1), 0.0)}


@pytest.fixture(scope="module")
def both_runs() -> dict[str, dict[str, Any]]:
    data = _inputs()
    tcp = veil.launch(ops_program, data, transport="tcp", timeout=LAUNCH_TIMEOUT_S)
    local = run_local(ops_program, data)
    return {"tcp": tcp, "local": local}


def test_parties_ran_in_their_own_processes(both_runs: dict[str, Any]) -> None:
    pids = {both_runs["tcp"][p]["pid"] for p in ("alice", "bob")}
    assert len(pids) == 2 and os.getpid() not in pids
    assert {both_runs["local"][p]["pid"] for p in ("alice", "bob")} == {os.getpid()}


@pytest.mark.parametrize("transport", ["tcp", "local"])
@pytest.mark.parametrize("op", ["mul", "relu", "matmul", "softmax", "max_pool2d", "max_pool2d_3"])
def test_results_match_plaintext(both_runs: dict[str, Any], transport: str, op: str) -> None:
    want, atol = _references(_inputs())[op]
    for party in ("alice", "bob"):
        got = torch.as_tensor(both_runs[transport][party]["values"][op]).double()
        err = float((got - want).abs().max())
        assert err <= atol, f"{op} over {transport} ({party}): error {err:.3e} > {atol:.1e}"


@pytest.mark.parametrize("op", ["mul", "relu", "matmul", "softmax", "max_pool2d", "max_pool2d_3"])
def test_tcp_and_in_process_runs_agree(both_runs: dict[str, Any], op: str) -> None:
    _, atol = _references(_inputs())[op]
    a = torch.as_tensor(both_runs["tcp"]["alice"]["values"][op]).double()
    b = torch.as_tensor(both_runs["local"]["alice"]["values"][op]).double()
    assert float((a - b).abs().max()) <= 2 * atol


def test_reveal_to_one_party_and_costs_are_the_same_over_tcp(both_runs: dict[str, Any]) -> None:
    tcp, local = both_runs["tcp"], both_runs["local"]
    assert tcp["bob"]["z"] is None and tcp["alice"]["z"] is not None
    assert tcp["alice"]["mul_cost"]["rounds"] == local["alice"]["mul_cost"]["rounds"] == 1
    assert tcp["alice"]["mul_cost"]["bytes_with_peer"] == local["alice"]["mul_cost"]["bytes_with_peer"]


def test_a_program_may_return_tensors_over_tcp() -> None:
    """``reveal`` gives a torch tensor; returning it from the program must work over TCP as in-process."""
    out = veil.launch(tensor_program, transport="tcp", timeout=LAUNCH_TIMEOUT_S)
    for party in ("alice", "bob"):
        assert len(out[party]) == TENSORS_RETURNED
        assert all(torch.equal(t, torch.arange(3.0) + i) for i, t in enumerate(out[party]))


def test_a_party_killed_mid_computation_is_named_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(veil.PartyError) as info:
        veil.launch(dying_program, _inputs(), transport="tcp", timeout=LAUNCH_TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert elapsed < DEATH_DEADLINE_S, f"took {elapsed:.1f} s to report bob's death"
    message = str(info.value)
    assert message.startswith("party 'bob' died") and "SIGKILL" in message, message
