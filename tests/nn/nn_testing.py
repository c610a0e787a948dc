"""Helpers of the veil.nn tests: run a converted model with bob as model owner and alice as data owner."""

from __future__ import annotations

from typing import Any

import torch
from mpc_testing import run_local

import veil
from veil.nn import SecureModel, from_torch, share_model

MODEL_OWNER, DATA_OWNER = "bob", "alice"


def _program(session: veil.Session, model: SecureModel, x: torch.Tensor, reveal_to: list[str]) -> Any:
    net = share_model(session, model if session.party == MODEL_OWNER else None, owner=MODEL_OWNER)
    xs = session.share(x if session.party == DATA_OWNER else None, owner=DATA_OWNER)
    return net(xs).reveal(to=reveal_to)


def secure_forward(module: torch.nn.Module | SecureModel, x: torch.Tensor) -> torch.Tensor:
    """The module's output on ``x``, computed on shares and revealed to both parties (tests only)."""
    model = module if isinstance(module, SecureModel) else from_torch(module)
    out = run_local(_program, model, x, ["alice", "bob"])
    assert torch.equal(out["alice"], out["bob"])
    return out["alice"]


def randomize_batch_norm(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters in every BatchNorm of ``module``."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
