"""Semantic protection on MNIST: translator time, decoy realism, end-to-end accuracy, the audit.

The whole pipeline as the owner and the remote side would run it (``veil.semantic``):

1. the owner draws a secret permutation of the 10 classes (OS randomness) and trains the translator
   on the 60,000 training images (``translator_minutes`` includes its local classifier);
2. the owner writes the decoy set (``write_decoys``: shuffled, class-balanced, decoy labels only);
3. the remote side trains a LeNet on the decoys only (``remote_minutes``);
4. the owner composes translator and remote model; ``end_to_end_accuracy`` is on the 10,000 real
   MNIST test images, against their true labels.

``decoy_realism``: a LeNet trained on real images (the *judge*, never seen by the pipeline) reads the
decoys of the test images; the fraction it reads as their decoy class. The audit
(``veil.audit.semantic``): on the remote side's file (balanced), the cluster attack (k-means on the
decoy pixels, cluster sizes matched to MNIST's class frequencies) and the frequency attack (label
counts matched the same way), scored against the secret class each row stands for; the same two on
decoys of the (unbalanced) test set, ``*_unbalanced_test``, to show what balancing buys; on the test
decoys, the Fréchet distance of the judge's features (decoys vs real test images, and real vs real as the
yardstick), and the probe that learns secret labels of ``n`` decoys (``audit_probe_accuracy`` at
n = 100; all sizes in ``audit_probe_by_labelled_pairs``).

The plaintext figure for the same work: ``plaintext_accuracy`` (the same LeNet trained for the same
epochs on the real images, no protection; the judge).

    python benchmarks/semantic.py                  # the full run (about 15 minutes on 2 cores)
    python benchmarks/semantic.py --quick          # 10,000 training images, 1 epoch: a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from veil.audit.semantic import audit_decoys, cluster_attack, frequency_attack
from veil.data.mnist import load_mnist
from veil.semantic import ClassPermutation, ComposedClassifier, TranslatorSettings, fit_translator, train_remote
from veil.semantic.pipeline import load_decoys, save_grid, write_decoys
from veil.semantic.translator import accuracy, train_classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=TranslatorSettings.epochs, help="translator epochs")
    ap.add_argument("--classifier-epochs", type=int, default=TranslatorSettings.classifier_epochs,
                    help="the owner's local classifier")
    ap.add_argument("--remote-epochs", type=int, default=2)
    ap.add_argument("--train-images", type=int, default=60000)
    ap.add_argument("--quick", action="store_true", help="10,000 training images, 1 translator epoch")
    ap.add_argument("--out", type=Path, default=Path(".cache/semantic"), help="decoy set and sample grid")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.train_images, args.epochs = 10000, 1
    args.out.mkdir(parents=True, exist_ok=True)
    x, y = load_mnist("train", normalize=False)
    x, y = x[:args.train_images], y[:args.train_images]
    xt, yt = load_mnist("test", normalize=False)

    t0 = time.perf_counter()
    judge = train_classifier(_lenet(), x, y, epochs=args.remote_epochs)
    plaintext_minutes = (time.perf_counter() - t0) / 60
    plaintext_accuracy = accuracy(judge, xt, yt)

    perm = ClassPermutation.random(10)
    settings = TranslatorSettings(epochs=args.epochs, classifier_epochs=args.classifier_epochs)
    net, history = fit_translator(x, y, perm, settings=settings, checkpoint=args.out / "translator.ckpt",
                                  progress=True)
    t1 = time.perf_counter()
    counts = write_decoys(net, x, args.out / "decoys.npz")
    decoys = load_decoys(args.out / "decoys.npz")  # exactly what the remote side holds
    remote = train_remote(decoys["x_train"], decoys["y_train"], arch="lenet", epochs=args.remote_epochs)
    remote_minutes = (time.perf_counter() - t1) / 60
    composed = ComposedClassifier(net, remote)
    end_to_end = float((composed.classify(xt) == yt).float().mean())

    test_decoys = net.translate(xt)
    save_grid(xt, test_decoys, yt, args.out / "samples.png")
    prior = (torch.bincount(y, minlength=10).float() / len(y)).tolist()
    # the attacks on the remote side's file: each row stands for the secret class its label decodes to
    held = perm.to_secret(decoys["y_train"])
    file_cluster = cluster_attack(decoys["x_train"], held, prior)
    file_frequency = frequency_attack(decoys["y_train"], held, prior)
    audit = audit_decoys(test_decoys, perm.to_decoy(yt), yt, prior, judge=judge, real_x=xt, real_y=yt,
                         probe_sizes=(10, 100, 1000))
    line = {
        "what": "semantic", "train_images": len(x), "translator_epochs": args.epochs,
        "translator_minutes": round(history.seconds / 60, 3),
        "local_classifier_accuracy": round(accuracy(net.classifier, xt, yt), 4),
        "decoy_realism": round(audit.decoy_realism or 0.0, 4),
        "end_to_end_accuracy": round(end_to_end, 4),
        "remote_decoy_images": counts["train"], "remote_minutes": round(remote_minutes, 3),
        "plaintext_accuracy": round(plaintext_accuracy, 4), "plaintext_minutes": round(plaintext_minutes, 3),
        "audit_cluster_attack_accuracy": round(file_cluster, 4),
        "audit_frequency_attack_accuracy": round(file_frequency, 4),
        "audit_chance": round(float(torch.bincount(held).max()) / len(held), 4),
        "audit_cluster_attack_unbalanced_test": round(audit.cluster_attack_accuracy, 4),
        "audit_frequency_attack_unbalanced_test": round(audit.frequency_attack_accuracy, 4),
        "audit_chance_unbalanced_test": round(audit.chance, 4),
        "audit_probe_accuracy": round(audit.probe_accuracy.get(100, float("nan")), 4),
        "audit_probe_by_labelled_pairs": {str(k): round(v, 4) for k, v in audit.probe_accuracy.items()},
        "audit_feature_distance": round(audit.feature_distance or 0.0, 3),
        "audit_real_feature_distance": round(audit.real_feature_distance or 0.0, 3),
        "samples_png": str(args.out / "samples.png"),
    }
    print(json.dumps(line), flush=True)


def _lenet() -> torch.nn.Module:
    from veil.data.mnist import MEAN, STD
    from veil.nn.zoo import LeNet
    from veil.semantic.pipeline import Standardize

    return Standardize(LeNet(), MEAN, STD)


if __name__ == "__main__":
    main()
