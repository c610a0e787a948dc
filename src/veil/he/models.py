"""HE-friendly networks: what CKKS can evaluate, and the conversion of a ``torch.nn.Module`` into it.

CKKS computes additions and multiplications on encrypted real numbers, a bounded number of
multiplications deep. So a network it can evaluate is a chain of

* **affine layers**: ``Conv2d`` (any stride and padding, no groups or dilation), ``Linear``,
  ``AvgPool2d``, ``Flatten`` and ``BatchNorm`` (folded into the layer before it), each one a matrix
  and a bias on the flattened activations;
* **polynomial activations**: :class:`Square` (``x^2``) or :class:`Poly` (``a x^2 + b x``, trained).

ReLU, max-pooling, softmax and the like are refused with a message naming the layer: train with
:func:`he_lenet` (or your own module made of the layers above) instead. :func:`to_plan` turns a
module into a :class:`Plan` (dense matrices and polynomials), which the encrypted evaluators run
and which :func:`run_plan` evaluates in plaintext, the reference the tests hold decryptions to.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from veil.files import missing_file_problem, torch_load_problem


class HEError(ValueError):
    """A model, key, parameter set or ciphertext that homomorphic evaluation cannot take."""


class Square(nn.Module):
    """``x^2``: the activation of CryptoNets (one multiplicative level)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Poly(nn.Module):
    """``a x^2 + b x`` with trained ``a`` and ``b`` (one multiplicative level); starts near
    ``0.1 x^2 + 0.5 x``, a fit of ReLU on [-2, 2]."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.1))
        self.b = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x * x + self.b * x


def he_lenet(channels: int = 8, hidden: int = 100, activation: str = "square", *, side: int = 28,
             classes: int = 10, kernel: int = 5, stride: int = 2) -> nn.Sequential:
    """conv ``channels``@``kernel``x``kernel`` with ``stride`` - act - fc ``hidden`` - act - fc ``classes``,
    on ``(N, 1, side, side)`` images in [0, 1]. The defaults are the CryptoNets shape for MNIST, wider.
    BatchNorm after each linear layer keeps the squares in range while training; it is folded away by
    :func:`to_plan`."""
    act = {"square": Square, "poly": Poly}.get(activation)
    if act is None:
        raise HEError(f"activation must be 'square' or 'poly', got {activation!r}")
    out = (side - kernel) // stride + 1
    if out < 1:
        raise HEError(f"a {kernel}x{kernel} kernel does not fit {side}x{side} images")
    return nn.Sequential(
        nn.Conv2d(1, channels, kernel, stride=stride), nn.BatchNorm2d(channels), act(), nn.Flatten(),
        nn.Linear(channels * out * out, hidden), nn.BatchNorm1d(hidden), act(), nn.Linear(hidden, classes))


@dataclass
class Affine:
    """``y = W x + b`` on flattened activations; ``source`` names the layers it came from."""

    weight: torch.Tensor  # (out, in), float64
    bias: torch.Tensor  # (out,)
    source: str
    conv: dict | None = None  # for a first Conv2d: in_shape, kernel, stride, padding, channels

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight.shape[0]), int(self.weight.shape[1])


@dataclass
class Activation:
    """``y = a x^2 + b x`` elementwise."""

    a: float
    b: float
    source: str


@dataclass
class Plan:
    input_shape: tuple[int, ...]
    steps: list[Affine | Activation] = field(default_factory=list)

    @property
    def depth(self) -> int:
        """Multiplicative levels used (one per affine layer, one per activation)."""
        return len(self.steps)

    @property
    def outputs(self) -> int:
        last = [s for s in self.steps if isinstance(s, Affine)][-1]
        return last.shape[0]


@torch.no_grad()
def to_plan(model: nn.Module, input_shape: tuple[int, ...]) -> Plan:
    """The :class:`Plan` of ``model`` (evaluated on one input of ``input_shape``, e.g. (1, 28, 28))."""
    model = copy.deepcopy(model).eval().double().cpu()  # the caller's model stays as it was
    layers = list(model) if isinstance(model, nn.Sequential) else [model]
    layers = _flatten_sequentials(layers)
    plan = Plan(tuple(input_shape))
    shape = tuple(input_shape)
    pending: Affine | None = None
    for i, layer in enumerate(layers):
        name = f"layer {i} ({type(layer).__name__})"
        if isinstance(layer, nn.Conv2d | nn.Linear | nn.AvgPool2d | nn.Flatten | nn.BatchNorm1d | nn.BatchNorm2d
                      | nn.Identity | nn.Dropout):
            if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.dilation != (1, 1)
                                                 or layer.padding_mode != "zeros"):
                raise HEError(f"{name}: grouped, dilated or non-zero-padded convolutions are not supported")
            if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d) and pending is None:
                raise HEError(f"{name}: a BatchNorm must follow an affine layer to be folded into it")
            w, b, out_shape = _affine_of(layer, shape)
            conv = None
            if isinstance(layer, nn.Conv2d) and pending is None and not plan.steps:
                conv = {"in_shape": list(shape), "kernel": list(layer.kernel_size), "stride": list(layer.stride),
                        "padding": list(layer.padding), "channels": int(layer.out_channels)}
            if pending is None:
                pending = Affine(w, b, name, conv)
            else:  # compose with the affine layers before it
                pending = Affine(w @ pending.weight, w @ pending.bias + b, f"{pending.source} + {name}",
                                 pending.conv if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d | nn.Identity
                                                                  | nn.Dropout | nn.Flatten) else None)
            shape = out_shape
        elif isinstance(layer, Square | Poly):
            if pending is None:
                raise HEError(f"{name}: an activation must follow an affine layer")
            plan.steps.append(pending)
            pending = None
            a, b = (1.0, 0.0) if isinstance(layer, Square) else (float(layer.a), float(layer.b))
            plan.steps.append(Activation(a, b, name))
        else:
            raise HEError(f"{name}: homomorphic encryption cannot evaluate {type(layer).__name__}; use "
                          "Conv2d/Linear/AvgPool2d/Flatten/BatchNorm and Square or Poly activations "
                          "(veil.he.models.he_lenet)")
    if pending is None:
        raise HEError("the model must end with an affine layer (the logits)")
    plan.steps.append(pending)
    return plan


def _flatten_sequentials(layers: list[nn.Module]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for layer in layers:
        out.extend(_flatten_sequentials(list(layer)) if isinstance(layer, nn.Sequential) else [layer])
    return out


def _affine_of(layer: nn.Module, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """The matrix and bias of an affine layer on flattened inputs of ``shape`` (by probing it)."""
    n = 1
    for d in shape:
        n *= d
    try:
        zero = layer(torch.zeros((1, *shape), dtype=torch.float64))
        basis = layer(torch.eye(n, dtype=torch.float64).reshape(n, *shape))
    except RuntimeError as e:
        raise HEError(f"{type(layer).__name__} does not take inputs of shape {shape}: {e}") from None
    out_shape = tuple(zero.shape[1:])
    bias = zero.reshape(-1)
    weight = (basis.reshape(n, -1) - bias).T.contiguous()
    return weight, bias, out_shape


@torch.no_grad()
def run_plan(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """Plaintext evaluation of a plan on ``(N, *input_shape)``: the reference for decryptions."""
    h = x.reshape(len(x), -1).double()
    for step in plan.steps:
        if isinstance(step, Affine):
            h = h @ step.weight.T + step.bias
        else:
            h = step.a * h * h + step.b * h
    return h


def train_he_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10, batch_size: int = 128,
                   lr: float = 3e-3, clip: float = 1.0, progress: bool = True) -> nn.Module:
    """The recipe for polynomial networks (:func:`veil.nn.zoo.train_plaintext`): Adam with a one-cycle
    schedule and gradient clipping (squares blow up without it), inputs in [0, 1]."""
    import math

    from veil.nn.zoo import train_plaintext

    losses = train_plaintext(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, progress=progress,
                             schedule="one-cycle", max_grad_norm=clip)
    if not all(math.isfinite(v) for v in losses):
        raise HEError("training diverged (the squares overflowed): lower lr or clip")
    return model.eval()


# ---- model files ----------------------------------------------------------------------------------
MODEL_FORMAT = "veil-he-model"


def save_he_model(model: nn.Module, path: str | Path, *, input_shape: tuple[int, ...], config: dict[str, Any],
                  metrics: dict[str, Any] | None = None) -> Path:
    """A model file the server loads (:func:`load_he_model`): the ``state_dict``, the constructor
    arguments of :func:`he_lenet` (``config``) and the input shape; atomically, readable with
    ``torch.load(weights_only=True)`` (no code runs)."""
    from veil.files import atomic_writer

    content = {"format": MODEL_FORMAT, "version": 1, "arch": "he_lenet", "config": dict(config),
               "input_shape": [int(d) for d in input_shape], "metrics": dict(metrics or {}),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_writer(path) as f:
        torch.save(content, f)
    return Path(path)


def load_he_model(path: str | Path, *, architecture: str | None = None,
                  input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, tuple[int, ...], dict[str, Any]]:
    """``(module, input_shape, metrics)`` of a :func:`save_he_model` file, or of a plain ``state_dict``
    with ``architecture`` (``package.module:Class``, built without arguments) and ``input_shape``."""
    path = Path(path)
    problem = missing_file_problem(path, "model file")
    if problem:
        raise HEError(problem)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad file
        raise HEError(f"{path}: not a PyTorch weights file ({torch_load_problem(e)})") from None
    if isinstance(content, dict) and content.get("format") == MODEL_FORMAT:
        if content.get("arch") != "he_lenet":
            raise HEError(f"{path}: unknown architecture {content.get('arch')!r}")
        try:
            module = he_lenet(**content["config"])
        except TypeError as e:
            raise HEError(f"{path}: malformed he_lenet config {content.get('config')!r}: {e}") from None
        state, shape, metrics = content["state_dict"], tuple(content["input_shape"]), content.get("metrics", {})
    elif isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values()):
        if architecture is None or input_shape is None:
            raise HEError(f"{path}: a plain state_dict: give its architecture ('package.module:Class') and "
                          "the input shape (e.g. 1,28,28)")
        from veil.nn.infer import resolve_architecture

        module, state, shape, metrics = resolve_architecture(architecture), content, tuple(input_shape), {}
    else:
        raise HEError(f"{path}: neither a Veil HE model file nor a state_dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise HEError(f"{path}: the weights do not fit the architecture: {str(e)[:300]}") from None
    return module.eval(), shape, metrics


# ---- the public part of a plan: what a client may know ---------------------------------------------
def describe(plan: Plan) -> dict[str, Any]:
    """The architecture of ``plan`` without its weights or activation coefficients: the input shape,
    each affine layer's shape (and the first convolution's geometry), where the activations are. The
    client needs this (not the weights) to lay out its image and to make rotation keys."""
    steps: list[dict[str, Any]] = []
    for s in plan.steps:
        if isinstance(s, Affine):
            steps.append({"affine": list(s.shape), **({"conv": s.conv} if s.conv is not None else {})})
        else:
            steps.append({"activation": True})
    return {"input_shape": list(plan.input_shape), "steps": steps, "depth": plan.depth, "outputs": plan.outputs}


def skeleton(description: dict[str, Any]) -> Plan:
    """A :class:`Plan` of :func:`describe`'s shape with zero weights: enough for the client's layout
    and rotation steps, useless for inference."""
    try:
        plan = Plan(tuple(int(d) for d in description["input_shape"]))
        for i, s in enumerate(description["steps"]):
            if "affine" in s:
                m, n = (int(v) for v in s["affine"])
                plan.steps.append(Affine(torch.zeros(m, n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64),
                                         f"step {i}", s.get("conv")))
            else:
                plan.steps.append(Activation(1.0, 0.0, f"step {i}"))
    except (KeyError, TypeError, ValueError) as e:
        raise HEError(f"malformed model description ({type(e).__name__}: {e})") from None
    if not plan.steps or not isinstance(plan.steps[0], Affine) or not isinstance(plan.steps[-1], Affine):
        raise HEError("malformed model description: it must start and end with an affine layer")
    return plan
