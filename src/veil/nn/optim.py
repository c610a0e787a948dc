"""Optimizers on shares, with ``torch.optim``'s call shapes: ``opt = SGD(model.parameters(), lr=0.1)``,
``opt.zero_grad()``, ``loss.backward()``, ``opt.step()``. Parameters, gradients and optimizer state
(momentum buffers, Adam's moments) stay secret-shared; hyperparameters are public.

* :class:`SGD`: momentum, dampening, Nesterov and weight decay exactly as ``torch.optim.SGD``;
  every step is local (products by public scalars, then truncation): no communication.
* :class:`Adam`: ``torch.optim.Adam``'s moments with the update ``lr * m_hat / sqrt(v_hat + eps^2)``
  (eps inside the root: one inverse square root on shares instead of a square root and a
  reciprocal; the two agree to within ``lr / 2`` per coordinate only where ``|g|`` is near ``eps``, and
  closely elsewhere). :func:`adam_reference` is the same rule in plaintext, for comparisons. In 16-bit
  fixed point a gradient of 1e-3 squares to 1e-6, below the resolution (1.5e-5), so the moments are
  kept for the gradient times the public scale ``s = 2^-3 / eps``, which leaves the update
  unchanged: ``eps s = 2^-3``. The inverse square root covers ``[2^-6, 2^18]`` (see
  :func:`adam_ratio_parts`, relative error 1.2e-3), so the update equals PyTorch's (with the same
  ``eps``, inside the root) for gradients up to ``4096 eps`` in magnitude (4 at the default ``eps``); beyond, the
  moments saturate. The default ``eps`` is 1e-3 (PyTorch's 1e-8 is below what 16 fractional bits
  resolve). The moments are stored multiplied by 2^6 (m) and 2^12 (v): ``(1 - beta2) g^2`` alone would
  be about one unit of 16-bit fixed point and lose its precision at every step. One step: 1 + 5 + 23
  + 1 rounds for all parameters together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from veil.mpc.tensor import SecretTensor

ADAM_EPS_SCALED = 2.0**-3  # eps times the gradient scale
ADAM_M_GAIN, ADAM_V_GAIN = 2.0**6, 2.0**12  # the moments' state is kept multiplied by these


class Parameter:
    """A secret parameter of a model, torch-style: ``.data`` (SecretTensor) and ``.grad``."""

    def __init__(self, owner: Any, name: str) -> None:
        self._owner, self.name = owner, name

    @property
    def data(self) -> SecretTensor:
        return self._owner.params[self.name]  # type: ignore[no-any-return]

    @data.setter
    def data(self, value: SecretTensor) -> None:
        self._owner.params[self.name] = value

    @property
    def grad(self) -> SecretTensor | None:
        return self._owner.grads.get(self.name)  # type: ignore[no-any-return]

    @grad.setter
    def grad(self, value: SecretTensor | None) -> None:
        if value is None:
            self._owner.grads.pop(self.name, None)
        else:
            self._owner.grads[self.name] = value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.shape})"


class Optimizer:
    def __init__(self, params: Iterable[Parameter], defaults: dict[str, Any]) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        for p in self.params:
            if not isinstance(p, Parameter) or not isinstance(p.data, SecretTensor):
                raise TypeError(f"optimizers on shares take the secret parameters of a shared model "
                                f"(model.parameters()), got {p!r}")
        self.defaults = defaults
        self.state: dict[str, dict[str, Any]] = {p.name: {} for p in self.params}
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.steps += 1
        for p in self.params:
            if p.grad is not None:
                p.data = self._update(p, p.grad, self.state[p.name])

    def _update(self, p: Parameter, g: SecretTensor, state: dict[str, Any]) -> SecretTensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Secret state (SecretTensors) and public counters, for checkpoints."""
        return {"steps": self.steps, "state": {k: dict(v) for k, v in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.state = {k: dict(v) for k, v in state["state"].items()}


def _check(name: str, value: float, lo: float, hi: float | None = None) -> float:
    if not lo <= value or (hi is not None and not value < hi):
        raise ValueError(f"{name}={value} is out of range ({lo} <= {name}{f' < {hi}' if hi is not None else ''})")
    return float(value)


class SGD(Optimizer):
    def __init__(self, params: Iterable[Parameter], *, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        _check("momentum", momentum, 0.0)
        _check("weight_decay", weight_decay, 0.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov})
        self.lr, self.momentum, self.dampening = float(lr), float(momentum), float(dampening)
        self.weight_decay, self.nesterov = float(weight_decay), nesterov

    def _update(self, p: Parameter, g: SecretTensor, state: dict[str, Any]) -> SecretTensor:
        w = p.data
        if self.weight_decay:
            g = g + w * self.weight_decay
        if self.momentum:
            buf = state.get("momentum_buffer")
            buf = g if buf is None else buf * self.momentum + g * (1.0 - self.dampening)
            state["momentum_buffer"] = buf
            g = g + buf * self.momentum if self.nesterov else buf
        return w - g * self.lr


class Adam(Optimizer):
    def __init__(self, params: Iterable[Parameter], *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-3, weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        b1, b2 = _check("betas[0]", betas[0], 0.0, 1.0), _check("betas[1]", betas[1], 0.0, 1.0)
        _check("weight_decay", weight_decay, 0.0)
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.lr, self.b1, self.b2, self.eps, self.weight_decay = float(lr), b1, b2, float(eps), float(weight_decay)
        self.scale = ADAM_EPS_SCALED / self.eps  # public gradient scale: eps * scale = 2^-3

    def step(self) -> None:
        """One update of every parameter with a gradient; the square, the saturation and the inverse
        square root run once on all parameters together (their rounds do not add up per tensor)."""
        from veil.mpc.tensor import cat

        self.steps += 1
        live = [(p, p.grad) for p in self.params if p.grad is not None]
        if not live:
            return
        gs = []
        for p, g in live:
            if self.weight_decay:
                g = g + p.data * self.weight_decay
            gs.append((g * self.scale).reshape(-1))
        flat_g = cat(gs)
        # the moments are kept amplified (m by 2^6, v by 2^12): (1 - beta2) g^2 is ~1e-5 for a scaled
        # gradient of 0.1, a single unit of 16-bit fixed point, and would be lost step after step
        sq = flat_g.square() * ((1 - self.b2) * ADAM_V_GAIN)
        t = self.steps
        m_hats, v_hats, off = [], [], 0
        for (p, _), g in zip(live, gs):
            n = g.numel()
            state = self.state[p.name]
            m, v = state.get("exp_avg"), state.get("exp_avg_sq")
            m = g * ((1 - self.b1) * ADAM_M_GAIN) if m is None else m * self.b1 + g * ((1 - self.b1) * ADAM_M_GAIN)
            v = sq[off:off + n] if v is None else v * self.b2 + sq[off:off + n]
            state["exp_avg"], state["exp_avg_sq"] = m, v
            m_hats.append(m * (1.0 / ((1 - self.b1**t) * ADAM_M_GAIN)))
            v_hats.append(v * (1.0 / ((1 - self.b2**t) * ADAM_V_GAIN)) + ADAM_EPS_SCALED**2)
            off += n
        m_hat, denom = adam_ratio_parts(cat(m_hats), cat(v_hats))
        update = (m_hat * denom) * self.lr
        off = 0
        for p, _ in live:
            n = p.data.numel()
            p.data = p.data - update[off:off + n].reshape(p.shape)
            off += n


def adam_ratio_parts(m: SecretTensor, v: SecretTensor) -> tuple[SecretTensor, SecretTensor]:
    """``(m', rsqrt(v'))`` for scaled moments, ``v >= 2^-6``: ``v`` saturated at ``2^18`` and ``m`` at
    ``+-2^9``, and the inverse square root on two octave ranges with one Goldschmidt run: one sign-bit
    call tells ``b = [v < 2^6]`` and saturates (5 rounds), ``v' = v`` or ``v 2^-12`` lands in
    ``[2^-6, 2^6]``, ``rsqrt(v')`` (23 rounds) is scaled back by ``1`` or ``2^-6`` (1 round)."""
    proto = v.protocol
    mid, top, m_top = 2.0**6, 2.0**18, 2.0**9
    x_mid, x_top = (v - mid).share, (v - top).share
    x_mlo, x_mhi = (m + m_top).share, (m - m_top).share
    flat = torch.cat([x_mid.reshape(-1), x_top.reshape(-1), x_mlo.reshape(-1), x_mhi.reshape(-1)])
    ys = torch.cat([v.share.reshape(-1), x_top.reshape(-1), x_mlo.reshape(-1), x_mhi.reshape(-1)])
    bits, (prod,) = proto.msb(flat, [ys])
    n = v.numel()
    b_low = bits[:n].reshape(v.shape)  # [v < 2^6], integer 0/1 shares
    v_low = v._new(prod[:n].reshape(v.shape))  # v * b_low
    relu_top = v._new((x_top.reshape(-1) - prod[n:2 * n]).reshape(v.shape))
    v_sat = v - relu_top
    relu_lo = m._new((x_mlo.reshape(-1) - prod[2 * n:3 * n]).reshape(m.shape))
    relu_hi = m._new((x_mhi.reshape(-1) - prod[3 * n:]).reshape(m.shape))
    m_sat = relu_lo - relu_hi - m_top
    scaled = v_sat * 2.0**-12 + v_low * (1 - 2.0**-12)  # v (b = 1) or v 2^-12 (b = 0)
    r = scaled.rsqrt(domain=(ADAM_EPS_SCALED**2, mid))
    back = r * 2.0**-6 + r._new(proto.bilinear(r.share, b_low, "mul", {})) * (1 - 2.0**-6)
    return m_sat, back


def saturate(items: list[tuple[SecretTensor, float, float]]) -> list[SecretTensor]:
    """``x.clamp(lo, hi)`` for several secrets with their own public bounds, in one sign-bit call
    (5 rounds for all): ``lo + relu(x - lo) - relu(x - hi)``."""
    first = items[0][0]
    parts = [torch.stack([(x - lo).share, (x - hi).share]).reshape(-1) for x, lo, hi in items]
    flat = torch.cat(parts)
    _, (prod,) = first.protocol.msb(flat, [flat])
    relus = flat - prod
    out, off = [], 0
    for x, lo, _hi in items:
        n = x.numel()
        r_lo, r_hi = relus[off:off + n].reshape(x.shape), relus[off + n:off + 2 * n].reshape(x.shape)
        out.append(x._new(r_lo - r_hi) + lo)
        off += 2 * n
    return out


def adam_reference(params: Iterable[Any], grads: Iterable[Any], state: dict[int, dict[str, Any]], *, step: int,
                   lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-3,
                   weight_decay: float = 0.0) -> None:
    """The update rule of :class:`Adam` on plaintext tensors (in place), for tests and comparisons."""
    b1, b2 = betas
    for i, (p, g) in enumerate(zip(params, grads)):
        if weight_decay:
            g = g + weight_decay * p
        st = state.setdefault(i, {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        m_hat, v_hat = st["m"] / (1 - b1**step), st["v"] / (1 - b2**step)
        p -= lr * m_hat / torch.sqrt(v_hat + eps**2)

