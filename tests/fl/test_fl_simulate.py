"""Federated runs in Flower's simulation engine, checked against centralised training.

With full-batch local steps (batch size >= the client's data, no momentum) FedAvg is exact: one
local step per round, weighted by client size, is one step of gradient descent on the union of the
clients' data. That makes FedAvg, secure aggregation and dropouts checkable to float precision.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("flwr")

from veil.fl import FLTask, ServerSettings, simulate
from veil.fl.task import build_model, client_indices, get_weights, load_task_data, set_weights

LR = 0.5


def _gd(weights, x, y, steps):
    model = build_model("digits-mlp")
    set_weights(model, weights)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return get_weights(model)


def _task(parts, **kw):
    return FLTask(model="digits-mlp", data="digits", batch_size=10_000, lr=LR, momentum=0.0,
                  **kw).with_partitions(parts)


def _init():
    torch.manual_seed(0)
    return get_weights(build_model("digits-mlp"))


def _close(a, b, tol):
    return max(float(np.abs(u - v).max()) for u, v in zip(a, b)) < tol


def _run(task, rounds, secure=False, init=None):
    return simulate(task, ServerSettings(rounds=rounds, secure=secure), initial_weights=init, progress=False)


def test_fedavg_of_identical_clients_equals_centralised_training(tmp_path):
    x, y, _, _ = load_task_data("digits")
    init = _init()
    task = _task([range(300)] * 3, local_epochs=2)
    result = _run(task, rounds=2, init=init)
    assert [r.clients for r in result.rounds] == [3, 3]
    assert _close(result.weights, _gd(init, x[:300], y[:300], steps=4), 1e-5)
    assert result.final_accuracy == pytest.approx(result.rounds[-1].accuracy)
    written = result.save(tmp_path / "summary.json", target=0.0)
    assert json.loads((tmp_path / "summary.json").read_text()) == written
    assert written["rounds_to_target"] == 1 and len(written["history"]) == 2


PARTS = [range(0, 100), range(100, 300), range(300, 600)]


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg+"])
def test_fedavg_of_unequal_clients_equals_gradient_descent_on_the_union(secure):
    x, y, _, _ = load_task_data("digits")
    init = _init()
    result = _run(_task(PARTS), rounds=3, secure=secure, init=init)
    expected = _gd(init, x[:600], y[:600], steps=3)
    # secure aggregation quantises (clipping range 8, 2^29 levels): well under 1e-4 after 3 rounds
    assert _close(result.weights, expected, 1e-4 if secure else 1e-5)
    assert not _close(result.weights, init, 1e-2)  # it trained
    assert result.rejected == []


def test_secure_round_survives_a_dropout_and_aggregates_the_others():
    x, y, _, _ = load_task_data("digits")
    init = _init()
    parts = [range(100 * i, 100 * (i + 1)) for i in range(5)]
    result = _run(_task(parts, faults=("1:drop@1",)), rounds=1, secure=True, init=init)
    assert [r.clients for r in result.rounds] == [4]
    assert [r.failures for r in result.rounds] == [1]  # once, though Flower's SecAgg+ lists it twice
    survivors = torch.tensor([i for k in (0, 2, 3, 4) for i in parts[k]])
    assert _close(result.weights, _gd(init, x[survivors], y[survivors], steps=1), 1e-4)


def test_malformed_updates_are_rejected_with_a_reason_and_the_round_goes_on():
    x, y, _, _ = load_task_data("digits")
    init = _init()
    parts = [range(100 * i, 100 * (i + 1)) for i in range(4)]
    result = _run(_task(parts, faults=("2:nan@1", "3:shape@1")), rounds=1, init=init)
    assert len(result.rejected) == 2
    assert any("client 2" in r and "NaN" in r for r in result.rejected)
    assert any("client 3" in r and "shape" in r for r in result.rejected)
    assert [r.clients for r in result.rounds] == [2]
    assert [r.failures for r in result.rounds] == [2]
    assert _close(result.weights, _gd(init, x[:200], y[:200], steps=1), 1e-5)


def test_under_secagg_the_server_sees_no_single_update(monkeypatch):
    import flwr.server.workflow.secure_aggregation.secaggplus_workflow as workflow

    seen = []
    original = workflow.bytes_to_ndarray

    def recording(b):
        array = original(b)
        seen.append(array)
        return array

    monkeypatch.setattr(workflow, "bytes_to_ndarray", recording)
    x, y, _, _ = load_task_data("digits")
    init = _init()
    task = _task(PARTS)
    result = _run(task, rounds=1, secure=True, init=init)
    assert result.rounds[0].clients == 3
    updates = [np.concatenate([a.ravel() for a in _gd(init, x[client_indices(task, k)], y[client_indices(task, k)], 1)])
               for k in range(3)]
    size = updates[0].size
    per_client = 1 + len(init)  # what reached the server from each client: [weight factor, *parameter arrays]
    vectors = [np.concatenate([a.ravel().astype(np.float64) for a in seen[i + 1:i + per_client]])
               for i in range(0, len(seen), per_client)]
    assert len(vectors) == 3 and all(v.size == size for v in vectors)
    for v in vectors:
        assert v.max() > 2 ** 31  # masked values spread over the whole 2^32 ring
        for u in updates:
            assert abs(np.corrcoef(v, u)[0, 1]) < 0.1


def test_more_clients_per_round_than_clients_is_refused():
    from veil.fl.apps import FLError, RoundRecorder, make_strategy

    task = _task([range(100 * i, 100 * (i + 1)) for i in range(2)])
    with pytest.raises(FLError, match="clients_per_round is 5, but the task has only 2 clients"):
        make_strategy(task, ServerSettings(rounds=1, clients_per_round=5), RoundRecorder())
