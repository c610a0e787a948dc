"""The interface every secure-computation protocol implements.

A protocol works on *shares*: ``torch.int64`` tensors holding this party's piece of a fixed-point
ring element (see :mod:`veil.ring`). It offers a small closed set of primitives; everything else
(ReLU, max-pool, exp, softmax...) is composed from them in :mod:`veil.mpc.nonlinear` and
:mod:`veil.mpc.approx`, so a new protocol (say, 3-party replicated sharing) implements only these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch


class Protocol(ABC):
    name: str

    @abstractmethod
    def share(self, value: torch.Tensor | None, owner: str, shape: Sequence[int] | None,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.dtype]:
        """Secret-share the ring tensor ``value`` held by ``owner``; return this party's share and
        the dtype the owner's data had (every party decodes results to it)."""

    @abstractmethod
    def reveal(self, share: torch.Tensor, to: Sequence[str]) -> torch.Tensor | None:
        """Open the secret to the parties ``to`` only; they get the ring value, others None."""

    @abstractmethod
    def add_public(self, share: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Share of ``secret + value`` for a public ring tensor ``value``."""

    @abstractmethod
    def bilinear(self, x: torch.Tensor, y: torch.Tensor, op: str, kwargs: dict[str, Any]) -> torch.Tensor:
        """Share of ``op(x, y)`` (mul, matmul, conv2d...) of two secrets, *not* truncated."""

    @abstractmethod
    def bilinear_many(self, items: Sequence[tuple[torch.Tensor, torch.Tensor, str, dict[str, Any]]]
                      ) -> list[torch.Tensor]:
        """Shares of several independent ``op(x, y)`` products, *not* truncated, in the rounds of one."""

    @abstractmethod
    def products(self, values: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Shares of ``values[i] * values[j]`` (elementwise, equal shapes) for each pair, *not*
        truncated, in the rounds of one; each value enters once however many pairs use it."""

    @abstractmethod
    def square(self, x: torch.Tensor) -> torch.Tensor:
        """Share of ``x * x``, not truncated."""

    @abstractmethod
    def truncate(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """Share of ``x / 2^bits`` (rounded; see the protocol's error statement)."""

    @abstractmethod
    def truncate_exact(self, xs: Sequence[torch.Tensor], bits: int) -> list[torch.Tensor]:
        """Shares of ``x / 2^bits`` for each ``x``, off by at most one unit, never by more (interactive)."""

    @abstractmethod
    def msb(self, x: torch.Tensor, ys: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Shares of the sign bit ``b = [x < 0]`` (integer 0/1) and of ``y * b`` for each ``y``."""

    @abstractmethod
    def eqz(self, x: torch.Tensor, ys: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Shares of ``b = [x == 0]`` (integer 0/1) and of ``y * b`` for each ``y``."""
