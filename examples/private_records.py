"""Veil's demo: a private prediction between two parties who do not trust each other.

Bob owns a small neural network (his weights are his secret); alice owns patient records (hers).
Alice, bob and a dealer run as three OS processes that talk TLS on loopback. The network runs on
secret shares; only alice learns the predictions; nobody learns the other's inputs.

    python examples/private_records.py
"""

from __future__ import annotations

import time

import torch

import veil

N_RECORDS, N_FEATURES, HIDDEN, CLASSES = 256, 20, 32, 3


def bobs_model() -> torch.nn.Sequential:
    g = torch.Generator().manual_seed(7)  # a public, reproducible stand-in for a trained model
    model = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, HIDDEN), torch.nn.ReLU(),
                                torch.nn.Linear(HIDDEN, CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def alices_records() -> torch.Tensor:
    return torch.randn(N_RECORDS, N_FEATURES, generator=torch.Generator().manual_seed(11))


def main(session: veil.Session) -> dict[str, object]:
    """Runs in alice and in bob: same code, each with its own secret."""
    me = session.party
    model = bobs_model() if me == "bob" else None
    w1 = session.share(model[0].weight.detach() if model else None, owner="bob")
    b1 = session.share(model[0].bias.detach() if model else None, owner="bob")
    w2 = session.share(model[2].weight.detach() if model else None, owner="bob")
    b2 = session.share(model[2].bias.detach() if model else None, owner="bob")
    x = session.share(alices_records() if me == "alice" else None, owner="alice")

    start = time.perf_counter()
    with session.measure() as traffic:
        hidden = (x @ w1.t() + b1).relu()
        probs = (hidden @ w2.t() + b2).softmax(dim=1)
        label = probs.argmax(dim=1)
    seconds = time.perf_counter() - start

    probs_alice = probs.reveal(to="alice")  # bob gets None: the predictions are alice's alone
    label_alice = label.reveal(to="alice")
    result: dict[str, object] = {"seconds": seconds, **traffic}
    if me == "alice":
        assert probs_alice is not None and label_alice is not None
        with torch.no_grad():  # the check only a demo can make: the plaintext answer, for comparison
            reference = bobs_model()(alices_records()).softmax(dim=1)
        result["max_abs_error"] = float((probs_alice - reference).abs().max())
        result["labels_agree"] = float((label_alice.long() == reference.argmax(1)).float().mean())
    else:
        result["learned"] = (probs_alice, label_alice)
    return result


if __name__ == "__main__":
    print(f"Private inference: {N_RECORDS} records x {N_FEATURES} features (alice), "
          f"MLP {N_FEATURES}-{HIDDEN}-{CLASSES} (bob), dealer for correlated randomness.")
    t0 = time.perf_counter()
    out = veil.launch(main)
    a, b = out["alice"], out["bob"]
    print(f"  alice learned the predictions: max |error| vs plaintext = {a['max_abs_error']:.2e}, "
          f"labels agree on {100 * a['labels_agree']:.1f}%")
    print(f"  bob learned: {b['learned']}")
    print(f"  secure computation: {a['seconds']:.3f} s, {a['rounds']} rounds, "
          f"{a['bytes_with_peer'] / 1e6:.2f} MB between alice and bob, "
          f"{(a['bytes_with_dealer'] + b['bytes_with_dealer']) / 1e6:.2f} MB with the dealer")
    print(f"  total with process start-up and TLS set-up: {time.perf_counter() - t0:.1f} s")
