"""``veil semantic``: train remotely on decoy classes (see ``veil.semantic``).

The owner runs ``fit`` (a translator of its secret classes into decoy classes, under a secret
permutation) and ``translate`` (the decoy data set, the only file that goes to the remote side).
The remote side runs ``remote`` on that file (or any training job of its own, e.g. ``veil share`` +
``veil train`` through Veil's parties) and sends back the trained model. The owner runs ``compose``
(translator + remote model = a classifier of the secret classes) and ``evaluate`` (its accuracy and
the audit of what the decoys give away). Each step prints one JSON object.

Data sources: ``mnist`` (``$VEIL_MNIST`` or the bundled copy; train or test split), ``digits`` (the
first 1,400 of scikit-learn's 1,797 8x8 digits are ``train``, the rest ``test``), or a ``.npz`` /
``.npy`` / ``.pt`` file (pixels in [0, 1], or 0..255 integers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "semantic", help="semantic protection: a remote party trains on decoy classes only",
        description="Translate secret classes into decoy classes with a locally trained GAN, let a remote "
                    "party train on the decoys, compose the answer back.")
    steps = p.add_subparsers(dest="semantic_step", metavar="STEP", required=True)
    for add in (_add_fit, _add_translate, _add_remote, _add_compose, _add_evaluate):
        add(steps)


def _add_data(p: argparse.ArgumentParser, split: str) -> None:
    p.add_argument("--data", default="mnist", metavar="SOURCE", help="mnist (default), digits, or a .npz/.npy/.pt")
    p.add_argument("--split", default=split, choices=["train", "test"], help=f"split of mnist/digits (default {split})")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images")


def _add_fit(steps: Any) -> None:
    p = steps.add_parser("fit", help="owner: train the translator (holds the secret permutation)",
                         description="Draws a secret permutation of the classes (OS randomness), trains the local "
                                     "classifier and the translator with checkpoints, writes the translator (mode "
                                     "0600) and a PNG of originals and their decoys.")
    _add_data(p, "train")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.pt", help="the translator (keep it secret)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--classifier-epochs", type=int, default=3)
    p.add_argument("--style-dim", type=int, default=8)
    p.add_argument("--adversarial-weight", type=float, default=0.1)
    p.add_argument("--class-weight", type=float, default=1.0)
    p.add_argument("--reconstruction-weight", type=float, default=10.0)
    p.add_argument("--checkpoint", type=Path, metavar="FILE", help="default: OUT.ckpt (mode 0600)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--grid", type=Path, metavar="FILE.png", help="sample grid (default: OUT-samples.png)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_fit)


def _add_translate(steps: Any) -> None:
    p = steps.add_parser("translate", help="owner: write the decoy data set for the remote side",
                         description="Translates images into decoys and writes a shuffled, class-balanced .npz of "
                                     "decoy images and decoy labels (x_train, y_train[, x_test, y_test]) only.")
    _add_data(p, "train")
    p.add_argument("--translator", required=True, type=Path, metavar="FILE.pt")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.npz")
    p.add_argument("--test-split", choices=["test"], help="also translate this split of mnist/digits as x_test")
    p.add_argument("--use-labels", action="store_true",
                   help="decoy labels from the source's secret labels (default: the local classifier's reading)")
    p.add_argument("--no-balance", action="store_true", help="keep every image (class counts then leak)")
    p.add_argument("--grid", type=Path, metavar="FILE.png", help="sample grid of originals and decoys")
    p.set_defaults(func=_translate)


def _add_remote(steps: Any) -> None:
    p = steps.add_parser("remote", help="remote side: train a classifier on the decoy set",
                         description="A plain PyTorch job on the decoy .npz; reports accuracy on its x_test/y_test.")
    p.add_argument("--decoys", required=True, type=Path, metavar="FILE.npz")
    p.add_argument("--arch", default="lenet", help="lenet, mlp, small, or package.module:factory")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule (default 3e-3)")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.pt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_remote)


def _add_compose(steps: Any) -> None:
    p = steps.add_parser("compose", help="owner: translator + remote model = classifier of the secret classes")
    p.add_argument("--translator", required=True, type=Path, metavar="FILE.pt")
    p.add_argument("--remote", required=True, type=Path, metavar="FILE.pt",
                   help="from `veil semantic remote`, or weights from `veil train --out` (with --remote-arch)")
    p.add_argument("--remote-arch", metavar="NAME", help="architecture of a plain state dict (as veil train's --arch)")
    p.add_argument("--flatten", action="store_true", help="--remote-arch: the model takes flattened images")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.pt", help="mode 0600: it holds the permutation")
    p.set_defaults(func=_compose)


def _add_evaluate(steps: Any) -> None:
    p = steps.add_parser("evaluate", help="owner: accuracy of the composed classifier, and the audit",
                         description="Accuracy on labelled images of the secret classes; with --audit, what the "
                                     "remote side could infer from decoys of these images (veil.audit.semantic), "
                                     "judged by a classifier trained on real images of the train split.")
    _add_data(p, "test")
    p.add_argument("--model", required=True, type=Path, metavar="COMPOSED.pt")
    p.add_argument("--audit", action="store_true", help="also run the decoy audit")
    p.add_argument("--judge-epochs", type=int, default=2, help="--audit: epochs of the real-data judge")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the result here")
    p.set_defaults(func=_evaluate)


# ---- data ----------------------------------------------------------------------------------------------
def _need_labels(y: Any, source: str, why: str) -> Any:
    if y is None:
        raise ValueError(f"{source}: has no labels, which {why} needs")
    return y


def _emit(out: dict[str, Any], path: Path | None = None) -> int:
    text = json.dumps(out)
    print(text)
    if path is not None:
        from veil.files import write_atomic

        write_atomic(path, (text + "\n").encode())
    return 0


# ---- steps ---------------------------------------------------------------------------------------------
def _fit(args: argparse.Namespace) -> int:
    from veil.data.images import load_pixels
    from veil.semantic import ClassPermutation, TranslatorSettings, fit_translator, save_translator
    from veil.semantic.pipeline import save_grid

    x, y = load_pixels(args.data, args.split, args.limit)
    y = _need_labels(y, args.data, "fitting a translator")
    settings = TranslatorSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  classifier_epochs=args.classifier_epochs, style_dim=args.style_dim,
                                  adversarial_weight=args.adversarial_weight, class_weight=args.class_weight,
                                  reconstruction_weight=args.reconstruction_weight)
    checkpoint = args.checkpoint or args.out.with_name(args.out.name + ".ckpt")
    num_classes = int(y.max()) + 1
    permutation = ClassPermutation.random(num_classes)
    if args.resume and checkpoint.exists():
        from veil.semantic.translator import checkpoint_permutation

        permutation = checkpoint_permutation(checkpoint)
    net, history = fit_translator(x, y, permutation, settings=settings, checkpoint=checkpoint, resume=args.resume,
                                  progress=not args.no_progress, device=args.device)
    save_translator(net.cpu(), args.out)
    grid = args.grid or args.out.with_name(args.out.stem + "-samples.png")
    save_grid(x[:2000], net.translate(x[:2000]), y[:2000], grid)
    last = history.epochs[-1] if history.epochs else {}
    return _emit({"translator": str(args.out), "grid": str(grid), "images": len(x), "classes": num_classes,
                  "minutes": round(history.seconds / 60, 3), "classifier_accuracy": history.classifier_accuracy,
                  "frozen_classifier_decoy_accuracy": last.get("decoy_acc")})


def _translate(args: argparse.Namespace) -> int:
    from veil.data.images import load_pixels
    from veil.semantic import load_translator, write_decoys
    from veil.semantic.pipeline import save_grid

    net = load_translator(args.translator)
    x, y = load_pixels(args.data, args.split, args.limit)
    labels = _need_labels(y, args.data, "--use-labels") if args.use_labels else None
    xt = yt = None
    if args.test_split:
        if args.data not in ("mnist", "digits"):
            raise ValueError("--test-split needs --data mnist or digits (a file has no splits)")
        xt, yt_all = load_pixels(args.data, args.test_split)
        yt = yt_all if args.use_labels else None
    stats = write_decoys(net, x, args.out, y=labels, x_test=xt, y_test=yt, balance=not args.no_balance)
    out: dict[str, Any] = {"decoys": str(args.out), **{f"{k}_images": v for k, v in stats.items()}}
    if args.grid:
        n = min(len(x), 2000)
        shown = net.translate(x[:n])
        save_grid(x[:n], shown, y[:n] if y is not None else net.secret_classes(x[:n]).detach(), args.grid,
                  title="original (top) and decoy (below); the grid stays with the owner")
        out["grid"] = str(args.grid)
    return _emit(out)


def _remote(args: argparse.Namespace) -> int:
    from veil.semantic import load_decoys, train_remote
    from veil.semantic.pipeline import save_remote
    from veil.semantic.translator import accuracy

    data = load_decoys(args.decoys)
    model = train_remote(data["x_train"], data["y_train"], arch=args.arch, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, progress=not args.no_progress, device=args.device)
    save_remote(model.cpu(), args.out)
    out: dict[str, Any] = {"model": str(args.out), "train_images": len(data["x_train"])}
    if "x_test" in data:
        out["decoy_test_accuracy"] = accuracy(model, data["x_test"], data["y_test"])
    return _emit(out)


def _compose(args: argparse.Namespace) -> int:
    from veil.semantic import ComposedClassifier, load_translator
    from veil.semantic.pipeline import load_remote, save_composed

    remote = load_remote(args.remote, arch=args.remote_arch, flatten=args.flatten)
    save_composed(ComposedClassifier(load_translator(args.translator), remote), args.out)
    return _emit({"composed": str(args.out)})


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from veil.data.images import load_pixels
    from veil.semantic.pipeline import load_composed

    model = load_composed(args.model)
    x, y = load_pixels(args.data, args.split, args.limit)
    y = _need_labels(y, args.data, "evaluation")
    pred = model.classify(x)
    out: dict[str, Any] = {"images": len(x), "end_to_end_accuracy": float((pred == y).float().mean())}
    if args.audit:
        from veil.audit.semantic import audit_decoys
        from veil.semantic.networks import local_classifier
        from veil.semantic.translator import train_classifier

        translator = model.translator
        if args.data not in ("mnist", "digits"):
            raise ValueError("--audit trains its judge on the train split: use --data mnist or digits")
        xr, yr = load_pixels(args.data, "train")
        judge = train_classifier(local_classifier(xr.shape[1], (xr.shape[2], xr.shape[3]), translator.permutation
                                                  .num_classes), xr, yr, epochs=args.judge_epochs)
        decoys = translator.translate(x)
        prior = (torch.bincount(yr, minlength=translator.permutation.num_classes).float() / len(yr)).tolist()
        audit = audit_decoys(decoys, translator.permutation.to_decoy(y), y, prior, judge=judge, real_x=x, real_y=y)
        out["audit"] = audit.as_dict()
    return _emit(out, args.json)
