"""from_torch: tracing, the plaintext run of the graph, rewrites, errors, and the graph's wire format."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from nn_testing import randomize_batch_norm
from torch import nn

from veil.nn import Graph, GraphError, UnsupportedModelError, from_torch


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 5)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        y = F.adaptive_avg_pool2d(y, (3, 3)) * self.scale
        y = torch.flatten(y, 1)
        return F.log_softmax(self.fc(y), dim=-1)


def test_plaintext_run_of_the_graph_equals_the_module() -> None:
    torch.manual_seed(0)
    module = Functional().eval()
    randomize_batch_norm(module, 0)
    model = from_torch(module)
    x = torch.randn(3, 1, 7, 7)
    with torch.no_grad():
        assert torch.allclose(model(x), module(x), atol=1e-5)
    bn = module.bn.weight.numel() + module.bn.bias.numel()
    assert model.num_parameters() == sum(p.numel() for p in module.parameters()) - bn  # folded into the conv
    assert "batch_norm" not in model.graph.ops()


def test_training_mode_modules_convert_with_inference_semantics() -> None:
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.9), nn.ReLU())
    randomize_batch_norm(module, 1)
    model = from_torch(module.train())
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.allclose(model(x), module.eval()(x), atol=1e-5)


@pytest.mark.parametrize("rank", [2, 3])
def test_batch_norm_after_linear_is_folded_only_where_its_channels_are_the_linear_outputs(rank: int) -> None:
    # BatchNorm1d normalises dimension 1, a Linear maps the last: on (N, C, L) with C == out_features
    # folding would scale the wrong axis; on 2-D outputs (after a flatten) it is exact and saves a round
    torch.manual_seed(2)
    head = [nn.Flatten()] if rank == 2 else []
    module = nn.Sequential(*head, nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU())
    randomize_batch_norm(module, 2)
    module.eval()
    model = from_torch(module)
    x = torch.randn(6, 4, 1) if rank == 2 else torch.randn(6, 4, 4)
    with torch.no_grad():
        assert torch.allclose(model(x), module(x), atol=1e-5)
    assert ("batch_norm" in model.graph.ops()) == (rank == 3)


class TwoHeads(nn.Module):
    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.fc, self.as_dict = nn.Linear(3, 2), as_dict

    def forward(self, x: torch.Tensor) -> Any:
        y = self.fc(x)
        return {"logits": y} if self.as_dict else (y, y.relu())


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_model_that_returns_several_values_is_refused_at_conversion(as_dict: bool) -> None:
    kind = "dict" if as_dict else "tuple"
    with pytest.raises(UnsupportedModelError, match=rf"TwoHeads cannot be converted: its forward\(\) returns a {kind}"):
        from_torch(TwoHeads(as_dict))


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 3)
        self.emb = nn.Embedding(4, 3)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(self.pool(x)) + self.rnn(x)[0] + self.emb(x.long())


def test_every_unsupported_node_is_listed_with_its_op_and_what_to_do() -> None:
    with pytest.raises(UnsupportedModelError) as err:
        from_torch(Unsupported())
    msg = str(err.value)
    assert "5 problem(s)" in msg
    assert "node 'long' (call_method long) is not supported" in msg
    assert "node 'rnn' (call_module LSTM 'rnn'): LSTM is not supported" in msg
    assert "call_module Embedding 'emb'" in msg
    assert "node 'erf' (call_function erf) is not supported" in msg
    assert "pool: MaxPool2d with dilation, ceil_mode or return_indices is not supported" in msg
    assert "supported: Linear, Conv2d" in msg  # what to do instead


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_untraceable_control_flow_is_explained() -> None:
    with pytest.raises(UnsupportedModelError, match="without data-dependent control flow"):
        from_torch(DataDependent())


def test_from_torch_needs_a_module() -> None:
    with pytest.raises(TypeError, match=r"needs a torch\.nn\.Module"):
        from_torch(lambda x: x)  # type: ignore[arg-type]


def test_graph_round_trips_through_json_without_weights() -> None:
    torch.manual_seed(2)
    model = from_torch(Functional().eval())
    raw = model.graph.to_json()
    assert Graph.from_json(raw).to_json() == raw
    doc = json.loads(raw)
    assert all("value" not in n["attrs"] for n in doc["nodes"])  # shapes only
    assert len(raw) < 4000


def _doc(nodes: list[dict]) -> bytes:
    return json.dumps({"veil_graph": 1, "nodes": nodes}).encode()


INPUT = {"name": "x", "op": "input", "args": [], "attrs": {}}
OUTPUT = {"name": "out", "op": "output", "args": [{"ref": "x"}], "attrs": {}}


@pytest.mark.parametrize(("nodes", "message"), [
    ([INPUT, {"name": "e", "op": "eval", "args": [], "attrs": {}}, OUTPUT], "unknown op 'eval'"),
    ([INPUT, {"name": "r", "op": "relu", "args": [{"ref": "later"}], "attrs": {}}, OUTPUT],
     "reads \\['later'\\], which are not defined before it"),
    ([INPUT, {"name": "w", "op": "param", "args": [], "attrs": {"shape": [-1, 3]}}, OUTPUT], "bad shape"),
    ([INPUT, {"name": "w", "op": "param", "args": [], "attrs": {"shape": [1 << 20, 1 << 20]}}, OUTPUT], "bad shape"),
    ([INPUT, INPUT, OUTPUT], "empty or repeated"),
    ([INPUT], "exactly one output"),
    ([INPUT, {"name": "r", "op": "relu", "args": [{"code": "rm -rf"}], "attrs": {}}, OUTPUT], "unexpected object"),
])
def test_hostile_or_malformed_graphs_are_refused(nodes: list[dict], message: str) -> None:
    with pytest.raises(GraphError, match=message):
        Graph.from_json(_doc(nodes))


def test_graph_version_and_garbage_are_refused() -> None:
    with pytest.raises(GraphError, match="version"):
        Graph.from_json(json.dumps({"veil_graph": 99, "nodes": []}).encode())
    with pytest.raises(GraphError, match="malformed graph description"):
        Graph.from_json(b"\x00\xffnot json")
