"""M-209 key recovery from known plaintext, starting from a network's pin probabilities.

Setting: for one message the attacker knows the wheel start positions (the indicator) and L
letters of plaintext and ciphertext, hence the keystream ``y_i = k_i mod 26``
(``keystream_from_known_plaintext``), plus ``pin_probs`` (131,), a network's P(pin effective),
and optionally its lug-pair count distribution ``lug_probs`` (22, C).

The drum count is linear in the 22 lug-pair counts ``n`` (``LUG_PAIRS`` order, sum 27):
``k_i = X_i @ n`` with ``X_i[p] = 1`` when pair p = (a, b) is kicked by letter i's effective-wheel
mask (``OR(pin_a, pin_b)``). Equivalently ``k_i = T[m_i]`` with the 64-entry drum table
``T = n @ HITS``. The search (``recover_key``):

1. Start pins: the 0.5-threshold of ``pin_probs``; later restarts sample pins from the
   probabilities (tempered), or perturb the best state so far in its least certain pins.
2. Lugs given pins: weighted non-negative least squares of ``y`` on ``X`` (letters weighted by
   how sure the network is of their six presented pins; targets 0/1 read as 26/27 where the fit
   says so; residual outliers dropped and refitted), rounded, the sum forced to 27 with the
   no-lug pair (0, 0) as slack.
3. Joint local search on ``score = matches + prior_weight * log P(pins) (+ lug prior)``: each
   step evaluates, vectorised, all 131 pin flips (a flip changes only the letters where that pin
   is presented: ``np.bincount`` of per-letter, per-wheel deltas) and all 462 one-bar moves
   between lug pairs, and takes the best improving one. At a local optimum the lugs are refitted
   from the current pins (step 2) and the search continues while that helps.
4. Stop when all L letters match or at ``time_limit``; return the best state seen.

Recovered lug counts reproduce the machine (its drum table), not necessarily the physical
lug placement; the counts are unique given the full 64-entry table (Moebius inversion).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from multiprocessing import Pool
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import nnls

from veil.m209.keys import generate_positions, make_rng
from veil.m209.machine import (
    _PAIR_HITS,
    GUIDE_OFFSETS,
    LUG_PAIRS,
    NUM_BARS,
    NUM_PINS,
    NUM_WHEELS,
    WHEEL_LETTERS,
    WHEEL_SIZES,
    WHEEL_STARTS,
    Key,
    keystream,
)

NUM_PAIRS = len(LUG_PAIRS)  # 22
_HITS = _PAIR_HITS.astype(np.int64)  # (22, 64)
_BITS = (1 << np.arange(NUM_WHEELS)).astype(np.int64)
_MOVE_FROM, _MOVE_TO = (a.ravel() for a in np.nonzero(~np.eye(NUM_PAIRS, dtype=bool)))  # 462 one-bar moves
_P_CLIP = 1e-3


@dataclass(frozen=True)
class Recovery:
    """The outcome of ``recover_key``: the best key found (``None`` only if no search ran),
    its ``pins`` (131,) and ``lug_counts`` (22,), how many of the ``letters`` known keystream
    letters it reproduces (``matches``), ``reproduced`` when all of them, the wall time and the
    number of restarts."""

    key: Key | None
    pins: npt.NDArray[np.bool_]
    lug_counts: npt.NDArray[np.int64]
    matches: int
    letters: int
    reproduced: bool
    seconds: float
    restarts: int


# --- validation ------------------------------------------------------------------------------

def _check_inputs(keystream_mod26: npt.ArrayLike, positions: npt.ArrayLike, pin_probs: npt.ArrayLike | None,
                  lug_probs: npt.ArrayLike | None) -> tuple[Any, Any, Any, Any]:
    y = np.asarray(keystream_mod26)
    problems = []
    if y.ndim != 1 or y.shape[0] < 1:
        problems.append(f"keystream_mod26: need shape (L,) with L >= 1, got {y.shape}")
    elif not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 25:
        problems.append("keystream_mod26: need integer letters 0..25 (k mod 26 = (c + p + 1) mod 26)")
    pos = np.asarray(positions)
    if pos.shape != (NUM_WHEELS,) or not np.issubdtype(pos.dtype, np.integer):
        problems.append(f"positions: need 6 integer wheel positions (positions_from_letters), got shape {pos.shape}")
    elif ((pos < 0) | (pos >= np.asarray(WHEEL_SIZES))).any():
        problems.append(f"positions: wheel positions must lie in 0..n-1 for wheel sizes {WHEEL_SIZES}")
    probs = None
    if pin_probs is not None:
        probs = np.asarray(pin_probs, dtype=np.float64)
        if probs.shape != (NUM_PINS,):
            problems.append(f"pin_probs: need shape ({NUM_PINS},) or None, got {probs.shape}")
        elif not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
            problems.append("pin_probs: need finite probabilities in [0, 1] (no NaN); pass None for no prior")
    lp = None
    if lug_probs is not None:
        lp = np.asarray(lug_probs, dtype=np.float64)
        if lp.ndim != 2 or lp.shape[0] != NUM_PAIRS or lp.shape[1] < 2:
            problems.append(f"lug_probs: need shape ({NUM_PAIRS}, C) with C >= 2, got {lp.shape}")
        elif not np.isfinite(lp).all() or lp.min() < 0 or lp.max() > 1:
            problems.append("lug_probs: need finite probabilities in [0, 1] (no NaN)")
    if problems:
        raise ValueError("recover_key: " + "; ".join(problems))
    return y.astype(np.int64), pos.astype(np.int64), probs, lp


# --- the search ------------------------------------------------------------------------------

class _Problem:
    """Precomputed data for one message: presented pin per letter and wheel, targets, priors."""

    def __init__(self, y: npt.NDArray[np.int64], pos: npt.NDArray[np.int64], probs: npt.NDArray[np.float64],
                 lug_probs: npt.NDArray[np.float64] | None, prior_weight: float, lug_weight: float) -> None:
        self.y = y
        self.L = y.shape[0]
        steps = np.arange(self.L)
        self.idx = np.stack([(pos[w] + steps + GUIDE_OFFSETS[w]) % WHEEL_SIZES[w] + WHEEL_STARTS[w]
                             for w in range(NUM_WHEELS)], axis=1)  # (L, 6)
        self.idx_flat = self.idx.ravel()
        self.probs = np.clip(probs, _P_CLIP, 1 - _P_CLIP)
        logit = np.log(self.probs) - np.log1p(-self.probs)
        self.logit = prior_weight * logit  # score gain of setting a pin effective vs not
        self.certainty = np.abs(logit)
        conf = np.maximum(self.probs, 1 - self.probs)
        self.letter_weight = np.prod(conf[self.idx], axis=1)  # P(all six presented pins right)
        self.lug_logp = None
        if lug_probs is not None:
            lp = np.log(np.clip(lug_probs, 1e-4, 1.0)) * lug_weight
            pad = np.full((NUM_PAIRS, NUM_BARS + 1), np.log(1e-4) * lug_weight)
            c = min(lp.shape[1], NUM_BARS + 1)
            pad[:, :c] = lp[:, :c]
            self.lug_logp = pad  # (22, 28)

    def masks(self, pins: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
        return (pins[self.idx].astype(np.int64) * _BITS).sum(axis=1)

    def matches(self, pins: npt.NDArray[np.bool_], n: npt.NDArray[np.int64]) -> int:
        return int(((n @ _HITS)[self.masks(pins)] % 26 == self.y).sum())

    def lug_prior(self, n: npt.NDArray[np.int64]) -> float:
        return 0.0 if self.lug_logp is None else float(self.lug_logp[np.arange(NUM_PAIRS), n].sum())

    def score(self, pins: npt.NDArray[np.bool_], n: npt.NDArray[np.int64], scale: float = 1.0) -> float:
        return self.matches(pins, n) + scale * float(self.logit[pins].sum()) + self.lug_prior(n)

    def solve_lugs(self, pins: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
        """Step 2: robust weighted NNLS of the targets on the 21 lugged pair features."""
        masks = self.masks(pins)
        x = _HITS[1:, masks].T.astype(np.float64)  # (L, 21)
        t = self.y.astype(np.float64)
        low = self.y <= 1  # k may be y or y + 26: left out of the first fit, then read from it
        w = (self.letter_weight + 1e-3) * ~low
        for _ in range(4):
            sw = np.sqrt(w)
            sol, _ = nnls(x * sw[:, None], t * sw, maxiter=200)
            pred = x @ sol
            t = np.where(low & (pred > 13), self.y + 26, self.y).astype(np.float64)
            resid = np.abs(pred - t)
            w = (self.letter_weight + 1e-3) * (resid < max(1.5, float(np.quantile(resid, 0.7))))
        n = np.zeros(NUM_PAIRS, dtype=np.int64)
        n[1:] = np.rint(sol).astype(np.int64)
        while n[1:].sum() > NUM_BARS:  # too many bars: take from the largest
            n[1 + int(np.argmax(n[1:]))] -= 1
        n[0] = NUM_BARS - n[1:].sum()
        return n

    def descend(self, pins: npt.NDArray[np.bool_], n: npt.NDArray[np.int64], deadline: float,
                rng: np.random.Generator, scale: float = 1.0) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
        """Step 3: best-improvement local search over pin flips and one-bar lug moves, with the
        pin prior scaled by ``scale``."""
        pins, n = pins.copy(), n.copy()
        y, idx_flat = self.y, self.idx_flat
        logit = self.logit * scale
        while time.monotonic() < deadline:
            masks = self.masks(pins)
            table = n @ _HITS
            k = table[masks]
            cur = k % 26 == y
            alt = table[masks[:, None] ^ _BITS] % 26 == y[:, None]  # (L, 6) match after each flip
            d_pin = np.bincount(idx_flat, (alt.astype(np.int64) - cur[:, None]).ravel(), NUM_PINS)
            d_pin = d_pin + np.where(pins, -logit, logit)
            x = _HITS[:, masks].T  # (L, 22)
            kp = k[:, None] + x[:, _MOVE_TO] - x[:, _MOVE_FROM]
            d_lug = ((kp % 26 == y[:, None]).sum(axis=0) - cur.sum()).astype(np.float64)
            if self.lug_logp is not None:
                lp = self.lug_logp
                a, b = _MOVE_FROM, _MOVE_TO
                na, nb = n[a], n[b]
                d_lug += (lp[a, np.maximum(na - 1, 0)] - lp[a, na] + lp[b, np.minimum(nb + 1, NUM_BARS)] - lp[b, nb])
            d_lug[n[_MOVE_FROM] == 0] = -np.inf
            best_pin, best_lug = float(d_pin.max()), float(d_lug.max())
            if max(best_pin, best_lug) <= 1e-9:
                break
            if best_pin >= best_lug:
                cand = np.flatnonzero(d_pin >= best_pin - 1e-9)
                j = int(cand[rng.integers(len(cand))])
                pins[j] = ~pins[j]
            else:
                cand = np.flatnonzero(d_lug >= best_lug - 1e-9)
                m = int(cand[rng.integers(len(cand))])
                n[_MOVE_FROM[m]] -= 1
                n[_MOVE_TO[m]] += 1
        return pins, n

    def polish(self, pins: npt.NDArray[np.bool_], deadline: float, rng: np.random.Generator, scale: float = 1.0,
               ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64], float]:
        """Alternate lug refits and joint descents (pin prior scaled by ``scale``) while the
        score improves."""
        n = self.solve_lugs(pins)
        pins, n = self.descend(pins, n, deadline, rng, scale)
        s = self.score(pins, n, scale)
        for _ in range(4):
            if self.matches(pins, n) == self.L or time.monotonic() >= deadline:
                break
            p2, n2 = self.descend(pins, self.solve_lugs(pins), deadline, rng, scale)
            s2 = self.score(p2, n2, scale)
            if s2 <= s + 1e-9:
                break
            pins, n, s = p2, n2, s2
        return pins, n, self.score(pins, n)


def lugs_from_counts(counts: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """22 lug-pair counts (``LUG_PAIRS`` order, sum 27) to ``(27, 2)`` lug pairs."""
    c = np.asarray(counts, dtype=np.int64)
    if c.shape != (NUM_PAIRS,) or c.min() < 0 or c.sum() != NUM_BARS:
        raise ValueError(f"lug counts: need {NUM_PAIRS} non-negative counts summing to 27, got {c.tolist()}")
    return np.array([LUG_PAIRS[p] for p in range(NUM_PAIRS) for _ in range(int(c[p]))], dtype=np.int64)


def recover_key(keystream_mod26: npt.ArrayLike, positions: npt.ArrayLike, pin_probs: npt.ArrayLike | None, *,
                lug_probs: npt.ArrayLike | None = None, time_limit: float = 20.0,
                rng: np.random.Generator | None = None, prior_weight: float = 0.5,
                lug_weight: float = 0.5) -> Recovery:
    """Recover pins and lug-pair counts reproducing ``keystream_mod26`` (L,) from wheel
    ``positions`` (6,), guided by ``pin_probs`` (131,) (None: 0.5 everywhere) and optionally
    ``lug_probs`` (22, C): P(pair p has c bars). ``prior_weight`` scales the pins' log-odds
    against one matched letter; ``lug_weight`` the lug log-probabilities. See the module
    docstring for the algorithm. Stops when all letters match or after ``time_limit`` s."""
    y, pos, probs, lp = _check_inputs(keystream_mod26, positions, pin_probs, lug_probs)
    if not time_limit > 0:
        raise ValueError(f"recover_key: time_limit must be > 0 seconds, got {time_limit}")
    rng = rng if rng is not None else make_rng()
    t0 = time.monotonic()
    deadline = t0 + time_limit
    prob = probs if probs is not None else np.full(NUM_PINS, 0.5)
    prob_p = _Problem(y, pos, prob, lp, prior_weight if probs is not None else 0.0, lug_weight)

    def sample(temp: float) -> npt.NDArray[np.bool_]:
        q = 1 / (1 + np.exp(-np.log(prob_p.probs / (1 - prob_p.probs)) / temp))
        return rng.random(NUM_PINS) < q

    pins = prob > 0.5 if probs is not None else sample(1.0)
    best = (-math.inf, pins, np.zeros(NUM_PAIRS, np.int64))
    best_matches = -1
    restarts = 0
    scale = 1.0
    while True:
        p, n, s = prob_p.polish(pins, deadline, rng, scale)
        m = prob_p.matches(p, n)
        if (m, s) > (best_matches, best[0]):
            best, best_matches = (s, p, n), m
        if m == prob_p.L or time.monotonic() >= deadline:
            break
        restarts += 1
        if restarts % 2 == 1:
            # perturb the best state in its least certain pins
            k = int(rng.integers(1, 6 if probs is not None else 12))
            weights = np.exp(-prob_p.certainty / rng.choice([1.0, 2.0, 4.0]))
            flip = rng.choice(NUM_PINS, size=k, replace=False, p=weights / weights.sum())
            pins = best[1].copy()
            pins[flip] = ~pins[flip]
        else:
            pins = sample(float(rng.choice([1.0, 1.5, 2.0, 3.0])))
        scale = float(rng.choice([1.0, 0.5, 0.2]))
    _, pins, n = best
    key = Key(pins=pins, lugs=lugs_from_counts(n))
    return Recovery(key=key, pins=pins.copy(), lug_counts=n.copy(), matches=best_matches, letters=prob_p.L,
                    reproduced=best_matches == prob_p.L, seconds=time.monotonic() - t0, restarts=restarts)


# --- checks and reporting --------------------------------------------------------------------

def keys_equivalent(a: Key, b: Key, *, letters: int = 2000, indicators: int = 8,
                    rng: np.random.Generator | None = None) -> bool:
    """True when ``a`` and ``b`` give the same keystream (mod 26, i.e. the same cipher) over
    ``letters`` letters from AAAAAA and from ``indicators`` random wheel positions."""
    rng = rng if rng is not None else make_rng()
    pos = np.concatenate([np.zeros((1, NUM_WHEELS), np.int64), generate_positions(indicators, rng=rng)])
    ks = [keystream(np.repeat(k.pins[None], len(pos), 0), np.repeat(k.lugs[None], len(pos), 0), pos, letters)
          for k in (a, b)]
    return bool(np.array_equal(ks[0] % 26, ks[1] % 26))


def format_key_list(key: Key, indicator: str = "AA") -> str:
    """The key in the 1944 manual's key-list layout, as ``m209``'s ``KeyList`` holds it: the
    indicator, the lugs in key-list notation, one line per wheel with its effective pin letters
    in place (``-`` for an ineffective pin), and the 26-letter check."""
    ref = key.to_reference(indicator)
    lines = [f"Key list {ref.indicator}", f"lugs   = {ref.lugs}"]
    for w in range(NUM_WHEELS):
        pins = key.wheel_pins(w + 1)
        shown = " ".join(c if e else "-" for c, e in zip(WHEEL_LETTERS[w], pins))
        lines.append(f"wheel{w + 1} = {ref.pin_list[w]:<26}  {shown}")
    lines.append(f"check  = {ref.letter_check}")
    return "\n".join(lines)


def _recover_one(args: tuple[Any, ...]) -> Recovery:
    ks, pos, probs, lprobs, seed, kwargs = args
    return recover_key(ks, pos, probs, lug_probs=lprobs, rng=make_rng(seed), **kwargs)


def recover_many(keystreams: npt.ArrayLike, positions: npt.ArrayLike, pin_probs: npt.ArrayLike | None, *,
                 lug_probs: npt.ArrayLike | None = None, time_limit: float = 20.0, workers: int | None = None,
                 rng: np.random.Generator | None = None, progress: bool = True, **kwargs: Any) -> list[Recovery]:
    """``recover_key`` over K messages ``keystreams`` (K, L), ``positions`` (K, 6),
    ``pin_probs`` (K, 131) or None, ``lug_probs`` (K, 22, C) or None, in a process pool of
    ``workers`` (default ``os.cpu_count()``) with a tqdm progress bar. Results in input order."""
    from tqdm import tqdm

    ks, pos = np.asarray(keystreams), np.asarray(positions)
    if ks.ndim != 2 or pos.ndim != 2 or pos.shape[0] != ks.shape[0]:
        raise ValueError(f"recover_many: need keystreams (K, L) and positions (K, 6), got {ks.shape}, {pos.shape}")
    k = ks.shape[0]
    probs: list[Any] = [None] * k if pin_probs is None else list(np.asarray(pin_probs))
    lprobs: list[Any] = [None] * k if lug_probs is None else list(np.asarray(lug_probs))
    if len(probs) != k or len(lprobs) != k:
        raise ValueError(f"recover_many: pin_probs/lug_probs need {k} rows, one per keystream")
    rng = rng if rng is not None else make_rng()
    seeds = [int(s) for s in rng.integers(0, 2**63, size=(k,))]
    kwargs = {"time_limit": time_limit, **kwargs}
    jobs = [(ks[i], pos[i], probs[i], lprobs[i], seeds[i], kwargs) for i in range(k)]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_recover_one(j) for j in tqdm(jobs, disable=not progress, desc="keys")]
    with Pool(workers) as pool:
        return list(tqdm(pool.imap(_recover_one, jobs), total=k, disable=not progress, desc="keys"))
