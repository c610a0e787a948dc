"""The secure model's graph: a straight-line program over a closed vocabulary of operations.

A :class:`Graph` is what :func:`veil.nn.from_torch` and :func:`veil.nn.from_onnx` produce and what
travels from the model owner to the other compute party: the *architecture*, never the weights. It
is public by design (as in every MPC inference system: both parties run the same program on shares).

Wire contract (``Graph.to_json`` / ``Graph.from_json``), version 1::

    {"veil_graph": 1,
     "nodes": [{"name": str, "op": str, "args": [Arg...], "attrs": {str: Arg}}...]}

    Arg = null | bool | int | float | str | [Arg...] | {"ref": node name} | {"tuple": [Arg...]}

Decoding accepts only the ops of :data:`OPS` and references to earlier nodes, so a hostile graph
cannot name code to run; parameter nodes (op ``param``) carry a shape and no value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

GRAPH_VERSION = 1
MAX_GRAPH_BYTES = 1 << 24
MAX_PARAM_ELEMENTS = 1 << 31

# The vocabulary. Each op's arguments follow the PyTorch function of the same name.
OPS = frozenset({
    "input", "param", "output",
    # linear layers (bilinear in a secret input and secret weights)
    "linear", "conv2d", "batch_norm", "batch_norm_train",
    # activations
    "relu", "sigmoid", "tanh", "softmax", "log_softmax",
    # pooling
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
    # arithmetic
    "add", "sub", "mul", "truediv", "neg", "sum", "mean", "matmul",
    # shape (local)
    "flatten", "reshape", "transpose", "permute", "cat", "identity", "size", "getitem",
})


@dataclass(frozen=True)
class Ref:
    """A reference to the value of an earlier node."""

    name: str


@dataclass
class Node:
    name: str
    op: str
    args: tuple[Any, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)

    def refs(self) -> Iterator[str]:
        """Names of the nodes this node reads."""
        yield from _refs(self.args)
        yield from _refs(tuple(self.attrs.values()))


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, Ref):
        yield value.name
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _refs(v)


class GraphError(ValueError):
    """A graph that is malformed, hostile or not what the other party expects."""


@dataclass
class Graph:
    nodes: list[Node]

    # ---- queries -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def inputs(self) -> list[str]:
        return [n.name for n in self.nodes if n.op == "input"]

    @property
    def params(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes, in graph order."""
        return {n.name: tuple(n.attrs["shape"]) for n in self.nodes if n.op == "param"}

    def users(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in set(n.refs())]

    def ops(self) -> list[str]:
        return [n.op for n in self.nodes]

    def without_unused(self) -> Graph:
        """Drop nodes whose values nobody reads (after rewrites), keeping inputs and the output."""
        live = {n.name for n in self.nodes if n.op in ("output", "input")}
        for n in reversed(self.nodes):
            if n.name in live:
                live.update(n.refs())
        return Graph([n for n in self.nodes if n.name in live])

    # ---- checks --------------------------------------------------------------------------
    def validate(self) -> Graph:
        seen: set[str] = set()
        outputs = 0
        for n in self.nodes:
            if not isinstance(n.name, str) or not n.name or n.name in seen:
                raise GraphError(f"node name {n.name!r} is empty or repeated")
            if n.op not in OPS:
                raise GraphError(f"node {n.name!r}: unknown op {n.op!r} (known: {sorted(OPS)})")
            missing = [r for r in n.refs() if r not in seen]
            if missing:
                raise GraphError(f"node {n.name!r} reads {missing}, which are not defined before it")
            if n.op == "param":
                shape = n.attrs.get("shape")
                if (not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape)
                        or math.prod(shape) > MAX_PARAM_ELEMENTS):
                    raise GraphError(f"parameter {n.name!r} has a bad shape {shape!r}")
            outputs += n.op == "output"
            seen.add(n.name)
        if outputs != 1 or self.nodes[-1].op != "output":
            raise GraphError("a graph ends with exactly one output node")
        if not self.inputs:
            raise GraphError("the graph has no input")
        return self

    # ---- wire ----------------------------------------------------------------------------
    def to_json(self) -> bytes:
        nodes = [{"name": n.name, "op": n.op, "args": [_enc(a) for a in n.args],
                  "attrs": {k: _enc(v) for k, v in n.attrs.items()}} for n in self.nodes]
        return json.dumps({"veil_graph": GRAPH_VERSION, "nodes": nodes}).encode()

    @classmethod
    def from_json(cls, raw: bytes | bytearray | memoryview) -> Graph:
        if len(raw) > MAX_GRAPH_BYTES:
            raise GraphError(f"graph description of {len(raw)} bytes is over the limit ({MAX_GRAPH_BYTES})")
        try:
            doc = json.loads(bytes(raw))
            if doc.get("veil_graph") != GRAPH_VERSION:
                raise GraphError(f"graph format version {doc.get('veil_graph')!r}, expected {GRAPH_VERSION}")
            nodes = [Node(str(d["name"]), str(d["op"]), tuple(_dec(a) for a in d["args"]),
                          {str(k): _dec(v) for k, v in d["attrs"].items()}) for d in doc["nodes"]]
        except GraphError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise GraphError(f"malformed graph description: {e}") from None
        return cls(nodes).validate()

    def summary(self) -> str:
        """One line per node: name, op, inputs (and shapes of parameters)."""
        lines = []
        for n in self.nodes:
            extra = f" shape={tuple(n.attrs['shape'])}" if n.op == "param" else ""
            lines.append(f"{n.name:<24} {n.op:<20} {', '.join(n.refs())}{extra}")
        return "\n".join(lines)


def _enc(v: Any) -> Any:
    if isinstance(v, Ref):
        return {"ref": v.name}
    if isinstance(v, tuple):
        return {"tuple": [_enc(x) for x in v]}
    if isinstance(v, list):
        return [_enc(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise GraphError(f"cannot describe {type(v).__name__} value {v!r} in a graph")


def _dec(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"ref"} and isinstance(v["ref"], str):
            return Ref(v["ref"])
        if set(v) == {"tuple"} and isinstance(v["tuple"], list):
            return tuple(_dec(x) for x in v["tuple"])
        raise GraphError(f"unexpected object {v!r} in a graph description")
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise GraphError(f"unexpected value {v!r} in a graph description")


def unique_name(base: str, taken: Iterable[str]) -> str:
    names = set(taken)
    if base not in names:
        return base
    i = 1
    while f"{base}_{i}" in names:
        i += 1
    return f"{base}_{i}"
