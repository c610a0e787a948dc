"""M-209 from known plaintext: keystream speed, pin accuracy of the PinNets, full key recovery.

Test keys are made here, fresh, by the 1944 manual's procedure (``veil.m209.dataset.build_dataset``:
secrets-seeded, multiprocessing), with random indicators and an all-A known plaintext, so they
cannot be among the keys the models were trained on (with ``--data DIR`` the packed DIR/test split
is used instead; it is checked disjoint from DIR/train when that exists). Models: ``--model``
files, else the shipped ones (``veil.m209.model.shipped_models``).

One JSON object per line:

* ``what: keystream``: ``keys`` x ``letters`` keystream letters made by the vectorised machine in
  ``seconds``: ``keys_per_second``; ``reference_keys_per_second``: Brian Neal's ``m209`` package
  (the plaintext reference, one key at a time) on a few keys, for the same work.
* ``what: pins``, per model: ``letters`` (L the model reads), ``keys``, ``seconds`` (inference on
  all keys), ``pin_accuracy`` (mean over all 131 pins), ``pin_accuracy_per_wheel``,
  ``lug_accuracy``, ``keys_all_pins_right``, ``by_overlaps`` (pin accuracy per overlap count).
* ``what: recovery``, per L in ``--recovery-letters``: ``keys`` (the first ``--recovery-keys``
  test keys), ``recovered_fraction`` (the recovered key enciphers exactly as the true key: same
  keystream over 2,000 letters from AAAAAA and 8 random indicators), ``reproduced_fraction`` (the
  known letters are reproduced), ``seconds`` (wall time, both cores), ``seconds_per_key_mean`` /
  ``_median`` (search time per key, network inference excluded), ``time_limit``.

    python benchmarks/m209.py                 # 10,000 test keys; recovery on 500 keys for L = 52, 104, 200
    python benchmarks/m209.py --quick         # 300 test keys, recovery on 40 keys
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# This script's name is the reference package's: keep its directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def bench_keystream(keys: int, letters: int) -> None:
    from m209.converter import M209

    from veil.m209 import Key, keystream, letters_from_positions
    from veil.m209.keys import generate_keys, generate_positions, make_rng

    rng = make_rng()
    pins, lugs = generate_keys(min(keys, 2000), rng=rng)
    reps = -(-keys // pins.shape[0])
    pins, lugs = np.tile(pins, (reps, 1))[:keys], np.tile(lugs, (reps, 1, 1))[:keys]
    pos = generate_positions(keys, rng=rng)
    start = time.perf_counter()
    keystream(pins, lugs, pos, letters)
    seconds = time.perf_counter() - start
    ref_keys = 20
    start = time.perf_counter()
    for i in range(ref_keys):
        key = Key(pins[i], lugs[i])
        machine = M209(lugs=key.lug_string(), pin_list=key.pin_list())
        machine.set_key_wheels(letters_from_positions(pos[i:i + 1])[0])
        machine.encrypt("A" * letters, group=False)
    ref_seconds = time.perf_counter() - start
    _emit({"what": "keystream", "letters": letters, "keys": keys, "seconds": round(seconds, 4),
           "keys_per_second": round(keys / seconds), "reference_keys_per_second": round(ref_keys / ref_seconds, 1)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 test keys, recovery on 40 keys")
    ap.add_argument("--keys", type=int, default=None, help="test keys (default 10,000; --quick 300)")
    ap.add_argument("--data", default=None, metavar="DIR", help="use DIR/test/packed instead of fresh keys")
    ap.add_argument("--model", action="append", default=[], help="PinNet file(s); default the shipped models")
    ap.add_argument("--recovery-letters", default="52,104,200", help="L values for key recovery (comma-separated)")
    ap.add_argument("--recovery-keys", type=int, default=None, help="keys per L (default 500; --quick 40)")
    ap.add_argument("--time-limit", type=float, default=10.0, help="search seconds per key (default 10)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: keystream,pins,recovery")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    n_keys = args.keys or (300 if args.quick else 10_000)
    n_rec = args.recovery_keys or (40 if args.quick else 500)

    import torch

    from veil.m209 import Key
    from veil.m209.attack import keys_equivalent, lugs_from_counts, recover_many
    from veil.m209.dataset import build_dataset, check_disjoint, load_packed
    from veil.m209.evaluate import evaluate_predictions
    from veil.m209.model import load_model, predict, shipped_models

    torch.set_num_threads(2)
    if "keystream" not in skip:
        bench_keystream(100_000, 200)
    models = {}
    for path in [Path(m) for m in args.model] or list(shipped_models().values()):
        net, info = load_model(path)
        models[info["letters"]] = (path, net)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            data = load_packed(Path(args.data) / "test")
            if (Path(args.data) / "train" / "packed").is_dir():
                check_disjoint(load_packed(Path(args.data) / "train"), data)
        else:
            data = build_dataset(tmp, "test", n_keys, max(200, *models), workers=args.workers, progress=False)
        n = min(n_keys, len(data))
        probs_by_l = {}
        if "pins" not in skip or "recovery" not in skip:
            for letters, (path, net) in sorted(models.items()):
                start = time.perf_counter()
                probs, lug_probs = predict(net, data.keystream[:n, :letters], data.positions[:n])
                seconds = time.perf_counter() - start
                probs_by_l[letters] = (probs, lug_probs)
                if "pins" in skip:
                    continue
                s = evaluate_predictions(probs, lug_probs, pins=data.pins[:n], lugs=data.lugs[:n],
                                         overlaps=data.overlaps[:n], letters=letters)
                _emit({"what": "pins", "letters": letters, "keys": n, "seconds": round(seconds, 2),
                       "pin_accuracy": round(s["pin_accuracy"], 5),
                       "pin_accuracy_per_wheel": [round(a, 4) for a in s["pin_accuracy_per_wheel"]],
                       "lug_accuracy": round(s["lug_accuracy"], 4), "keys_all_pins_right": s["keys_all_pins_right"],
                       "by_overlaps": {k: round(v["pin_accuracy"], 4) for k, v in s["by_overlaps"].items()},
                       "model": path.name})
        if "recovery" in skip:
            return
        for letters in [int(x) for x in args.recovery_letters.split(",") if x]:
            if letters not in probs_by_l:
                raise SystemExit(f"no model for L={letters} (have {sorted(probs_by_l)})")
            probs, lug_probs = probs_by_l[letters]
            m = min(n_rec, n)
            start = time.perf_counter()
            recs = recover_many(data.keystream[:m, :letters], data.positions[:m].astype(np.int64), probs[:m],
                                lug_probs=lug_probs[:m], time_limit=args.time_limit, workers=args.workers,
                                progress=False)
            seconds = time.perf_counter() - start
            truth = [Key(data.pins[i].astype(bool), lugs_from_counts(data.lugs[i])) for i in range(m)]
            full = [r.key is not None and keys_equivalent(r.key, t) for r, t in zip(recs, truth)]
            per_key = np.array([r.seconds for r in recs])
            _emit({"what": "recovery", "letters": letters, "keys": m, "seconds": round(seconds, 1),
                   "recovered_fraction": round(float(np.mean(full)), 4),
                   "reproduced_fraction": round(float(np.mean([r.reproduced for r in recs])), 4),
                   "seconds_per_key_mean": round(float(per_key.mean()), 3),
                   "seconds_per_key_median": round(float(np.median(per_key)), 3), "time_limit": args.time_limit})


if __name__ == "__main__":
    main()
