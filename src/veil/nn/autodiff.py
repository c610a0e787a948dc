"""Reverse-mode differentiation of a graph on shares: gradients stay secret.

A training forward (:func:`forward`) runs each node like inference and keeps what its backward pass
needs (its operands, the comparison bits of a ReLU or a max-pool, a sigmoid's output...) on a
:class:`Tape`. :func:`backward` walks the tape in reverse from a gradient of the output and returns
the secret gradient of every parameter. The rules, one backward per op and a forward for the ops
whose backward needs context, are in :mod:`veil.nn.grads` (registered in :data:`BACKWARD` and
:data:`FORWARD`).

Costs of the backward passes (2-party + dealer protocol): Linear, Conv2d and secret products one
Beaver round per product (input and weight gradients); ReLU one round (the gradient times the saved
sign bit, an integer share: no truncation); a max-pool one round per tournament level, routing the
gradient down to the winners; sigmoid and tanh two rounds; softmax two; shape ops, sums, average
pooling and adding are local.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from veil.mpc.tensor import SecretTensor
from veil.nn.graph import Node, Ref
from veil.nn.ops import IMPLEMENTATIONS

if TYPE_CHECKING:
    from veil.nn.model import SecureModel

Ctx = dict[str, Any]
Forward = Callable[..., tuple[Any, Ctx]]
Backward = Callable[..., tuple[Any, ...]]
FORWARD: dict[str, Forward] = {}
BACKWARD: dict[str, Backward] = {}
NO_GRAD_OPS = frozenset({"size", "getitem", "input", "param", "output"})


class UnsupportedGradientError(ValueError):
    """An op (or operand combination) whose gradient Veil cannot compute on shares."""


def forward_rule(op: str) -> Callable[[Forward], Forward]:
    def deco(fn: Forward) -> Forward:
        FORWARD[op] = fn
        return fn

    return deco


def backward_rule(*ops: str) -> Callable[[Backward], Backward]:
    def deco(fn: Backward) -> Backward:
        for op in ops:
            BACKWARD[op] = fn
        return fn

    return deco


@dataclass
class Tape:
    """What a training forward kept: per node its context and its output."""

    model: SecureModel
    ctx: dict[str, Ctx] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    output: str = ""


def _value(env: dict[str, Any], v: Any) -> Any:
    if isinstance(v, Ref):
        return env[v.name]
    if isinstance(v, (tuple, list)):
        return type(v)(_value(env, x) for x in v)
    return v


def forward(model: SecureModel, *inputs: Any) -> tuple[Any, Tape]:
    """Run ``model`` keeping what backward needs; the output carries the tape as ``grad_fn``."""
    from veil.nn import grads  # noqa: F401 - fills FORWARD and BACKWARD

    graph = model.graph
    env: dict[str, Any] = dict(zip(graph.inputs, inputs))
    tape = Tape(model)
    for node in graph.nodes:
        if node.op == "input":
            continue
        if node.op == "param":
            env[node.name] = model.params[node.name]
            continue
        if node.op == "output":
            out_ref = node.args[0]
            if not isinstance(out_ref, Ref):
                raise UnsupportedGradientError("training needs a model with a single tensor output")
            tape.output = out_ref.name
            out = env[out_ref.name]
            if isinstance(out, SecretTensor):
                out.grad_fn = tape
            return out, tape
        args, attrs = _value(env, node.args), _value(env, node.attrs)
        rule = FORWARD.get(node.op)
        if rule is not None:
            out, ctx = rule(*args, **attrs)
        else:
            out, ctx = IMPLEMENTATIONS[node.op](*args, **attrs), {"args": args}
        for index, value in ctx.pop("updates", {}).items():  # state a forward moves (running statistics)
            ref = node.args[index]
            if isinstance(ref, Ref) and ref.name in model.params:
                model.params[ref.name] = value
        env[node.name] = out
        tape.ctx[node.name] = ctx
        tape.values[node.name] = out
    raise UnsupportedGradientError("graph without output")


def _requires_grad(tape: Tape) -> set[str]:
    """Nodes whose value depends on a parameter (their gradients are needed)."""
    need: set[str] = set()
    for n in tape.model.graph.nodes:
        if n.op == "param" or (n.op not in NO_GRAD_OPS and any(r in need for r in n.refs())):
            need.add(n.name)
    return need


def _accumulate(grads: dict[str, Any], name: str, g: Any) -> None:
    grads[name] = g if name not in grads else grads[name] + g


def backward(tape: Tape, grad: SecretTensor, *, start: str | None = None) -> dict[str, SecretTensor]:
    """Gradients of every parameter, given ``grad`` = dLoss/d(value of node ``start``) (default: the
    output). Returns ``{param name: secret gradient}``."""
    graph = tape.model.graph
    need = _requires_grad(tape)
    grads: dict[str, Any] = {start or tape.output: grad}
    by_name = {n.name: n for n in graph.nodes}
    order = [n for n in graph.nodes if n.op not in ("input", "output", "param")]
    begin = start or tape.output
    names = [n.name for n in order]
    if begin not in names:
        raise UnsupportedGradientError(f"no node {begin!r} to start the backward pass from")
    for node in reversed(order[:names.index(begin) + 1]):
        g = grads.pop(node.name, None)
        if g is None or node.name not in need:
            continue
        rule = BACKWARD.get(node.op)
        if rule is None:
            raise UnsupportedGradientError(f"node {node.name!r}: no backward pass for op {node.op!r} on shares")
        wanted = [isinstance(a, Ref) and a.name in need for a in node.args]
        outs = rule(tape.ctx[node.name], g, wanted, **_value(tape.values | _params(tape), node.attrs))
        for arg, want, ga in zip(node.args, wanted, outs):
            if want and ga is not None:
                _accumulate(grads, arg.name, ga)
        _cat_list_grads(node, outs, grads, need)
    return {k: v for k, v in grads.items() if by_name[k].op == "param"}


def _params(tape: Tape) -> dict[str, Any]:
    return dict(tape.model.params)


def _cat_list_grads(node: Node, outs: Sequence[Any], grads: dict[str, Any], need: set[str]) -> None:
    """``cat`` takes a list of tensors as its one operand: spread its gradient parts."""
    if node.op != "cat" or not node.args or not isinstance(node.args[0], (list, tuple)):
        return
    for ref, ga in zip(node.args[0], outs[0] if outs else ()):
        if isinstance(ref, Ref) and ref.name in need and ga is not None:
            _accumulate(grads, ref.name, ga)


# ---- helpers -------------------------------------------------------------------------------------
def times_bit(g: SecretTensor, bit: torch.Tensor) -> SecretTensor:
    """``g * b`` for a secret 0/1 integer share ``b`` (not fixed point): one Beaver round, no truncation."""
    return g._new(g.protocol.bilinear(g.share, bit, "mul", {}))


def unbroadcast(g: Any, shape: Sequence[int]) -> Any:
    """Sum ``g`` over the dimensions that broadcasting added to an operand of ``shape``."""
    shape = tuple(shape)
    while g.dim() > len(shape):
        g = g.sum(0)
    dims = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1)
    return g.sum(dims, keepdim=True) if dims else g


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else ()


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _products(want: Sequence[bool], items: Sequence[tuple[Any, Any, str, dict[str, Any]]]) -> list[Any]:
    """The wanted ones of independent products, in one round (see veil.mpc.tensor.products)."""
    from veil.mpc.products import products

    chosen = [item for w, item in zip(want, items) if w]
    got = iter(products(chosen))
    return [next(got) if w else None for w in want]
