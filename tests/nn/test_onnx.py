"""veil.nn.from_onnx: PyTorch models exported to ONNX (legacy exporter) and hand-built ONNX graphs,
converted and run in the clear against the original (1e-5), plus one secure run; unsupported ops are
listed all at once; malformed files are one clear ModelFileError."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from nn_testing import randomize_batch_norm, secure_forward
from torch import nn

from veil.nn.convert import UnsupportedModelError
from veil.nn.graph import Graph
from veil.nn.load import ModelFileError
from veil.nn.onnx import from_onnx

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

TOL = 1e-5


def export(module: nn.Module, x: torch.Tensor, **kwargs: Any) -> bytes:
    """``module`` (in eval mode) as ONNX bytes from the legacy (TorchScript) exporter."""
    module.eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DeprecationWarning of the legacy exporter, tracer warnings
        torch.onnx.export(module, (x,), f, dynamo=False, **kwargs)  # type: ignore[arg-type]  # a file object works
    return f.getvalue()


def seeded(seed: int, make: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def x_of(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def check(module: nn.Module, x: torch.Tensor, *, runs: tuple[torch.Tensor, ...] = (), **kwargs: Any) -> Graph:
    """Export, convert, compare with the module on ``x`` (and other inputs ``runs``); the graph."""
    model = from_onnx(export(module, x, **kwargs))
    with torch.no_grad():
        for inp in (x, *runs):
            torch.testing.assert_close(model(inp), module(inp), atol=TOL, rtol=TOL)
    assert Graph.from_json(model.graph.to_json()).to_json() == model.graph.to_json()
    return model.graph


# ---- models exported from PyTorch ----------------------------------------------------------------
class LeNetish(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, stride=2),
                         nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(8 * 5 * 5, 16), nn.ReLU(),
                         nn.Linear(16, 10))


def test_lenet_like() -> None:
    graph = check(seeded(0, LeNetish), x_of(1, 2, 1, 28, 28))
    assert graph.ops().count("conv2d") == 2 and graph.ops().count("linear") == 2
    assert graph.ops().count("max_pool2d") == 2 and "flatten" in graph.ops()
    assert list(graph.params) == ["0_weight", "0_bias", "3_weight", "3_bias", "7_weight", "7_bias", "9_weight",
                                  "9_bias"]
    relu = graph.ops().index("relu")
    assert graph.ops()[relu - 1] == "max_pool2d"  # pool before activation


def test_lenet_like_from_a_file_on_shares(tmp_path: Path) -> None:
    module = seeded(0, LeNetish)
    x = x_of(2, 1, 1, 28, 28)
    path = tmp_path / "lenet.onnx"
    path.write_bytes(export(module, x))
    out = secure_forward(from_onnx(path), x)
    torch.testing.assert_close(out.float(), module(x).detach(), atol=0.05, rtol=0.0)


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(torch.relu(self.bn(self.conv(x))))
        return self.bn3(self.fc(torch.flatten(x, 1)))


@pytest.mark.parametrize("folding", [True, False])
def test_batch_norm(folding: bool) -> None:
    """With constant folding the exporter folds BN into the conv itself; without, Veil does."""
    module = seeded(3, ConvBn)
    randomize_batch_norm(module, 4)
    graph = check(module, x_of(5, 2, 3, 6, 6), do_constant_folding=folding)
    assert graph.ops().count("batch_norm") == 1  # the one after the ReLU; the others fold
    assert graph.ops().count("conv2d") == 1 and graph.ops().count("linear") == 1
    if not folding:
        assert {"bn2_scale", "bn2_shift"} <= set(graph.params)
        assert "conv_Conv_bias" in graph.params  # the fold gave the bias-free conv a bias


def test_average_pooling() -> None:
    module = nn.Sequential(nn.Conv2d(2, 3, 3), nn.AvgPool2d(2, padding=1), nn.Tanh(), nn.AvgPool2d(3, stride=1),
                           nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(3, 2))
    graph = check(seeded(6, lambda: module), x_of(7, 2, 2, 10, 10))
    assert graph.ops().count("avg_pool2d") == 2 and "adaptive_avg_pool2d" in graph.ops()


def test_average_pool_without_counting_padding_is_refused() -> None:
    module = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), nn.Sigmoid())
    with pytest.raises(UnsupportedModelError, match=r"AveragePool.*count_include_pad=True"):
        from_onnx(export(module, x_of(8, 1, 1, 5, 5)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.c, self.d = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        y = torch.relu(self.b(y) + y) - x * 0.5
        return torch.cat([self.c(y), self.d(y) / 4.0], dim=1)


def test_residual_add_and_cat() -> None:
    graph = check(seeded(9, Residual), x_of(10, 2, 2, 5, 5))
    assert {"add", "sub", "mul", "cat", "truediv"} <= set(graph.ops())
    div = next(n for n in graph if n.op == "truediv")
    assert div.args[1] == 4.0  # a public constant, not a secret divisor


def test_activations() -> None:
    module = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Sigmoid(), nn.Linear(5, 4), nn.Tanh(), nn.Dropout(0.3),
                           nn.Linear(4, 4), nn.Softmax(dim=-1), nn.Linear(4, 3), nn.LogSoftmax(dim=1))
    graph = check(seeded(11, lambda: module), x_of(12, 3, 6))
    assert [op for op in graph.ops() if op not in ("param", "linear")] == [
        "input", "sigmoid", "tanh", "softmax", "log_softmax", "output"]


class Reductions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(2, 3, 3, padding="same", dilation=2)  # exported as auto_pad=SAME_UPPER
        self.grouped = nn.Conv2d(3, 3, 3, padding=1, groups=3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.grouped(self.same(x))
        pooled = nn.functional.adaptive_max_pool2d(y, 1) + y.sum(dim=(2, 3), keepdim=True)
        return pooled.flatten(1), y.mean(dim=1)


def test_same_padding_reductions_and_two_outputs() -> None:
    module = seeded(20, Reductions).eval()
    x = x_of(21, 2, 2, 6, 6)
    model = from_onnx(export(module, x))
    for got, expected in zip(model(x), module(x)):
        torch.testing.assert_close(got, expected.detach(), atol=TOL, rtol=TOL)
    assert {"sum", "mean", "max_pool2d"} <= set(model.graph.ops())


def test_initializers_listed_as_inputs() -> None:
    """Old exports list the weights among the graph inputs: they are not data inputs."""
    module = seeded(22, lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    graph = check(module, x_of(23, 2, 4), keep_initializers_as_inputs=True, opset_version=9)
    assert len(graph.inputs) == 1 and len(graph.params) == 2


class View(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.size(0), -1))


def test_view_batch_flatten_fixed_batch() -> None:
    """A fixed batch makes the exporter write Reshape(y, Constant [2, -1]); Veil keeps the batch."""
    graph = check(seeded(13, View), x_of(14, 2, 1, 6, 6), runs=(x_of(15, 5, 1, 6, 6),))
    assert "flatten" in graph.ops() and "reshape" not in graph.ops()


def test_view_batch_flatten_dynamic_batch() -> None:
    """A dynamic batch makes it write Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    graph = check(seeded(13, View), x_of(14, 2, 1, 6, 6), runs=(x_of(15, 5, 1, 6, 6),), input_names=["x"],
                  dynamic_axes={"x": {0: "batch"}})
    assert graph.inputs == ["x"] and "flatten" in graph.ops()


class Reshapes(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(x.shape[0], 3, -1).transpose(1, 2)  # (n, 4, 3)
        return torch.flatten(y, 1) * 2.0


@pytest.mark.parametrize("dynamic", [False, True])
def test_reshape_and_transpose(dynamic: bool) -> None:
    kwargs: dict[str, Any] = {"input_names": ["x"], "dynamic_axes": {"x": {0: "n"}}} if dynamic else {}
    graph = check(Reshapes(), x_of(16, 2, 12), runs=(x_of(17, 3, 12),), **kwargs)
    assert {"reshape", "permute", "flatten"} <= set(graph.ops())


def test_unsupported_ops_are_all_listed() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.cos(x)) + torch.erf(x)

    with pytest.raises(UnsupportedModelError) as e:
        from_onnx(export(Odd(), x_of(18, 2, 4)))
    text = str(e.value)
    assert "2 problem(s)" in text and "(Cos) is not supported" in text and "(Erf) is not supported" in text
    assert "use ReLU" in text and text.count("Supported ONNX ops: ") == 1


def test_lstm_is_refused() -> None:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lstm(x)[0]

    with pytest.raises(UnsupportedModelError, match=r"\(LSTM\) is not supported; recurrent layers"):
        from_onnx(export(Recurrent(), x_of(19, 1, 2, 3)))


# ---- hand-built ONNX graphs: attributes the exporter does not write -------------------------------
def build(nodes: list[Any], inits: dict[str, np.ndarray], in_shape: list[Any], out_shape: list[Any],
          inputs: tuple[str, ...] = ("x",), opset: int = 17) -> bytes:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, in_shape) for i in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return bytes(model.SerializeToString())


def rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_gemm_alpha_beta_trans_b_0() -> None:
    w, c = rand(1, 4, 3), rand(2, 3)  # (in, out): transB=0
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["h"], alpha=2.0, beta=0.5, name="fc"),
             helper.make_node("Div", ["h", "d"], ["h2"], name="div"),
             helper.make_node("MatMul", ["h2", "m"], ["y"], name="mm")]
    d, m = np.abs(rand(3, 3)) + 0.5, rand(4, 3, 2)
    model = from_onnx(build(nodes, {"w": w, "c": c, "d": d, "m": m}, [2, 4], [2, 2]))
    x = x_of(20, 2, 4)
    expected = (2.0 * x @ torch.from_numpy(w) + 0.5 * torch.from_numpy(c)) / torch.from_numpy(d)
    torch.testing.assert_close(model(x), expected @ torch.from_numpy(m), atol=TOL, rtol=TOL)
    assert "truediv" not in model.graph.ops()  # division by a weight: multiplication by its reciprocal


def test_flatten_axis_reshape_zero_and_tensor_matmul() -> None:
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=2, name="flat"),            # (2*3, 4*5)
             helper.make_node("Reshape", ["x", "s"], ["r"], name="reshape"),           # (2, 3, 20)
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1], name="t"),    # (2, 20, 3)
             helper.make_node("Reshape", ["f", "s2"], ["f2"], name="reshape2"),        # (2, 3, 20)
             helper.make_node("MatMul", ["f2", "t"], ["y"], name="mm")]                # (2, 3, 3)
    inits = {"s": np.array([0, 0, -1]), "s2": np.array([2, 3, 20])}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 3])],
                              [numpy_helper.from_array(v.astype(np.int64), k) for k, v in inits.items()])
    model = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    x = x_of(21, 2, 3, 4, 5)
    r = x.reshape(2, 3, 20)
    torch.testing.assert_close(model(x), r @ r.transpose(1, 2), atol=TOL, rtol=TOL)


def test_problems_in_hand_built_graphs_are_all_listed() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 0, 0], name="conv"),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], ceil_mode=1, name="pool"),
             helper.make_node("LeakyRelu", ["p"], ["l"], name="leaky"),
             helper.make_node("Softmax", ["l"], ["y"], axis=1, name="soft")]
    raw = build(nodes, {"w": rand(3, 2, 1, 3, 3)}, [1, 1, 6, 6], ["n", 2, 6, 4], inputs=("x", "z"), opset=11)
    with pytest.raises(UnsupportedModelError) as e:
        from_onnx(raw)
    text = str(e.value)
    assert "5 problem(s)" in text  # nodes after a failed one are checked too, and only for their own problems
    for expected in ("2 data inputs ['x', 'z']", "node 'conv' (Conv): asymmetric pads [1, 1, 0, 0]",
                     "node 'pool' (MaxPool): ceil_mode=1", "node 'leaky' (LeakyRelu) is not supported; use ReLU",
                     "node 'soft' (Softmax): opset 11 Softmax with axis=1"):
        assert expected in text


def test_old_opset_softmax_over_flattened_dims_is_refused() -> None:
    raw = build([helper.make_node("Softmax", ["x"], ["y"], axis=1, name="soft")], {}, [2, 3, 4], [2, 3, 4], opset=11)
    with pytest.raises(UnsupportedModelError, match=r"node 'soft'.*re-export with opset_version >= 13"):
        from_onnx(raw)
    ok = from_onnx(build([helper.make_node("Softmax", ["x"], ["y"], axis=2, name="soft")], {}, [2, 3, 4], [2, 3, 4],
                         opset=11))
    x = x_of(22, 2, 3, 4)
    torch.testing.assert_close(ok(x), torch.softmax(x, 2), atol=TOL, rtol=TOL)


# ---- malformed files -----------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [b"", b"\x12\x34 definitely not protobuf \xff" * 9, b"\x08\x07"])
def test_garbage_bytes(raw: bytes) -> None:
    with pytest.raises(ModelFileError, match="ONNX model"):
        from_onnx(raw)


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such file"):
        from_onnx(tmp_path / "missing.onnx")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"empty\.onnx: the file is empty"):
        from_onnx(empty)
    raw = export(nn.Sequential(nn.Linear(30, 30)), x_of(23, 1, 30))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelFileError, match=r"truncated\.onnx: not"):
        from_onnx(truncated)


def test_missing_onnx_package_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` sees when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'veil\[onnx\]'"):
        from_onnx(b"\x08\x07")
