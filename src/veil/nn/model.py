"""SecureModel: a public graph and its parameters, in the clear (model owner) or secret-shared.

    model = veil.nn.from_torch(torch_module)             # the model owner, no session needed
    net = veil.nn.share_model(session, model if i_own_it else None, owner="bob")
    logits = net(session.share(images if ..., owner="alice"))   # SecretTensor
    logits.reveal(to="alice")

``share_model`` sends the graph (architecture, no weights) from the owner to the other compute party,
then secret-shares all parameters in one sharing. The other party learns the architecture and the
parameter shapes, never a parameter value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from veil.mpc.tensor import SecretTensor
from veil.nn.graph import Graph, GraphError, Ref
from veil.nn.ops import IMPLEMENTATIONS

if TYPE_CHECKING:
    from veil.mpc.session import Session
    from veil.nn.optim import Parameter

Value = torch.Tensor | SecretTensor


class SecureModel:
    """A converted model. Call it on inputs: plaintext tensors give a plaintext run of the same
    program (what the tests compare with the original module), SecretTensors a secure run."""

    def __init__(self, graph: Graph, params: Mapping[str, Value]) -> None:
        graph.validate()
        expected = graph.params
        if set(params) != set(expected):
            missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
            raise GraphError(f"parameters do not match the graph: missing {missing}, unexpected {extra}")
        for name, shape in expected.items():
            if tuple(params[name].shape) != shape:
                raise GraphError(f"parameter {name!r} has shape {tuple(params[name].shape)}, the graph says {shape}")
        self.graph = graph
        self.params = dict(params)
        self.grads: dict[str, SecretTensor] = {}
        self.training = False
        self.bn_steps = 0  # training forwards run (PyTorch's BatchNorm num_batches_tracked)
        self._last_use = _last_uses(graph)

    @property
    def shared(self) -> bool:
        return any(isinstance(v, SecretTensor) for v in self.params.values())

    @property
    def binary_threshold(self) -> float:
        """Where a one-output (binary) classifier's decision flips: 0.5 after a final sigmoid (a
        probability), else 0 (a logit)."""
        out = self.graph.nodes[-1].args[0]
        last = self.graph.node(out.name).op if isinstance(out, Ref) else ""
        return 0.5 if last == "sigmoid" else 0.0

    def __call__(self, *inputs: Any) -> Any:
        return self.forward(*inputs)

    def forward(self, *inputs: Any) -> Any:
        if self.training and self.shared:
            from veil.nn.autodiff import forward

            self.bn_steps += 1
            return forward(self, *inputs)[0]
        names = self.graph.inputs
        if len(inputs) != len(names):
            raise TypeError(f"the model takes {len(names)} input(s) ({names}), got {len(inputs)}")
        env: dict[str, Any] = dict(zip(names, inputs))

        def value(v: Any) -> Any:
            if isinstance(v, Ref):
                return env[v.name]
            if isinstance(v, (tuple, list)):
                return type(v)(value(x) for x in v)
            return v

        for i, node in enumerate(self.graph.nodes):
            if node.op == "input":
                continue
            if node.op == "param":
                env[node.name] = self.params[node.name]
                continue
            if node.op == "output":
                return value(node.args[0])
            env[node.name] = IMPLEMENTATIONS[node.op](*value(node.args), **value(node.attrs))
            for name in self._last_use.get(i, ()):  # free activations nobody reads again
                if name not in self.params:
                    env.pop(name, None)
        raise GraphError("graph without output")  # validate() prevents this

    # ---- training ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> SecureModel:
        """Training mode: forward passes keep what the backward pass needs (see veil.nn.autodiff)."""
        self.training = bool(mode)
        return self

    def eval(self) -> SecureModel:
        return self.train(False)

    def parameters(self) -> list[Parameter]:
        """The parameters as torch-style handles (``.data``, ``.grad``) for the optimizers."""
        from veil.nn.optim import Parameter

        return [Parameter(self, n.name) for n in self.graph.nodes if n.op == "param" and not n.attrs.get("buffer")]

    def named_parameters(self) -> list[tuple[str, Parameter]]:
        return [(p.name, p) for p in self.parameters()]

    def accumulate_grads(self, grads: Mapping[str, SecretTensor]) -> None:
        for name, g in grads.items():
            self.grads[name] = g if name not in self.grads else self.grads[name] + g

    def zero_grad(self) -> None:
        self.grads.clear()

    def reveal_state_dict(self, *, to: str | Sequence[str]) -> dict[str, torch.Tensor] | None:
        """Open the parameters to the named parties, keyed as the original module's ``state_dict``
        (parameters without a module key, e.g. folded ones, keep their graph names). The other
        parties get None. One round for all parameters."""
        if not self.shared:
            raise ValueError("the parameters are not secret-shared: use state_dict()")
        names = list(self.graph.params)
        if not names:
            return {}
        from veil.mpc.tensor import cat

        flat = cat([self.params[n].reshape(-1) for n in names])  # type: ignore[misc]
        opened = flat.reveal(to=to)
        if opened is None:
            return None
        out, off = {}, 0
        for n in names:
            node = self.graph.node(n)
            shape = tuple(node.attrs["shape"])
            size = math.prod(shape)
            out[node.attrs.get("key", n)] = opened[off:off + size].reshape(shape).float()
            off += size
        for node in self.graph.nodes:  # PyTorch's BatchNorm also keeps a (public) step counter
            if node.op == "batch_norm_train" and node.attrs.get("prefix"):
                out[f"{node.attrs['prefix']}.num_batches_tracked"] = torch.tensor(self.bn_steps, dtype=torch.long)
        return out

    def share(self, session: Session, *, owner: str) -> SecureModel:
        """Secret-share this model from ``owner`` (see :func:`share_model`)."""
        return share_model(session, self, owner=owner)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plaintext parameters (only before sharing)."""
        if self.shared:
            raise ValueError("the parameters are secret-shared; reveal them to a party to get a state_dict")
        return {k: v.clone() for k, v in self.params.items()}  # type: ignore[union-attr]

    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.graph.params.values())

    def __repr__(self) -> str:
        state = "secret-shared" if self.shared else "plaintext"
        return f"SecureModel({len(self.graph.nodes)} nodes, {self.num_parameters()} parameters, {state})"


def _last_uses(graph: Graph) -> dict[int, list[str]]:
    """Node index -> names whose last reader is that node."""
    last: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        for r in n.refs():
            last[r] = i
    out: dict[int, list[str]] = {}
    for name, i in last.items():
        out.setdefault(i, []).append(name)
    return out


def share_model(session: Session, model: SecureModel | torch.nn.Module | None, *, owner: str,
                expect: Graph | None = None, training: bool = False) -> SecureModel:
    """Secret-share a model held by ``owner``; the other compute party passes ``None``.

    The owner sends the graph (public architecture) and shares every parameter. The other party may
    pass ``expect`` (an architecture it agreed to run): a different graph is refused. ``training``:
    convert a torch module for training (``from_torch(module, training=True)``) and return the shared
    model in training mode.
    """
    from veil.net.transport import PartyError
    from veil.nn.convert import from_torch

    if owner not in session.parties:
        raise ValueError(f"owner {owner!r} is not a compute party of this session {list(session.parties)}")
    if session.party == owner:
        if model is None:
            raise ValueError(f"{session.party} owns the model but passed none")
        if isinstance(model, torch.nn.Module):
            model = from_torch(model, training=training)
        if model.shared:
            raise ValueError("this model is already secret-shared")
        graph = model.graph
        session.transport.send(session.peer, graph.to_json())
        plain = model.state_dict()
        flat = torch.cat([plain[k].detach().reshape(-1).double() for k in graph.params]) \
            if graph.params else torch.zeros(0, dtype=torch.float64)
        shared = session.share(flat.float(), owner=owner)
    else:
        if model is not None:
            raise ValueError(f"{session.party} does not own the model ({owner!r} does): pass None")
        try:
            graph = Graph.from_json(session.transport.recv(owner))
        except GraphError as e:
            raise PartyError(f"{session.party}: the model graph from {owner!r} is refused: {e}") from None
        total = sum(math.prod(s) for s in graph.params.values())
        shared = session.share(None, owner=owner, shape=(total,))
    if expect is not None and expect.to_json() != graph.to_json():
        raise ValueError(f"{session.party}: {owner!r} sent a different architecture than expected")
    params: dict[str, SecretTensor] = {}
    off = 0
    for name, shape in graph.params.items():
        n = math.prod(shape)
        params[name] = shared[off:off + n].reshape(tuple(shape))
        off += n
    return SecureModel(graph, params).train(training)
