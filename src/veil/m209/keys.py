"""Random M-209 keys by the procedure of the 1944 technical manual (TM 11-380, 17 March 1944),
as the reference package ``m209`` (1.0.0, ``m209.keylist.generate``) implements it, with the
randomness taken from an injected numpy ``Generator`` instead of the global ``random`` module.

Lugs (manual, section 2; reference ``generate_lugs``):

1. Pick a set of six numbers from appendix II: group A, or group B with probability 11/101
   (the reference's ``randint(0, 100) <= 10``; the manual says at most 10% of sets from B).
   The tables are the reference's ``GROUP_A``/``GROUP_B`` (it dropped a few entries it could not
   solve). Shuffle the six numbers: number w is the count of lugs on wheel w. The overlap count
   is ``sum - 27`` (1..12): that many bars carry two lugs, the other ``27 - overlaps`` one lug,
   so no bar is empty and the number of single-lug ("non-shared") bars is fixed by the overlaps;
   it cannot be controlled separately.
2. Distribute the overlaps over the 15 wheel pairs in random order, in chunks of at most
   ``max(1, min(4, overlaps // d))`` (d = 1, 2, 3 for 1..3, 4..8, 9..12 overlaps), so at most 4
   overlaps between two wheels and several small overlaps rather than one large one.
3. Accept if (with 3+ overlap pairs) at least 4 wheels take part, (with 2+) the pairs include
   adjacent and separated wheels, and the drum can produce every count 1..27; otherwise retry
   step 2 (2048 times, then pick a new set of numbers; the reference raises instead).

``overlaps=n`` restricts step 1 to the sets whose sum is ``27 + n``, each weighted as in the
unrestricted draw, which is exactly the draw conditioned on the overlap count (what rejection
sampling would give), without the rejections.

Pins (reference ``generate_pin_list``): shuffle 78 "effective" and 78 "ineffective" cards, deal
131 of them to the pins in order; accept if 40%..60% of all 131 pins are effective (the ratio is
over all wheels, not per wheel) and no wheel has more than 6 consecutive (cyclically) effective
or ineffective pins; otherwise reshuffle. Vectorised over keys: failed rows are redrawn.
"""

from __future__ import annotations

import itertools
import secrets

import numpy as np
import numpy.typing as npt
from m209.keylist.data import GROUP_A, GROUP_B

from veil.m209.machine import NUM_BARS, NUM_PINS, NUM_WHEELS, WHEEL_SIZES, WHEEL_STARTS, Key, drum_tables

MAX_LUG_ATTEMPTS = 2048
MAX_PIN_ROUNDS = 10_000
_P_GROUP_B = 11 / 101
_SETS = np.array(GROUP_A + GROUP_B, dtype=np.int64)  # (n_sets, 6)
_SET_WEIGHTS = np.concatenate([np.full(len(GROUP_A), (1 - _P_GROUP_B) / len(GROUP_A)),
                               np.full(len(GROUP_B), _P_GROUP_B / len(GROUP_B))])
_SET_OVERLAPS = _SETS.sum(axis=1) - NUM_BARS
_PAIRS = list(itertools.combinations(range(NUM_WHEELS), 2))
_VALID_SETS = {tuple(sorted(s)) for s in _SETS.tolist()}


class KeyProcedureError(ValueError):
    """A key generation request the manual's procedure cannot satisfy."""


def make_rng(seed: int | None = None) -> np.random.Generator:
    """A generator seeded from ``secrets`` (128 bits); a ``seed`` only for reproducible tests."""
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed)


def _distribute_overlaps(selection: npt.NDArray[np.int64], overlap: int,
                         rng: np.random.Generator) -> list[tuple[int, int, int]]:
    remaining = selection.copy()
    divisor = 1 if overlap <= 3 else 2 if overlap <= 8 else 3
    chunk_limit = max(1, min(4, overlap // divisor))
    out = []
    for i in rng.permutation(len(_PAIRS)):
        if overlap <= 0:
            break
        x, y = _PAIRS[i]
        max_chunk = min(int(remaining[x]), int(remaining[y]), overlap, chunk_limit)
        if max_chunk <= 0:
            continue
        chunk = int(rng.integers(1, max_chunk + 1))
        overlap -= chunk
        remaining[x] -= chunk
        remaining[y] -= chunk
        out.append((x, y, chunk))
    return sorted(out) if overlap == 0 else []


def _overlaps_ok(overlaps: list[tuple[int, int, int]]) -> bool:
    if len(overlaps) >= 3 and len({w for x, y, _ in overlaps for w in (x, y)}) <= 3:
        return False
    if len(overlaps) >= 2:
        gaps = [y - x for x, y, _ in overlaps]
        if not any(g > 1 for g in gaps) or not any(g == 1 for g in gaps):
            return False
    return True


def _lugs_from(selection: npt.NDArray[np.int64], overlaps: list[tuple[int, int, int]]) -> npt.NDArray[np.int64]:
    remaining = selection.copy()
    bars: list[tuple[int, int]] = []
    for x, y, n in overlaps:
        bars += [(x + 1, y + 1)] * n
        remaining[x] -= n
        remaining[y] -= n
    for w in range(NUM_WHEELS):
        bars += [(0, w + 1)] * int(remaining[w])
    return np.array(bars, dtype=np.int64)


def _all_counts(lugs: npt.NDArray[np.int64]) -> bool:
    table = drum_tables(lugs[None])[0]
    return set(range(1, NUM_BARS + 1)) <= set(table[1:].tolist())


def generate_lugs(n: int, *, overlaps: int | None = None, rng: np.random.Generator | None = None,
                  ) -> npt.NDArray[np.int64]:
    """``(n, 27, 2)`` lug settings by the manual's procedure (module docstring); ``overlaps``
    (1..12) fixes the number of two-lug bars. One Python loop per key (not vectorised)."""
    rng = rng if rng is not None else make_rng()
    weights = _SET_WEIGHTS
    if overlaps is not None:
        if not 1 <= overlaps <= 12:
            raise KeyProcedureError(f"overlaps must be 1..12 (the sums of appendix II's sets), got {overlaps}")
        weights = np.where(_SET_OVERLAPS == overlaps, weights, 0.0)
    weights = weights / weights.sum()
    out = np.empty((n, NUM_BARS, 2), dtype=np.int64)
    for k in range(n):
        while True:
            selection = rng.permutation(_SETS[rng.choice(len(_SETS), p=weights)])
            overlap = int(selection.sum()) - NUM_BARS
            for _ in range(MAX_LUG_ATTEMPTS):
                dist = _distribute_overlaps(selection, overlap, rng)
                if dist and _overlaps_ok(dist):
                    lugs = _lugs_from(selection, dist)
                    if _all_counts(lugs):
                        out[k] = lugs
                        break
            else:
                continue  # this set of numbers did not work out: draw another
            break
    return out


def _runs_ok(pins: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """(K,) True where no wheel has 7 cyclically consecutive equal pins."""
    ok = np.ones(pins.shape[0], dtype=np.bool_)
    for w, size in enumerate(WHEEL_SIZES):
        idx = (np.arange(size)[:, None] + np.arange(7)) % size + WHEEL_STARTS[w]  # (size, 7)
        windows: npt.NDArray[np.bool_] = pins[:, idx]
        run = np.logical_or(np.all(windows, axis=2), np.all(~windows, axis=2))
        ok &= ~np.any(run, axis=1)
    return ok


def pins_ok(pins: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """(K,) the manual's pin rules: 40%..60% effective overall, no run of 7 on any wheel."""
    ratio = pins.sum(axis=1) / NUM_PINS
    return (ratio >= 0.4) & (ratio <= 0.6) & _runs_ok(pins)


def generate_pins(n: int, *, rng: np.random.Generator | None = None) -> npt.NDArray[np.bool_]:
    """``(n, 131)`` pins by the manual's card-shuffling procedure, redrawing rejected rows."""
    rng = rng if rng is not None else make_rng()
    cards = np.tile(np.arange(156) < 78, (n, 1))
    out = np.empty((n, NUM_PINS), dtype=np.bool_)
    todo = np.arange(n)
    for _ in range(MAX_PIN_ROUNDS):
        if todo.size == 0:
            return out
        draw = rng.permuted(cards[: todo.size], axis=1)[:, :NUM_PINS]
        good = pins_ok(draw)
        out[todo[good]] = draw[good]
        todo = todo[~good]
    raise KeyProcedureError("generate_pins: too many rejected draws")


def generate_positions(n: int, *, rng: np.random.Generator | None = None) -> npt.NDArray[np.int64]:
    """``(n, 6)`` uniformly random key wheel positions (message indicators)."""
    rng = rng if rng is not None else make_rng()
    return np.stack([rng.integers(0, s, size=n) for s in WHEEL_SIZES], axis=1)


def generate_keys(n: int, *, overlaps: int | None = None, rng: np.random.Generator | None = None,
                  ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """``(pins (n, 131), lugs (n, 27, 2))`` by the manual's procedure."""
    rng = rng if rng is not None else make_rng()
    return generate_pins(n, rng=rng), generate_lugs(n, overlaps=overlaps, rng=rng)


def check_procedure(key: Key) -> list[str]:
    """What in ``key`` breaks the manual's rules (empty when it follows them): the pin rules,
    per-wheel lug counts forming a set of appendix II, no empty bar, at most 4 overlaps between
    two wheels, every drum count 1..27 reachable. (Step 3's "should" heuristics are not checked.)"""
    problems = []
    eff = int(key.pins.sum())
    if not 0.4 <= eff / NUM_PINS <= 0.6:
        problems.append(f"{eff} of 131 pins effective; the manual wants 40%..60% (53..78)")
    if not _runs_ok(key.pins[None])[0]:
        problems.append("a wheel has more than 6 consecutive effective or ineffective pins")
    lugs = key.lugs
    if ((lugs[:, 0] == 0) & (lugs[:, 1] == 0)).any():
        problems.append("a bar has no lug; the manual's procedure puts at least one lug on every bar")
    per_wheel = tuple(sorted(int((lugs == w).sum()) for w in range(1, NUM_WHEELS + 1)))
    if per_wheel not in _VALID_SETS:
        problems.append(f"lugs per wheel {per_wheel} are not a set of appendix II (groups A/B)")
    pair_counts = key.lug_pair_counts()[7:]
    if pair_counts.max() > 4:
        problems.append(f"{pair_counts.max()} overlaps between two wheels; the manual allows at most 4")
    if not _all_counts(lugs):
        problems.append("the drum cannot produce every count 1..27")
    return problems
