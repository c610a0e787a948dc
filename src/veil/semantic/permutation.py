"""The secret permutation of classes: which decoy class stands for which secret class.

A :class:`ClassPermutation` is drawn from the OS's randomness (``secrets``) as a *derangement*: no
class is its own decoy (a class that kept its label would not be hidden). It is the data owner's
key: it lives in the owner's translator and composed-classifier files (mode 0600) and never in
anything the remote side receives (decoy datasets hold decoy labels only).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class PermutationError(ValueError):
    """A permutation that is not a bijection of ``0..k-1``, or data it does not fit."""


@dataclass(frozen=True)
class ClassPermutation:
    """``decoy = mapping[secret]`` for classes ``0..k-1``."""

    mapping: tuple[int, ...]

    def __post_init__(self) -> None:
        k = len(self.mapping)
        if k < 2:
            raise PermutationError(f"a class permutation needs at least 2 classes, got {k}")
        if sorted(self.mapping) != list(range(k)):
            raise PermutationError(f"not a permutation of 0..{k - 1}: {list(self.mapping)}")

    @property
    def num_classes(self) -> int:
        return len(self.mapping)

    @staticmethod
    def random(num_classes: int, *, derangement: bool = True) -> ClassPermutation:
        """A uniformly random permutation (by default a derangement) from ``secrets``."""
        if num_classes < 2:
            raise PermutationError(f"a class permutation needs at least 2 classes, got {num_classes}")
        rng = secrets.SystemRandom()
        while True:  # rejection sampling: about e tries for a derangement
            order = list(range(num_classes))
            rng.shuffle(order)
            if not derangement or all(i != j for i, j in enumerate(order)):
                return ClassPermutation(tuple(order))

    @staticmethod
    def from_list(values: Sequence[int]) -> ClassPermutation:
        try:
            return ClassPermutation(tuple(int(v) for v in values))
        except (TypeError, ValueError) as e:
            if isinstance(e, PermutationError):
                raise
            raise PermutationError(f"not a list of class indices: {values!r}") from None

    def inverse(self) -> ClassPermutation:
        inv = [0] * self.num_classes
        for secret, decoy in enumerate(self.mapping):
            inv[decoy] = secret
        return ClassPermutation(tuple(inv))

    def _check(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise PermutationError(f"labels must lie in 0..{self.num_classes - 1}, got "
                                   f"{int(labels.min())}..{int(labels.max())}")
        return labels.long()

    def to_decoy(self, labels: torch.Tensor) -> torch.Tensor:
        """Secret labels -> decoy labels."""
        labels = self._check(labels)
        return torch.tensor(self.mapping, dtype=torch.long, device=labels.device)[labels]

    def to_secret(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoy labels -> secret labels."""
        return self.inverse().to_decoy(labels)

    def __repr__(self) -> str:  # never print the secret by accident
        return f"ClassPermutation(<secret, {self.num_classes} classes>)"
