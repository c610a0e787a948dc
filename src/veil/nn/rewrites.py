"""Graph rewrites that save work on shares without changing results.

* :func:`fold_batch_norms`: BatchNorm after Conv2d, or after a Linear whose output is known to be 2-D,
  is folded into that layer's weight and bias (running statistics);
* :func:`pool_before_activation`: a monotone activation (ReLU, Sigmoid, Tanh) followed by a max-pool
  is computed after the pool: ``maxpool(relu(x)) == relu(maxpool(x))``, on 4x fewer elements for a
  2x2 pool.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.nn.graph import Graph, Node, Ref, unique_name

MONOTONE = ("relu", "sigmoid", "tanh")


def _replace_uses(graph: Graph, old: str, new: Any) -> None:
    def sub(v: Any) -> Any:
        if isinstance(v, Ref) and v.name == old:
            return new
        if isinstance(v, (tuple, list)):
            return type(v)(sub(x) for x in v)
        return v

    for n in graph.nodes:
        n.args = tuple(sub(a) for a in n.args)
        n.attrs = {k: sub(v) for k, v in n.attrs.items()}


SAME_RANK = frozenset({"linear", "batch_norm", "relu", "sigmoid", "tanh", "softmax", "log_softmax", "neg",
                       "identity"})


def known_rank(graph: Graph, value: Any) -> int | None:
    """The number of dimensions of ``value`` where the graph alone says it (after a flatten or a
    reshape, through layers that keep the rank), else None (e.g. a graph input)."""
    while isinstance(value, Ref):
        node = graph.node(value.name)
        if node.op == "flatten":
            start, end = node.attrs.get("start_dim", 0), node.attrs.get("end_dim", -1)
            return start + 1 if end == -1 and start >= 0 else None
        if node.op == "reshape":
            shape = node.args[1] if len(node.args) > 1 else node.attrs.get("shape")
            return len(shape) if isinstance(shape, (list, tuple)) else None  # sizes may be Refs
        if node.op not in SAME_RANK:
            return None
        value = node.args[0]
    return None


def fold_batch_norms(graph: Graph, values: dict[str, torch.Tensor]) -> tuple[Graph, dict[str, torch.Tensor]]:
    """Fold each ``batch_norm`` that reads a Linear/Conv2d output (used nowhere else) into that layer:
    ``W' = W * scale`` per output channel, ``b' = b * scale + shift``. BatchNorm normalises dimension
    1 and a Linear maps the last one: the two are the same only for 2-D outputs, so a Linear is
    folded only where its input is known to be 2-D (a BatchNorm1d on ``(N, C, L)`` stays as it is)."""
    values = dict(values)
    for bn in [n for n in graph.nodes if n.op == "batch_norm"]:
        src_ref = bn.args[0]
        if not isinstance(src_ref, Ref):
            continue
        src = graph.node(src_ref.name)
        if src.op not in ("linear", "conv2d") or len(graph.users(src.name)) != 1:
            continue
        if src.op == "linear" and known_rank(graph, src.args[0]) != 2:
            continue
        w_ref, b_ref = src.args[1], src.args[2]
        if not isinstance(w_ref, Ref) or len(graph.users(w_ref.name)) != 1:
            continue
        if b_ref is not None and (not isinstance(b_ref, Ref) or len(graph.users(b_ref.name)) != 1):
            continue
        scale, shift = values[bn.args[1].name].double(), values[bn.args[2].name].double()
        w = values[w_ref.name].double()
        values[w_ref.name] = (w * scale.reshape(-1, *([1] * (w.dim() - 1)))).float()
        old_b = values[b_ref.name].double() if b_ref is not None else torch.zeros_like(scale)
        new_b = (old_b * scale + shift).float()
        if b_ref is None:
            name = unique_name(f"{src.name}_bias", (n.name for n in graph.nodes))
            graph.nodes.insert(graph.nodes.index(src), Node(name, "param", (), {"shape": list(new_b.shape)}))
            src.args = (src.args[0], w_ref, Ref(name))
            values[name] = new_b
        else:
            values[b_ref.name] = new_b
        for ref in (w_ref, b_ref):  # folded values are no longer the module's state_dict entries
            if ref is not None:
                graph.node(ref.name).attrs.pop("key", None)
        _replace_uses(graph, bn.name, Ref(src.name))
        graph.nodes.remove(bn)
    return graph.without_unused(), values


def pool_before_activation(graph: Graph) -> Graph:
    """``maxpool(f(x))`` -> ``f(maxpool(x))`` for monotone ``f`` whose only user is the pool."""
    for pool in [n for n in graph.nodes if n.op == "max_pool2d"]:
        src = pool.args[0]
        if not isinstance(src, Ref):
            continue
        act = graph.node(src.name)
        if act.op not in MONOTONE or len(graph.users(act.name)) != 1:
            continue
        # act: f(x) at act's position, pool: maxpool(act). Swap what the two nodes compute, keep names:
        # act becomes maxpool(x) and pool becomes f(act); pool's users are unchanged.
        f = act.op
        act.op, act.attrs = "max_pool2d", dict(pool.attrs)
        pool.op, pool.attrs = f, {}
    return graph
