"""``from_torch``: a ``torch.nn.Module`` traced with ``torch.fx`` into Veil's graph.

Supported: Linear, Conv2d (stride, padding, dilation, groups), ReLU, MaxPool2d, AvgPool2d,
AdaptiveAvgPool2d, BatchNorm1d/2d (folded into the preceding Linear/Conv2d, else an affine map),
Flatten/view/reshape, Dropout (identity at inference), Identity, residual add, cat, Sigmoid, Tanh,
Softmax, LogSoftmax, and the functional and method forms of these (``F.relu``, ``x.view(...)``,
``torch.flatten``, ``x + y``...). Conversion checks every node and lists *all* unsupported ones in
one :class:`UnsupportedModelError`, each with its op, its target and what to do.

The rewrites of :mod:`veil.nn.rewrites` then fold BatchNorm and move activations after max-pools.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn

from veil.nn.fx_calls import _SIZE, _SUPPORTED_HINT, FUNCTIONS, METHODS, _emit_call, _to_arg
from veil.nn.graph import Graph, Node, Ref, unique_name
from veil.nn.rewrites import fold_batch_norms, pool_before_activation

if TYPE_CHECKING:
    from veil.nn.model import SecureModel

class UnsupportedModelError(ValueError):
    """The model has layers or operations Veil cannot run on shares (all of them are listed)."""


@dataclass
class _Builder:
    """Collects nodes and parameter values during conversion."""

    nodes: list[Node] = field(default_factory=list)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    training: bool = False

    def name(self, base: str) -> str:
        return unique_name(base.replace(".", "_"), (n.name for n in self.nodes))

    def emit(self, base: str, op: str, *args: Any, **attrs: Any) -> Ref:
        name = self.name(base)
        self.nodes.append(Node(name, op, tuple(args), dict(attrs)))
        return Ref(name)

    def param(self, base: str, value: torch.Tensor, *, key: str | None = None) -> Ref:
        """A parameter node; ``key`` is its name in the module's ``state_dict`` (None if derived)."""
        name = self.name(base)
        value = value.detach().to("cpu", torch.float32).clone()
        attrs: dict[str, Any] = {"shape": list(value.shape)}
        if key is not None:
            attrs["key"] = key
        self.nodes.append(Node(name, "param", (), attrs))
        self.values[name] = value
        return Ref(name)


def _pair(v: Any) -> Any:
    return list(v) if isinstance(v, (tuple, list)) else v


# ---- modules -------------------------------------------------------------------------------------
ModuleConverter = Callable[[_Builder, str, Any, list[Any]], Any]
MODULES: dict[type, ModuleConverter] = {}


def converts_module(*types: type) -> Callable[[ModuleConverter], ModuleConverter]:
    def deco(fn: ModuleConverter) -> ModuleConverter:
        for t in types:
            MODULES[t] = fn
        return fn

    return deco


@converts_module(nn.Linear)
def _linear(b: _Builder, name: str, m: nn.Linear, args: list[Any]) -> Ref:
    w = b.param(f"{name}.weight", m.weight, key=f"{name}.weight")
    bias = b.param(f"{name}.bias", m.bias, key=f"{name}.bias") if m.bias is not None else None
    return b.emit(name, "linear", args[0], w, bias)


@converts_module(nn.Conv2d)
def _conv2d(b: _Builder, name: str, m: nn.Conv2d, args: list[Any]) -> Ref | None:
    if m.padding_mode != "zeros":
        b.problems.append(f"{name}: Conv2d with padding_mode={m.padding_mode!r}: only zero padding is "
                          f"supported; pad explicitly or use padding_mode='zeros'")
        return None
    w = b.param(f"{name}.weight", m.weight, key=f"{name}.weight")
    bias = b.param(f"{name}.bias", m.bias, key=f"{name}.bias") if m.bias is not None else None
    padding = m.padding if isinstance(m.padding, str) else _pair(m.padding)
    return b.emit(name, "conv2d", args[0], w, bias, stride=_pair(m.stride), padding=padding,
                  dilation=_pair(m.dilation), groups=m.groups)


@converts_module(nn.BatchNorm1d, nn.BatchNorm2d)
def _batch_norm(b: _Builder, name: str, m: nn.modules.batchnorm._BatchNorm, args: list[Any]) -> Ref | None:
    if b.training:
        if m.running_mean is None or m.running_var is None:
            b.problems.append(f"{name}: {type(m).__name__} without running statistics cannot be trained on shares "
                              f"(track_running_stats=True is needed to run the trained model)")
            return None
        w = b.param(f"{name}.weight", m.weight, key=f"{name}.weight") if m.weight is not None else None
        bias = b.param(f"{name}.bias", m.bias, key=f"{name}.bias") if m.bias is not None else None
        mean = b.param(f"{name}.running_mean", m.running_mean, key=f"{name}.running_mean")
        var = b.param(f"{name}.running_var", m.running_var, key=f"{name}.running_var")
        for ref in (mean, var):  # statistics, not trained by gradients
            b.nodes[-1 if ref is var else -2].attrs["buffer"] = True
        return b.emit(name, "batch_norm_train", args[0], w, bias, mean, var, eps=float(m.eps),
                      momentum=0.1 if m.momentum is None else float(m.momentum), prefix=name)
    if m.running_mean is None or m.running_var is None:
        b.problems.append(f"{name}: {type(m).__name__} without running statistics "
                          f"(track_running_stats=False) has no inference form; train with running stats")
        return None
    scale = 1.0 / torch.sqrt(m.running_var.double() + m.eps)
    if m.weight is not None:
        scale = scale * m.weight.double()
    shift = -m.running_mean.double() * scale
    if m.bias is not None:
        shift = shift + m.bias.double()
    return b.emit(name, "batch_norm", args[0], b.param(f"{name}.scale", scale), b.param(f"{name}.shift", shift))


@converts_module(nn.ReLU)
def _relu(b: _Builder, name: str, m: nn.Module, args: list[Any]) -> Ref:
    return b.emit(name, "relu", args[0])


@converts_module(nn.Sigmoid)
def _sigmoid(b: _Builder, name: str, m: nn.Module, args: list[Any]) -> Ref:
    return b.emit(name, "sigmoid", args[0])


@converts_module(nn.Tanh)
def _tanh(b: _Builder, name: str, m: nn.Module, args: list[Any]) -> Ref:
    return b.emit(name, "tanh", args[0])


@converts_module(nn.Softmax, nn.LogSoftmax)
def _softmax(b: _Builder, name: str, m: nn.Softmax | nn.LogSoftmax, args: list[Any]) -> Ref | None:
    if m.dim is None:
        b.problems.append(f"{name}: {type(m).__name__}(dim=None) is ambiguous; give dim explicitly")
        return None
    op = "softmax" if isinstance(m, nn.Softmax) else "log_softmax"
    return b.emit(name, op, args[0], dim=m.dim)


@converts_module(nn.MaxPool2d)
def _max_pool(b: _Builder, name: str, m: nn.MaxPool2d, args: list[Any]) -> Ref | None:
    if m.dilation not in (1, (1, 1)) or m.ceil_mode or m.return_indices:
        b.problems.append(f"{name}: MaxPool2d with dilation, ceil_mode or return_indices is not supported; "
                          f"use plain kernel_size/stride/padding")
        return None
    return b.emit(name, "max_pool2d", args[0], kernel_size=_pair(m.kernel_size), stride=_pair(m.stride),
                  padding=_pair(m.padding))


@converts_module(nn.AvgPool2d)
def _avg_pool(b: _Builder, name: str, m: nn.AvgPool2d, args: list[Any]) -> Ref | None:
    padded = m.padding not in (0, (0, 0))
    if m.ceil_mode or m.divisor_override is not None or (padded and not m.count_include_pad):
        b.problems.append(f"{name}: AvgPool2d with ceil_mode, divisor_override or count_include_pad=False "
                          f"is not supported; use the defaults")
        return None
    return b.emit(name, "avg_pool2d", args[0], kernel_size=_pair(m.kernel_size), stride=_pair(m.stride),
                  padding=_pair(m.padding))


@converts_module(nn.AdaptiveAvgPool2d)
def _adaptive(b: _Builder, name: str, m: nn.AdaptiveAvgPool2d, args: list[Any]) -> Ref | None:
    size = m.output_size
    if (isinstance(size, (tuple, list)) and None in size) or size is None:
        b.problems.append(f"{name}: AdaptiveAvgPool2d with a None output size is not supported; give both sizes")
        return None
    return b.emit(name, "adaptive_avg_pool2d", args[0], output_size=_pair(size))


@converts_module(nn.Flatten)
def _flatten(b: _Builder, name: str, m: nn.Flatten, args: list[Any]) -> Ref:
    return b.emit(name, "flatten", args[0], start_dim=m.start_dim, end_dim=m.end_dim)


@converts_module(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
def _identity(b: _Builder, name: str, m: nn.Module, args: list[Any]) -> Ref:
    return b.emit(name, "identity", args[0])


# ---- the tracer ----------------------------------------------------------------------------------
def _trace(module: nn.Module) -> torch.fx.GraphModule:
    if isinstance(module, torch.fx.GraphModule):
        return module
    try:
        return torch.fx.symbolic_trace(module)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, NotImplementedError...)
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(module).__name__}: {type(e).__name__}: {e}. Veil needs a forward "
            f"without data-dependent control flow (no `if x.sum() > 0`, no Python loops over tensor values)"
        ) from None


def _describe(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"call_module {type(gm.get_submodule(str(node.target))).__name__} '{node.target}'"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def from_fx(module: nn.Module, *, training: bool = False) -> tuple[Graph, dict[str, torch.Tensor]]:
    """Trace ``module`` (in eval semantics) into a graph and its parameter values. ``training=True``
    keeps every parameter as it is in the module (no folding) and refuses layers that cannot be
    trained on shares."""
    gm = _trace(module)
    b = _Builder(training=training)
    env: dict[str, Any] = {}

    def arg(v: Any) -> Any:
        if isinstance(v, torch.fx.Node):
            return env.get(v.name)
        if isinstance(v, (list, tuple)):
            return type(v)(arg(x) for x in v)
        if isinstance(v, dict):
            return {k: arg(x) for k, x in v.items()}
        return v

    for node in gm.graph.nodes:
        what = _describe(node, gm)
        out: Any = None
        args, kwargs = arg(node.args), arg(node.kwargs)
        if node.op == "placeholder":
            out = b.emit(node.name, "input")
        elif node.op == "get_attr":
            value = _attr(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                out = b.param(str(node.target), value, key=str(node.target))
            else:
                b.problems.append(f"node '{node.name}' ({what}): attribute of type {type(value).__name__}")
        elif node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            conv = MODULES.get(type(sub))
            if conv is None:
                b.problems.append(f"node '{node.name}' ({what}): {type(sub).__name__} is not supported; "
                                  f"{_SUPPORTED_HINT}")
            elif kwargs:
                b.problems.append(f"node '{node.name}' ({what}): keyword arguments to a module call")
            else:
                out = conv(b, str(node.target), sub, list(args))
        elif node.op in ("call_function", "call_method"):
            if node.op == "call_method":
                sig = METHODS.get(str(node.target))
            else:
                sig = FUNCTIONS.get(node.target)
                if sig is None and node.target is getattr and len(args) == 2 and args[1] == "shape":
                    sig = _SIZE
                    args = (args[0],)
            if sig is None:
                b.problems.append(f"node '{node.name}' ({what}) is not supported; {_SUPPORTED_HINT}")
            else:
                try:
                    out = _emit_call(b, node.name, sig, tuple(args), dict(kwargs))
                except TypeError as e:
                    b.problems.append(f"node '{node.name}' ({what}): {e}")
        elif node.op == "output":
            if not isinstance(args[0], Ref):
                raise UnsupportedModelError(
                    f"{type(module).__name__} cannot be converted: its forward() returns a "
                    f"{type(args[0]).__name__}, not one tensor (return the output to compute on shares; "
                    f"wrap the module to pick it)")
            b.emit("output", "output", _to_arg(args[0]))
            continue
        env[node.name] = out
    if b.problems:
        raise UnsupportedModelError(
            f"{type(module).__name__} cannot be converted ({len(b.problems)} problem(s)):\n  - "
            + "\n  - ".join(b.problems))
    graph = Graph(b.nodes).validate()
    graph, values = (graph, b.values) if training else fold_batch_norms(graph, b.values)
    graph = pool_before_activation(graph)
    return graph.without_unused().validate(), {k: v for k, v in values.items() if k in graph.params}


def from_torch(module: nn.Module, *, training: bool = False) -> SecureModel:
    """Convert ``module`` into a :class:`~veil.nn.model.SecureModel` with its (plaintext) parameters,
    ready to be shared by its owner. Inference semantics by default: BatchNorm uses its running
    statistics (folded into the preceding layer) and Dropout is the identity, whatever
    ``module.training`` says. ``training=True``: for private training (parameters kept one for one
    with the module's ``state_dict``; BatchNorm refused; Dropout still the identity)."""
    from veil.nn.model import SecureModel

    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch needs a torch.nn.Module, got {type(module).__name__}")
    graph, values = from_fx(module, training=training)
    return SecureModel(graph, values)


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
