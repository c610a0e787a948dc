"""``veil m209``: M-209 datasets (keygen, encrypt, pack; see ``veil.m209.dataset`` for the layout of DIR).

Each step is a subcommand added by its own ``_add_<step>(subparsers)`` function, listed in ``STEPS``; each
calls the library and prints what it did. Steps are resumable: re-run the same command to finish one.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

SPLITS = ("train", "test")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "m209", help="M-209 key recovery: build datasets of keys and ciphertexts",
        description="Datasets for learning M-209 keys from known plaintext: `keygen` makes keys by the 1944 "
                    "manual's procedure, `encrypt` enciphers a plaintext under each, `pack` gathers a split into "
                    "the arrays the training code reads. Each step resumes where it stopped.")
    steps = p.add_subparsers(dest="m209_step", metavar="STEP", required=True)
    for add in STEPS:
        add(steps)


def _add_common(p: argparse.ArgumentParser, *, data: str) -> None:
    p.add_argument(data, dest="data", required=True, metavar="DIR", help="dataset directory (holds DIR/<split>/)")
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--force", action="store_true", help="delete this step's existing output made with other "
                                                        "settings instead of refusing")


def _add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None,
                   help=f"worker processes (default: all CPUs, {os.cpu_count()} here)")
    p.add_argument("--seed", type=int, default=None,
                   help="fixed seed for reproducible tests only (default: a fresh secrets-seeded generator "
                        "per chunk); keys from a known seed are known keys")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_keygen(steps: Any) -> None:
    p = steps.add_parser("keygen", help="make keys (pins and lugs) by the manual's procedure",
                         description="Writes DIR/<split>/keys-NNNNN.npz chunks and keys.json. Re-running the same "
                                     "command makes only missing chunks; other settings are refused unless --force.")
    _add_common(p, data="--out")
    p.add_argument("--keys", type=int, required=True, metavar="N", help="number of keys")
    p.add_argument("--overlaps", type=int, default=None, metavar="K",
                   help="exactly K bars with two lugs (1..12; default: as the manual's tables fall)")
    p.add_argument("--chunk", type=int, default=10_000, help="keys per chunk file (default 10000)")
    p.add_argument("--exclude", action="append", default=[], metavar="DIR",
                   help="a split (or dataset DIR) whose keys this split must not share; repeatable. Sibling "
                        "splits in --out are always checked")
    _add_workers(p)
    p.set_defaults(func=_keygen)


def _add_encrypt(steps: Any) -> None:
    p = steps.add_parser("encrypt", help="encipher a plaintext under each key of a split",
                         description="Writes DIR/<split>/cipher-NNNNN.npz chunks and cipher.json.")
    _add_common(p, data="--data")
    p.add_argument("--letters", type=int, required=True, metavar="L", help="letters per message")
    p.add_argument("--plaintext", default="all-a", metavar="all-a|random|FILE",
                   help="all-a (default, as the published study), random letters, or a text file of A-Z "
                        "(spaces become Z) cycled or cut to L letters")
    p.add_argument("--indicator", default="random", metavar="random|LETTERS",
                   help="key wheel settings: random per message (default) or six letters, e.g. AAAAAA")
    _add_workers(p)
    p.set_defaults(func=_encrypt)


def _add_pack(steps: Any) -> None:
    p = steps.add_parser("pack", help="gather a split into DIR/<split>/packed/ for training",
                         description="Writes DIR/<split>/packed/*.npy and meta.json atomically after checking "
                                     "that no key of the split is in another split (or --exclude).")
    _add_common(p, data="--data")
    p.add_argument("--exclude", action="append", default=[], metavar="DIR",
                   help="a split (or dataset DIR) whose keys this split must not share; repeatable")
    p.set_defaults(func=_pack)


def _add_train(steps: Any) -> None:
    p = steps.add_parser("train", help="train a PinNet (all 131 pins and the lug-pair counts) on a packed split",
                         description="Trains on DIR/train/packed (its last --val-keys keys validate), with early "
                                     "stopping and a checkpoint that a re-run of the same command resumes from.")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset directory holding train/packed")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--letters", type=int, required=True, metavar="L", help="message length to train for")
    p.add_argument("--out", required=True, metavar="MODEL", help="where to write the trained PinNet (.pt)")
    p.add_argument("--minutes", type=float, default=55.0, help="time budget (default 55)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--iterations", type=int, default=8, help="message-passing iterations (default 8)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=250, metavar="STEPS")
    p.add_argument("--val-keys", type=int, default=2000)
    p.add_argument("--patience", type=int, default=6, metavar="EVALS")
    p.add_argument("--no-augment", action="store_true",
                   help="train on the packed keystreams as they are (default: fresh pins and indicators per example)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="checkpoint file (default MODEL.ckpt)")
    p.add_argument("--history", default=None, metavar="JSON", help="write the validation history here")
    p.add_argument("--force", action="store_true", help="replace an existing MODEL")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train)


def _add_test(steps: Any) -> None:
    p = steps.add_parser("test", help="pin and lug accuracy of PinNets on a test split, by key difficulty",
                         description="Evaluates each --model on DIR/<split>/packed (checked disjoint from "
                                     "DIR/train), writes a JSON summary and PNG plots per model, and an "
                                     "accuracy-vs-L plot when several models are given.")
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--model", action="append", default=[], metavar="MODEL",
                   help="PinNet file (repeatable; default: the shipped models)")
    p.add_argument("--keys", type=int, default=None, metavar="N", help="test on the first N keys only")
    p.add_argument("--out", default=None, metavar="DIR", help="results directory (default DIR/results)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_test)


def _add_attack(steps: Any) -> None:
    p = steps.add_parser("attack", help="recover a key from known plaintext and decipher the message",
                         description="The network's pin probabilities start a local search over pins and lugs "
                                     "until the keystream of the known plaintext is reproduced. Prints the key in "
                                     "the 1944 manual's key-list layout and the deciphered message.")
    p.add_argument("--ciphertext", required=True, metavar="TEXT|FILE", help="ciphertext letters (or a file)")
    p.add_argument("--known-plaintext", required=True, metavar="TEXT|FILE",
                   help="the plaintext of the first letters of the message (or a file); spaces count as Z")
    p.add_argument("--indicator", required=True, metavar="LETTERS", help="key wheel settings, e.g. AAAAAA")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="PinNet file (default: the shipped model trained nearest the known length)")
    p.add_argument("--no-model", action="store_true", help="search without the network (slow, long texts only)")
    p.add_argument("--time-limit", type=float, default=60.0, metavar="SECONDS")
    p.set_defaults(func=_attack)


# --- Subcommands of `veil m209`, in the order `veil m209 --help` lists them. Add a step here (train, test,
# attack ...): write `_add_<step>(steps)` that adds its parser and sets `func`, and append it to STEPS. ----------
STEPS: tuple[Callable[[Any], None], ...] = (
    _add_keygen,
    _add_encrypt,
    _add_pack,
    _add_train,
    _add_test,
    _add_attack,
)


def _report(what: str, result: Any) -> None:
    if result.chunks_made == 0:
        print(f"{result.split_dir}: all {result.chunks_skipped} {what} chunk(s) already there; nothing to do")
        return
    rate = result.made / result.seconds if result.seconds > 0 else float("inf")
    skipped = f" ({result.chunks_skipped} chunk(s) already there)" if result.chunks_skipped else ""
    print(f"{result.split_dir}: {what}: {result.made} of {result.total} in {result.chunks_made} chunk(s), "
          f"{result.seconds:.1f} s, {rate:,.0f} {what}/s{skipped}")


def _keygen(args: argparse.Namespace) -> int:
    from veil.m209.dataset import generate_key_chunks

    result = generate_key_chunks(args.data, args.split, args.keys, overlaps=args.overlaps, chunk=args.chunk,
                                 workers=args.workers, seed=args.seed, exclude=args.exclude, force=args.force,
                                 progress=not args.no_progress)
    _report("keys", result)
    return 0


def _encrypt(args: argparse.Namespace) -> int:
    from veil.m209.dataset import encrypt_split

    result = encrypt_split(args.data, args.split, args.letters, plaintext=args.plaintext, indicator=args.indicator,
                           workers=args.workers, seed=args.seed, force=args.force, progress=not args.no_progress)
    _report("messages", result)
    return 0


def _pack(args: argparse.Namespace) -> int:
    import time

    from veil.m209.dataset import load_packed, pack_split

    start = time.perf_counter()
    packed = load_packed(pack_split(args.data, args.split, exclude=args.exclude, force=args.force))
    meta = packed.meta
    print(f"{packed.path}: {len(packed)} keys x {meta['letters']} letters (plaintext {meta['plaintext']}, "
          f"indicator {meta['indicator']}), checked in {time.perf_counter() - start:.1f} s")
    return 0


def _train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from veil.m209.dataset import load_packed
    from veil.m209.training import TrainConfig, train_pinnet

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to replace it (a run resumes from its checkpoint, "
                         f"{args.checkpoint or str(out) + '.ckpt'})")
    config = TrainConfig(letters=args.letters, hidden=args.hidden, iterations=args.iterations,
                         batch_size=args.batch_size, lr=args.lr, minutes=args.minutes, max_steps=args.max_steps,
                         eval_every=args.eval_every, val_keys=args.val_keys, patience=args.patience,
                         augment=not args.no_augment)
    data = load_packed(Path(args.data) / args.split)
    result = train_pinnet(data, config, out=out, checkpoint=args.checkpoint or f"{out}.ckpt",
                          progress=not args.no_progress)
    if args.history:
        from veil.files import write_atomic

        write_atomic(args.history, json.dumps(result.history, indent=2).encode())
    print(f"{out}: L={args.letters}, {result.steps} steps in {result.minutes:.1f} min ({result.stopped}); "
          f"best validation pin accuracy {result.best_pin_accuracy:.4f} at step {result.best_step}")
    return 0


def _test(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from veil.m209.dataset import check_disjoint, load_packed
    from veil.m209.evaluate import (
        evaluate_predictions,
        per_key_pin_accuracy,
        plot_accuracy_vs_letters,
        plot_test,
        write_summary,
    )
    from veil.m209.model import load_model, predict, shipped_models

    data = load_packed(Path(args.data) / args.split)
    train_dir = Path(args.data) / "train"
    if args.split != "train" and (train_dir / "packed").is_dir():
        check_disjoint(load_packed(train_dir), data)
    models = [Path(m) for m in args.model] or list(shipped_models().values())
    if not models:
        raise ValueError("no --model given and no shipped model found")
    out = Path(args.out) if args.out else Path(args.data) / "results"
    n = len(data) if args.keys is None else min(args.keys, len(data))
    summaries = []
    for path in models:
        net, info = load_model(path)
        letters = info["letters"]
        if letters > data.keystream.shape[1]:
            raise ValueError(f"{path} reads {letters} letters, the test split has {data.keystream.shape[1]}")
        start = time.perf_counter()
        probs, lug_probs = predict(net, data.keystream[:n, :letters], data.positions[:n],
                                   progress=not args.no_progress)
        seconds = time.perf_counter() - start
        summary = evaluate_predictions(probs, lug_probs, pins=data.pins[:n], lugs=data.lugs[:n],
                                       overlaps=data.overlaps[:n], letters=letters)
        summary.update({"model": str(path), "seconds": seconds, "keys_per_second": n / seconds})
        summaries.append(summary)
        write_summary(summary, out / f"m209-L{letters}.json")
        plot_test(summary, per_key_pin_accuracy(probs, data.pins[:n]), out, prefix=f"m209-L{letters}")
        wheels = " ".join(f"{a:.3f}" for a in summary["pin_accuracy_per_wheel"])
        print(f"L={letters}: {n} keys, pin accuracy {summary['pin_accuracy']:.4f} (wheels {wheels}), lug-count "
              f"accuracy {summary['lug_accuracy']:.4f}, all pins right {summary['keys_all_pins_right']:.3f}; "
              f"{seconds:.1f} s")
    if len(summaries) > 1:
        plot_accuracy_vs_letters(summaries, out / "m209-accuracy-vs-letters.png")
    print(f"results in {out}")
    return 0


def _text_arg(value: str) -> str:
    """A text given on the command line or as a file: upper-cased, line breaks and tabs removed."""
    from pathlib import Path

    try:
        is_file = Path(value).is_file()
    except OSError:  # e.g. a long ciphertext given inline: "file name too long"
        is_file = False
    if not is_file and any(c in value for c in "/\\.") and not value.replace(" ", "").isalpha():
        raise ValueError(f"{value}: no such file (give the letters themselves, or a file of them)")
    text = Path(value).read_text() if is_file else value
    return "".join(text.upper().replace("\t", "").splitlines()).strip()


def _attack(args: argparse.Namespace) -> int:
    import numpy as np

    from veil.m209.attack import format_key_list, recover_key
    from veil.m209.machine import (
        array_to_letters,
        decrypt,
        keystream_from_known_plaintext,
        letters_to_array,
        positions_from_letters,
    )
    from veil.m209.model import load_model, predict, shipped_model

    cipher = letters_to_array("".join(_text_arg(args.ciphertext).split()), spaces=False)
    known = letters_to_array(_text_arg(args.known_plaintext), spaces=True)
    if known.shape[0] > cipher.shape[0]:
        raise ValueError(f"the known plaintext has {known.shape[0]} letters, the ciphertext only {cipher.shape[0]}")
    positions = positions_from_letters(args.indicator.upper())
    ks = keystream_from_known_plaintext(known, cipher[:known.shape[0]])
    probs = lug_probs = None
    if not args.no_model:
        net, _ = load_model(args.model or shipped_model(known.shape[0]))
        p, lp = predict(net, ks[None], positions[None])
        probs, lug_probs = p[0], lp[0]
    rec = recover_key(ks, positions, probs, lug_probs=lug_probs, time_limit=args.time_limit)
    status = ("reproduces all" if rec.reproduced else f"reproduces only {rec.matches} of") + \
        f" {rec.letters} known letters"
    print(f"recovered key ({status}; {rec.seconds:.1f} s, {rec.restarts} restarts):")
    assert rec.key is not None
    print(format_key_list(rec.key))
    plain = decrypt(rec.key.pins[None], rec.key.lugs[None], positions, cipher)[0]
    print("decryption:")
    print(array_to_letters(np.asarray(plain), z_as_space=True))
    return 0 if rec.reproduced else 2
