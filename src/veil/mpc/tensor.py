"""SecretTensor: what users hold — this party's share of a secret fixed-point tensor.

Linear operations (add, sub, scaling by public integers, reshape, indexing, cat...) are local; the
rest goes through the session's protocol. Shape methods follow PyTorch. Printing a SecretTensor
shows its shape and owner, never a value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from veil.ring import extra_fraction_bits

if TYPE_CHECKING:
    from veil.mpc.session import Session

def _is_integral(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dtype != torch.bool


class SecretTensor:
    __slots__ = ("dtype", "grad_fn", "owner", "session", "share")
    __hash__ = object.__hash__
    # numpy scalars and arrays on the left (``np.float64(2) * x``) defer to our reflected operators
    __array_ufunc__ = None
    __array_priority__ = 1000

    def __init__(self, share: torch.Tensor, session: Session, *, dtype: torch.dtype = torch.float32,
                 owner: str | None = None) -> None:
        if share.dtype != torch.int64:
            raise TypeError(f"a share is a torch.int64 ring tensor, got {share.dtype}")
        self.share = share
        self.session = session
        self.dtype = dtype
        self.owner = owner
        self.grad_fn: Any = None  # set by veil.nn on a training forward's output: how to run backward

    # ---- bookkeeping -----------------------------------------------------------------------
    def _new(self, share: torch.Tensor) -> SecretTensor:
        return SecretTensor(share, self.session, dtype=self.dtype)

    @property
    def protocol(self) -> Any:
        return self.session.protocol

    @property
    def frac_bits(self) -> int:
        return self.session.fixed_point.frac_bits

    @property
    def shape(self) -> torch.Size:
        return self.share.shape

    def size(self, dim: int | None = None) -> Any:
        return self.share.size() if dim is None else self.share.size(dim)

    def dim(self) -> int:
        return self.share.dim()

    def numel(self) -> int:
        return self.share.numel()

    def __len__(self) -> int:
        return len(self.share)

    @property
    def device(self) -> torch.device:
        return self.share.device

    def to(self, device: torch.device | str) -> SecretTensor:
        return self._new(self.share.to(device))

    def __repr__(self) -> str:
        owner = f", owner={self.owner!r}" if self.owner else ""
        return f"SecretTensor(shape={tuple(self.shape)}{owner}, party={self.session.party!r})"

    def __bool__(self) -> bool:
        raise TypeError("the truth value of a SecretTensor is secret; reveal it first "
                        "(x.reveal(to=...)) or use where()")

    def reveal(self, *, to: str | Sequence[str]) -> torch.Tensor | None:
        """Open the value to the named parties only; they get a tensor, the others None."""
        names = [to] if isinstance(to, str) else list(to)
        ring = self.protocol.reveal(self.share, names)
        return None if ring is None else self.session.fixed_point.decode(ring, self.dtype)

    # ---- operands --------------------------------------------------------------------------
    def _encode(self, v: torch.Tensor | float | int) -> torch.Tensor:
        return self.session.fixed_point.encode(torch.as_tensor(v), what="a public operand").to(self.device)

    def _coerce(self, other: Any) -> SecretTensor | torch.Tensor:
        if isinstance(other, SecretTensor):
            if other.session.transport is not self.session.transport:
                raise ValueError("cannot combine SecretTensors of different sessions")
            return other
        return torch.as_tensor(other)

    # ---- linear ----------------------------------------------------------------------------
    def __add__(self, other: Any) -> SecretTensor:
        o = self._coerce(other)
        if isinstance(o, SecretTensor):
            return self._new(self.share + o.share)
        return self._new(self.protocol.add_public(self.share, self._encode(o)))

    __radd__ = __add__

    def __neg__(self) -> SecretTensor:
        return self._new(-self.share)

    def __sub__(self, other: Any) -> SecretTensor:
        o = self._coerce(other)
        return self + (-o)

    def __rsub__(self, other: Any) -> SecretTensor:
        return (-self) + other

    # ---- multiplicative --------------------------------------------------------------------
    def _bilinear(self, other: Any, op: str, **kwargs: Any) -> SecretTensor:
        o = self._coerce(other)
        f = self.frac_bits
        if isinstance(o, SecretTensor):
            z = self.protocol.bilinear(self.share, o.share, op, kwargs)
            from veil.mpc.products import truncate_products

            return self._new(truncate_products(self.session, [z], [op])[0])
        from veil.mpc.material import BILINEAR_OPS

        fn = BILINEAR_OPS[op]
        if _is_integral(o) and op == "mul":
            return self._new(fn(self.share, o.to(torch.int64).to(self.device), **kwargs))
        extra = extra_fraction_bits(o, f) if op == "mul" else 0
        if extra:  # a small factor (1/n of a mean, a division): encoded with as many significant bits as 1
            code = self.session.fixed_point.encode(o.to(torch.float64) * 2.0 ** extra, what="a public operand")
            return self._new(self.protocol.truncate(fn(self.share, code.to(self.device)), f + extra))
        z = fn(self.share, self._encode(o), **kwargs)
        return self._new(self.protocol.truncate(z, f))

    def __mul__(self, other: Any) -> SecretTensor:
        return self._bilinear(other, "mul")

    __rmul__ = __mul__

    def __matmul__(self, other: Any) -> SecretTensor:
        return self._bilinear(other, "matmul")

    def __rmatmul__(self, other: Any) -> SecretTensor:
        from veil.mpc.material import BILINEAR_OPS

        z = BILINEAR_OPS["matmul"](self._encode(torch.as_tensor(other)), self.share)
        return self._new(self.protocol.truncate(z, self.frac_bits))

    def matmul(self, other: Any) -> SecretTensor:
        return self @ other

    def square(self) -> SecretTensor:
        return self._new(self.protocol.truncate(self.protocol.square(self.share), self.frac_bits))

    def __pow__(self, k: int) -> SecretTensor:
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"SecretTensor ** k needs a non-negative integer k, got {k!r}")
        from veil.mpc.approx import power

        return power(self, k)

    def __truediv__(self, other: Any) -> SecretTensor:
        if isinstance(other, SecretTensor):
            return self * other.reciprocal()
        d = torch.as_tensor(other, dtype=torch.float64)
        if bool((d == 0).any()):
            raise ZeroDivisionError("division of a SecretTensor by a public zero")
        return self * (1.0 / d)

    def __rtruediv__(self, other: Any) -> SecretTensor:
        """``other / self``: ``other * self.reciprocal()``, for ``self`` in the reciprocal's default
        domain (as ``x / y`` with a secret ``y``; for another domain use ``other * y.reciprocal(domain)``)."""
        return self.reciprocal() * other

    def conv2d(self, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
               groups: int = 1) -> SecretTensor:
        """``F.conv2d`` with a secret input and a secret or public weight (and bias); an unbatched
        ``(C, H, W)`` input gives a ``(C_out, H', W')`` output, as in PyTorch."""
        if self.dim() == 3:
            return self.unsqueeze(0).conv2d(weight, bias, stride, padding, dilation, groups).squeeze(0)
        out = self._bilinear(weight, "conv2d", stride=stride, padding=padding, dilation=dilation, groups=groups)
        if bias is not None:
            out = out + (bias.reshape(1, -1, 1, 1) if isinstance(bias, SecretTensor)
                         else torch.as_tensor(bias).reshape(1, -1, 1, 1))
        return out

    def conv_transpose2d(self, weight: Any, stride: Any = 1, padding: Any = 0, output_padding: Any = 0,
                         groups: int = 1, dilation: Any = 1) -> SecretTensor:
        """``F.conv_transpose2d`` (no bias) with a secret input and a secret or public weight."""
        return self._bilinear(weight, "conv_transpose2d", stride=stride, padding=padding,
                              output_padding=output_padding, groups=groups, dilation=dilation)

    def conv2d_weight(self, grad: Any, weight_shape: Sequence[int], stride: Any = 1, padding: Any = 0,
                      dilation: Any = 1, groups: int = 1) -> SecretTensor:
        """Gradient of ``conv2d(self, w, ...)`` with respect to ``w``, given the output gradient."""
        return self._bilinear(grad, "conv2d_weight", weight_shape=list(weight_shape), stride=stride,
                              padding=padding, dilation=dilation, groups=groups)

    # ---- reductions --------------------------------------------------------------------------
    def sum(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> SecretTensor:
        if dim is None:
            total = self.share.sum()
            return self._new(total.reshape([1] * self.dim()) if keepdim else total)
        dims = dim if isinstance(dim, int) else tuple(dim)
        return self._new(self.share.sum(dim=dims, keepdim=keepdim))

    def mean(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> SecretTensor:
        n = self.numel() if dim is None else _count(self.shape, dim)
        return self.sum(dim, keepdim) * (1.0 / n)

    # ---- shape (local) -----------------------------------------------------------------------
    def reshape(self, *shape: Any) -> SecretTensor:
        return self._new(self.share.reshape(*shape))

    def view(self, *shape: Any) -> SecretTensor:
        return self._new(self.share.view(*shape))

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> SecretTensor:
        return self._new(self.share.flatten(start_dim, end_dim))

    def transpose(self, d0: int, d1: int) -> SecretTensor:
        return self._new(self.share.transpose(d0, d1))

    def permute(self, *dims: Any) -> SecretTensor:
        return self._new(self.share.permute(*dims))

    def t(self) -> SecretTensor:
        return self._new(self.share.t())

    @property
    def T(self) -> SecretTensor:
        return self._new(self.share.T)

    def squeeze(self, dim: int | None = None) -> SecretTensor:
        return self._new(self.share.squeeze() if dim is None else self.share.squeeze(dim))

    def unsqueeze(self, dim: int) -> SecretTensor:
        return self._new(self.share.unsqueeze(dim))

    def expand(self, *sizes: Any) -> SecretTensor:
        return self._new(self.share.expand(*sizes))

    def repeat(self, *sizes: Any) -> SecretTensor:
        return self._new(self.share.repeat(*sizes))

    def contiguous(self) -> SecretTensor:
        return self._new(self.share.contiguous())

    def unfold(self, dimension: int, size: int, step: int) -> SecretTensor:
        return self._new(self.share.unfold(dimension, size, step))

    def pad(self, pad: Sequence[int]) -> SecretTensor:
        """Zero padding as ``F.pad(x, pad)`` (a share of zero is zero)."""
        return self._new(F.pad(self.share, list(pad)))

    def __getitem__(self, index: Any) -> SecretTensor:
        return self._new(self.share[index])

    def __setitem__(self, index: Any, value: Any) -> None:
        v = self._coerce(value)
        if isinstance(v, SecretTensor):
            self.share[index] = v.share
        else:
            enc = self._encode(v)
            self.share[index] = enc if self.session.index == 0 else torch.zeros_like(enc)

    # ---- comparisons and non-linear functions (composed in nonlinear.py / approx.py) -------
    def __lt__(self, other: Any) -> SecretTensor:
        from veil.mpc import nonlinear

        return nonlinear.lt(self, other)

    def __gt__(self, other: Any) -> SecretTensor:
        from veil.mpc import nonlinear

        return nonlinear.lt(-self, -self._coerce(other))

    def __le__(self, other: Any) -> SecretTensor:
        return 1 - (self > other)

    def __ge__(self, other: Any) -> SecretTensor:
        return 1 - (self < other)

    def __eq__(self, other: Any) -> SecretTensor:  # type: ignore[override]
        from veil.mpc import nonlinear

        return nonlinear.eq(self, other)

    def __ne__(self, other: Any) -> SecretTensor:  # type: ignore[override]
        return 1 - (self == other)

    def eq(self, other: Any) -> SecretTensor:
        return self == other

    # Non-linear functions; each is documented (method, rounds, error) where it is defined.
    def relu(self) -> SecretTensor:
        return _nl().relu(self)

    def abs(self) -> SecretTensor:
        return _nl().abs(self)

    def sign(self) -> SecretTensor:
        return _nl().sign(self)

    def clamp(self, min: float | None = None, max: float | None = None) -> SecretTensor:
        return _nl().clamp(self, min, max)

    def where(self, condition: Any, other: Any) -> SecretTensor:
        """``self`` where ``condition`` else ``other`` (as ``torch.Tensor.where``)."""
        return _nl().where(condition, self, other)

    def max(self, dim: int | None = None, keepdim: bool = False) -> Any:
        return _nl().max(self, dim, keepdim)

    def amax(self, dim: int, keepdim: bool = False) -> SecretTensor:
        return _nl().amax(self, dim, keepdim)

    def argmax(self, dim: int | None = None, keepdim: bool = False, one_hot: bool = False) -> SecretTensor:
        return _nl().argmax(self, dim, keepdim, one_hot)

    def max_pool2d(self, kernel_size: Any, stride: Any = None, padding: Any = 0) -> SecretTensor:
        return _nl().max_pool2d(self, kernel_size, stride, padding)

    def avg_pool2d(self, kernel_size: Any, stride: Any = None, padding: Any = 0) -> SecretTensor:
        return _nl().avg_pool2d(self, kernel_size, stride, padding)

    def exp(self, upper: float | None = None) -> SecretTensor:
        """``e^x`` for x in [-500, upper] (``upper``: a public bound on x, at most 20; see
        :func:`veil.mpc.approx.exp`)."""
        return _ap().exp(self, upper)

    def log(self) -> SecretTensor:
        return _ap().log(self)

    def reciprocal(self, domain: tuple[float, float] | None = None) -> SecretTensor:
        ap = _ap()
        return ap.reciprocal(self, domain or ap.DEFAULT_DOMAIN)

    def sqrt(self, domain: tuple[float, float] | None = None) -> SecretTensor:
        ap = _ap()
        return ap.sqrt(self, domain or ap.DEFAULT_DOMAIN)

    def rsqrt(self, domain: tuple[float, float] | None = None) -> SecretTensor:
        ap = _ap()
        return ap.rsqrt(self, domain or ap.DEFAULT_DOMAIN)

    def sigmoid(self) -> SecretTensor:
        return _ap().sigmoid(self)

    def tanh(self) -> SecretTensor:
        return _ap().tanh(self)

    def softmax(self, dim: int = -1) -> SecretTensor:
        return _ap().softmax(self, dim)


def _nl() -> Any:
    from veil.mpc import nonlinear

    return nonlinear


def _ap() -> Any:
    from veil.mpc import approx

    return approx


def _count(shape: torch.Size, dim: int | Sequence[int]) -> int:
    dims = [dim] if isinstance(dim, int) else list(dim)
    n = 1
    for d in dims:
        n *= shape[d]
    return n


def cat(tensors: Sequence[SecretTensor], dim: int = 0) -> SecretTensor:
    return tensors[0]._new(torch.cat([t.share for t in tensors], dim))


def stack(tensors: Sequence[SecretTensor], dim: int = 0) -> SecretTensor:
    return tensors[0]._new(torch.stack([t.share for t in tensors], dim))
