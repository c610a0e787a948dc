"""Several bilinear products of secrets at once, and their truncation.

:func:`products` opens the operands of independent products (``mul``, ``matmul``, convolutions and
their gradients) in one round; :func:`truncate_products` truncates locally or, under
``SessionOptions(truncation="exact")``, truncates matmul/convolution outputs exactly in one more round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from veil.mpc.tensor import SecretTensor

if TYPE_CHECKING:
    from veil.mpc.session import Session


def products(items: Sequence[tuple[Any, Any, str, dict[str, Any]]]) -> list[Any]:
    """Several independent bilinear products ``op(a, b, **kwargs)`` (``mul``, ``matmul``, ``conv2d``,
    ``conv_transpose2d``, ``conv2d_weight``...) at once: those of two secrets share one round; the
    others (a public operand) are local. Results are truncated like ``a * b``."""
    from veil.mpc.material import BILINEAR_OPS

    out: list[Any] = [None] * len(items)
    both = [i for i, (a, b, _, _) in enumerate(items) if isinstance(a, SecretTensor) and isinstance(b, SecretTensor)]
    for i, (a, b, op, kw) in enumerate(items):
        if i in both:
            continue
        if isinstance(a, SecretTensor):
            out[i] = a._bilinear(b, op, **kw)
        elif isinstance(b, SecretTensor):
            z = BILINEAR_OPS[op](b._encode(a), b.share, **kw)
            out[i] = b._new(b.protocol.truncate(z, b.frac_bits))
        else:
            out[i] = BILINEAR_OPS[op](a, b, **kw)
    if both:
        first = items[both[0]][0]
        zs = first.protocol.bilinear_many([(items[i][0].share, items[i][1].share, items[i][2], items[i][3])
                                           for i in both])
        for i, z in zip(both, truncate_products(first.session, zs, [items[i][2] for i in both])):
            out[i] = first._new(z)
    return out


EXACT_TRUNCATION_OPS = frozenset({"matmul", "conv1d", "conv2d", "conv_transpose2d", "conv2d_weight"})


def truncate_products(session: Session, zs: Sequence[torch.Tensor], ops: Sequence[str]) -> list[torch.Tensor]:
    """Truncate products of two secrets: locally, or (``SessionOptions(truncation="exact")``) the
    matmul/convolution outputs exactly, all in one round."""
    proto, f = session.protocol, session.fixed_point.frac_bits
    exact = [i for i, op in enumerate(ops) if session.options.truncation == "exact" and op in EXACT_TRUNCATION_OPS]
    out = [z if i in exact else proto.truncate(z, f) for i, z in enumerate(zs)]
    if exact:
        for i, z in zip(exact, proto.truncate_exact([zs[i] for i in exact], f)):
            out[i] = z
    return out
