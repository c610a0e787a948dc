"""Two hospitals train one small network on the union of their patients, without pooling the data.

Alice and bob each hold rows of a synthetic dataset (3 measurements per patient, a 0/1 outcome). They
secret-share their rows, train the classic 3-10-1 network (ReLU, sigmoid output, binary
cross-entropy, SGD lr 0.1) on shares, see only the loss, and at the end both receive the weights.
The same training in plaintext PyTorch runs beside it for comparison.

    python examples/alice_bob_training.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import veil
from veil.nn.zoo import SmallNet

EPOCHS, BATCH, LR, LOSS_EVERY = 5, 64, 0.1, 4


def hospital_rows(party: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each hospital's own patients (synthetic: outcome from a noisy linear rule)."""
    g = torch.Generator().manual_seed({"alice": 1, "bob": 2}[party])
    x = torch.randn(640, 3, generator=g)
    y = ((x @ torch.tensor([1.5, -2.0, 0.7]) + 0.3 * torch.randn(640, generator=g)) > 0).float().unsqueeze(1)
    return x, y


def initial_model() -> SmallNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return SmallNet()


def main(session: veil.Session) -> dict[str, object]:
    me = session.party
    x, y = hospital_rows(me)
    parts = {p: (session.share(x if p == me else None, owner=p), session.share(y if p == me else None, owner=p))
             for p in ("alice", "bob")}
    data = veil.nn.TensorDataset(session, veil.cat([parts["alice"][0], parts["bob"][0]]),
                                 veil.cat([parts["alice"][1], parts["bob"][1]]))
    net = veil.nn.share_model(session, initial_model() if me == "alice" else None, owner="alice", training=True)
    history = veil.nn.fit(session, net, data, epochs=EPOCHS, batch_size=BATCH,
                          optimizer=veil.nn.optim.SGD(net.parameters(), lr=LR), loss_fn=veil.nn.BCELoss(),
                          reveal_to=["alice", "bob"], loss_every=LOSS_EVERY, progress=False,
                          seed=b"batch order agreed by the hospitals")
    return {"losses": [e.loss for e in history.epochs], "seconds_per_batch":
            sum(e.seconds for e in history.epochs) / sum(e.batches for e in history.epochs),
            "weights": net.reveal_state_dict(to=["alice", "bob"])}


def plaintext_losses() -> list[float]:
    x = torch.cat([hospital_rows("alice")[0], hospital_rows("bob")[0]])
    y = torch.cat([hospital_rows("alice")[1], hospital_rows("bob")[1]])
    model = initial_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    from veil.data.peer import shuffle_order
    from veil.nn.train import _epoch_seed

    curve = []
    for epoch in range(1, EPOCHS + 1):
        order = shuffle_order(_epoch_seed(b"batch order agreed by the hospitals", epoch), len(x))
        losses, steps = [], -(-len(x) // BATCH)
        for step, i in enumerate(range(0, len(x), BATCH)):
            idx = order[i:i + BATCH]
            opt.zero_grad()
            loss = F.binary_cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if (step + 1) % LOSS_EVERY == 0 or step == steps - 1:  # the batches whose loss fit() reveals
                losses.append(loss.item())
        curve.append(sum(losses) / len(losses))
    return curve


if __name__ == "__main__":
    result = veil.launch(main)["alice"]
    plain = plaintext_losses()
    print(f"epoch  secure loss  plaintext loss   (mean over every {LOSS_EVERY}th batch)")
    for epoch, (s, p) in enumerate(zip(result["losses"], plain), start=1):
        print(f"{epoch:5d}  {s:11.4f}  {p:14.4f}")
    print(f"{1000 * result['seconds_per_batch']:.1f} ms per secure batch of {BATCH}; "
          f"both hospitals received the weights: {sorted(result['weights'])}")
