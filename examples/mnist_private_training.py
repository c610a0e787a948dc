"""Two data owners train an MLP on their pooled MNIST images without showing them to anyone.

Alice holds the first half of the 60,000 training images, bob the second half; bob also provides
the initial model (784-128-128-10). Each owner secret-shares its rows once into share files, then
both train on shares (SGD lr 0.05, momentum 0.9, batch 64) with a checkpoint every epoch; the test
accuracy (on shares, 10,000 test images held by alice) is revealed to both after each epoch and the
weights to alice at the end. Curves are saved as PNG.

    python examples/mnist_private_training.py [--epochs 1] [--samples 60000] [--out runs/mnist]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import veil
from veil.nn.zoo import MLP


def main(session: veil.Session, out: str, samples: int, epochs: int) -> dict[str, object]:
    me, out_dir = session.party, Path(out)
    images, labels = veil.data.load_mnist("train")
    half = samples // 2
    mine = slice(0, half) if me == "alice" else slice(half, samples)
    own = {"x": images[mine].reshape(-1, 784), "y": labels[mine].double()}
    train = veil.data.load_shares(session, veil.data.share_dataset(session, own, out=out_dir, name="mnist-train"))
    test_x, test_y = veil.data.load_mnist("test")
    test_own = {"x": test_x.reshape(-1, 784), "y": test_y.double()} if me == "alice" else None
    test = veil.data.load_shares(session, veil.data.share_dataset(session, test_own, owners=("alice",), out=out_dir,
                                                                  name="mnist-test"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MLP() if me == "bob" else None
    net = veil.nn.share_model(session, model, owner="bob", training=True)
    history = veil.nn.fit(session, net, train, epochs=epochs, batch_size=64, test_data=test,
                          optimizer=veil.nn.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
                          loss_fn=veil.nn.CrossEntropyLoss(), reveal_to=["alice", "bob"], loss_every=50,
                          checkpoint_dir=out_dir / "checkpoints", resume=True, progress=me == "alice")
    weights = net.reveal_state_dict(to="alice")
    if weights is not None:
        veil.nn.save_state_dict(weights, out_dir / "mlp.pt")
        veil.nn.plot_history(history, out_dir / "curves.png", title="private MLP training on MNIST")
    return {"epochs": history.as_dicts()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--samples", type=int, default=60_000)
    ap.add_argument("--out", default="runs/mnist")
    args = ap.parse_args()
    result = veil.launch(main, args.out, args.samples, args.epochs, timeout=600)["alice"]
    for e in result["epochs"]:
        print(f"epoch {e['epoch']}: {e['seconds']:.1f} s ({1000 * e['seconds'] / e['batches']:.0f} ms per batch), "
              f"loss {e['loss']:.4f}, test accuracy {100 * e['test_accuracy']:.2f}%, "
              f"{e['bytes_with_peer'] / 1e9:.2f} GB with the other party")
    print(f"weights and curves in {args.out}/ (mlp.pt, curves.png)")
