"""Yao's millionaires: alice and bob learn who is richer, and nothing else.

    veil run examples/millionaires.py
"""

import torch


def main(session):
    alice_wealth = torch.tensor([3.2e6]) if session.party == "alice" else None
    bob_wealth = torch.tensor([2.9e6]) if session.party == "bob" else None
    a = session.share(alice_wealth, owner="alice")
    b = session.share(bob_wealth, owner="bob")
    alice_richer = (a > b).reveal(to=["alice", "bob"])
    return "alice is richer" if bool(alice_richer.item()) else "bob is at least as rich"
