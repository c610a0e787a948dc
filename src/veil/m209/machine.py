"""The M-209 converter, vectorised over many keys at once.

The reference is Brian Neal's ``m209`` package (1.0.0); this module reproduces its
``m209.converter.M209`` letter for letter (``tests/m209/test_machine.py`` checks it).

The machine, in the reference's conventions:

* Six key wheels, left to right, with 26, 25, 23, 21, 19, 17 letters (``WHEEL_LETTERS``;
  wheels 2 and 3 have no W, wheel 3 no W or Y ... see the table). Each letter has a pin,
  effective or ineffective: 131 pins in all, stored as one ``(131,)`` bool vector, wheel 1's
  26 pins first, each wheel's pins in the order of its letters.
* A wheel set to the letter at index ``p`` (what the operator sees) presents to its guide arm
  the pin at index ``(p + GUIDE_OFFSETS[w]) % n_w``: the guide letters are P, O, N, M, L, K
  (offsets 15, 14, 13, 12, 11, 10). After each letter every wheel steps by one.
* A drum of 27 bars, each with two lugs at 0 (neutral) or 1..6 (a wheel). A bar is kicked
  when at least one of its lugs faces a wheel whose presented pin is effective; the number of
  kicked bars is the drum count ``k`` in 0..27.
* Cipher (an involution, so decryption is the same map):
  ``c = (25 - p + k) mod 26`` with letters as 0..25 (A = 0): the reference's
  ``CIPHER_TABLE[(p - k) % 26]`` with ``CIPHER_TABLE = Z..A``.
* Spaces: the reference enciphers a plaintext space as Z and, on decryption, prints a
  deciphered Z as a space. ``letters_to_array(text, spaces=True)`` maps a space to Z;
  ``array_to_letters(a, z_as_space=True)`` maps Z back to a space.

Known plaintext: with an all-``A`` plaintext the ciphertext is ``c = (25 + k) mod 26``, so the
keystream modulo 26 is ``(c + 1) mod 26``; in general ``k mod 26 = (c + p + 1) mod 26``
(``keystream_from_known_plaintext``). The machine's count ``k`` itself (0..27) is returned by
``keystream``: 26 and 27 encipher as 0 and 1.

Lugs are stored as 27 pairs ``(a, b)`` with ``0 <= a <= b <= 6`` and never ``a == b > 0``
(both lugs of a bar on one wheel is refused, as by the reference): ``(0, 0)`` a bar with no
lug, ``(0, k)`` a bar with one lug on wheel k, ``(j, k)`` with ``1 <= j < k`` an overlap.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

WHEEL_LETTERS: tuple[str, ...] = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "ABCDEFGHIJKLMNOPQRSTUVXYZ",
    "ABCDEFGHIJKLMNOPQRSTUVX",
    "ABCDEFGHIJKLMNOPQRSTU",
    "ABCDEFGHIJKLMNOPQRS",
    "ABCDEFGHIJKLMNOPQ",
)
GUIDE_LETTERS = "PONMLK"
WHEEL_SIZES: tuple[int, ...] = tuple(len(w) for w in WHEEL_LETTERS)  # 26, 25, 23, 21, 19, 17
GUIDE_OFFSETS: tuple[int, ...] = tuple(w.index(g) for w, g in zip(WHEEL_LETTERS, GUIDE_LETTERS))
WHEEL_STARTS: tuple[int, ...] = tuple(int(s) for s in np.cumsum((0, *WHEEL_SIZES[:-1])))
NUM_PINS = sum(WHEEL_SIZES)  # 131
NUM_BARS = 27
NUM_WHEELS = 6

#: The 22 lug pairs, in the order of ``lug_pair_counts``: (0, 0), then (0, k) for k = 1..6,
#: then the 15 overlaps (j, k), 1 <= j < k <= 6, in lexicographic order.
LUG_PAIRS: tuple[tuple[int, int], ...] = (
    (0, 0),
    *((0, k) for k in range(1, 7)),
    *((j, k) for j in range(1, 7) for k in range(j + 1, 7)),
)
_PAIR_INDEX = np.full((7, 7), -1, dtype=np.int64)
for _i, (_a, _b) in enumerate(LUG_PAIRS):
    _PAIR_INDEX[_a, _b] = _i


def _pair_hits() -> npt.NDArray[np.uint8]:
    """(22, 64): 1 where a bar with that lug pair is kicked by that 6-bit effective-wheel mask."""
    hits = np.zeros((len(LUG_PAIRS), 64), dtype=np.uint8)
    for i, (a, b) in enumerate(LUG_PAIRS):
        bar = (1 << (a - 1) if a else 0) | (1 << (b - 1) if b else 0)
        hits[i] = [(bar & m) != 0 for m in range(64)]
    return hits


_PAIR_HITS = _pair_hits()


# --- letters ---------------------------------------------------------------------------------

def letters_to_array(text: str, *, spaces: bool = True) -> npt.NDArray[np.uint8]:
    """Letters A..Z to uint8 0..25. With ``spaces`` a space becomes Z, as the reference's
    ``M209.encrypt`` does; any other character raises ValueError."""
    if spaces:
        text = text.replace(" ", "Z")
    bad = sorted(set(text) - set(string.ascii_uppercase))
    if bad:
        raise ValueError(f"letters_to_array: characters {bad!r} are not M-209 letters A..Z"
                         + ("" if spaces else " (pass spaces=True to read a space as Z)"))
    return (np.frombuffer(text.encode("ascii"), dtype=np.uint8) - ord("A")).astype(np.uint8)


def array_to_letters(values: npt.ArrayLike, *, z_as_space: bool = False) -> str:
    """uint8 0..25 (1-D) to letters; with ``z_as_space`` a Z prints as a space, as the
    reference's ``M209.decrypt`` does by default."""
    a = np.asarray(values)
    if a.ndim != 1 or (a.size and (a.min() < 0 or a.max() > 25)):
        raise ValueError(f"array_to_letters: need a 1-D array of values 0..25, got shape {a.shape}")
    text = (a.astype(np.uint8) + ord("A")).tobytes().decode("ascii")
    return text.replace("Z", " ") if z_as_space else text


def positions_from_letters(settings: str | Sequence[str]) -> npt.NDArray[np.int64]:
    """Six-letter key wheel settings (what the operator sees, e.g. ``"AAAAAA"``) to wheel
    positions: ``(6,)`` for one string, ``(K, 6)`` for a sequence. Each position is the index of
    the letter on its wheel (wheel 2 has no W, so its Z is position 24)."""
    one = isinstance(settings, str)
    batch = [settings] if isinstance(settings, str) else list(settings)
    out = np.empty((len(batch), NUM_WHEELS), dtype=np.int64)
    for i, s in enumerate(batch):
        if len(s) != NUM_WHEELS:
            raise ValueError(f"key wheel setting {s!r}: need 6 letters, one per wheel")
        for w, c in enumerate(s):
            pos = WHEEL_LETTERS[w].find(c)
            if pos < 0:
                raise ValueError(f"key wheel setting {s!r}: wheel {w + 1} has no letter {c!r} "
                                 f"(its letters are {WHEEL_LETTERS[w]})")
            out[i, w] = pos
    return out[0] if one else out


def letters_from_positions(positions: npt.ArrayLike) -> list[str]:
    """Inverse of ``positions_from_letters`` for a ``(K, 6)`` array."""
    p = _check_positions(positions, None)
    return ["".join(WHEEL_LETTERS[w][int(row[w])] for w in range(NUM_WHEELS)) for row in p]


# --- validation ------------------------------------------------------------------------------

def _check_pins(pins: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    p = np.asarray(pins)
    if p.ndim != 2 or p.shape[1] != NUM_PINS:
        raise ValueError(f"pins: need shape (K, {NUM_PINS}) (wheels of {WHEEL_SIZES} pins), got {p.shape}")
    if p.dtype != np.bool_:
        if not np.isin(p, (0, 1)).all():
            raise ValueError("pins: values must be bool (effective) or 0/1")
        p = p.astype(np.bool_)
    return p


def _check_lugs(lugs: npt.ArrayLike) -> npt.NDArray[np.int64]:
    lg = np.asarray(lugs)
    if lg.ndim != 3 or lg.shape[1:] != (NUM_BARS, 2):
        raise ValueError(f"lugs: need shape (K, {NUM_BARS}, 2): 27 bars of two lugs each, got {lg.shape}")
    if not np.issubdtype(lg.dtype, np.integer):
        raise ValueError(f"lugs: need integers 0..6, got dtype {lg.dtype}")
    lg = lg.astype(np.int64)
    if lg.size and (lg.min() < 0 or lg.max() > 6):
        raise ValueError(f"lugs: lug positions must be 0 (neutral) or 1..6 (a wheel); found {lg.min()}..{lg.max()}")
    a, b = np.minimum(lg[..., 0], lg[..., 1]), np.maximum(lg[..., 0], lg[..., 1])
    same = (a == b) & (a > 0)
    if same.any():
        k, bar = np.argwhere(same)[0]
        raise ValueError(f"lugs: key {k}, bar {bar}: both lugs on wheel {a[k, bar]}; a bar's two lugs must be "
                         "on different wheels (or one of them neutral, 0)")
    return np.stack([a, b], axis=-1)


def _check_positions(positions: npt.ArrayLike, k: int | None) -> npt.NDArray[np.int64]:
    if isinstance(positions, str) or (isinstance(positions, Sequence) and positions
                                      and isinstance(positions[0], str)):
        positions = positions_from_letters(positions)  # type: ignore[arg-type]
    p = np.asarray(positions)
    if p.ndim == 1:
        p = np.broadcast_to(p, (k if k is not None else 1, p.shape[0]))
    if p.ndim != 2 or p.shape[1] != NUM_WHEELS or (k is not None and p.shape[0] != k):
        raise ValueError(f"positions: need shape ({k if k is not None else 'K'}, 6), got {p.shape}")
    if not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"positions: need integer wheel positions, got dtype {p.dtype}")
    p = p.astype(np.int64)
    sizes = np.asarray(WHEEL_SIZES)
    if ((p < 0) | (p >= sizes)).any():
        raise ValueError(f"positions: wheel positions must lie in 0..n-1 for wheel sizes {WHEEL_SIZES}")
    return p


# --- the machine -----------------------------------------------------------------------------

def lug_pair_counts(lugs: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """``(K, 27, 2)`` lugs to ``(K, 22)`` counts of bars per lug pair, in ``LUG_PAIRS`` order:
    index 0 counts bars with no lug ``(0, 0)``, 1..6 single-lug bars ``(0, k)``, 7..21 the
    overlaps ``(j, k)``, ``1 <= j < k <= 6``. Each row sums to 27. The drum count depends on the
    lugs only through these counts (bars are interchangeable)."""
    lg = _check_lugs(lugs)
    idx = _PAIR_INDEX[lg[..., 0], lg[..., 1]]  # (K, 27)
    counts = np.zeros((lg.shape[0], len(LUG_PAIRS)), dtype=np.int64)
    np.add.at(counts, (np.arange(lg.shape[0])[:, None], idx), 1)
    return counts


def drum_tables(lugs: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """``(K, 64)`` drum count for each 6-bit mask of wheels whose presented pin is effective
    (bit w-1 for wheel w)."""
    return (lug_pair_counts(lugs) @ _PAIR_HITS.astype(np.int64)).astype(np.uint8)


def drum_tables_from_counts(counts: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """``(K, 22)`` lug-pair counts (``LUG_PAIRS`` order) to ``(K, 64)`` drum tables."""
    c = np.asarray(counts)
    if c.ndim != 2 or c.shape[1] != len(LUG_PAIRS) or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"lug-pair counts: need integer shape (K, {len(LUG_PAIRS)}), got {c.dtype} {c.shape}")
    if c.size and (c.min() < 0 or (c.sum(axis=1) != NUM_BARS).any()):
        raise ValueError(f"lug-pair counts: need non-negative counts summing to {NUM_BARS} per key")
    return (c.astype(np.int64) @ _PAIR_HITS.astype(np.int64)).astype(np.uint8)


def keystream_from_tables(pins: npt.ArrayLike, tables: npt.ArrayLike, positions: npt.ArrayLike,
                          length: int) -> npt.NDArray[np.uint8]:
    """As ``keystream``, with the lugs given as drum tables (``drum_tables``, ``drum_tables_from_counts``)."""
    t = np.asarray(tables)
    masks = effective_masks(pins, positions, length)
    if t.shape != (masks.shape[0], 64):
        raise ValueError(f"drum tables: need shape ({masks.shape[0]}, 64), got {t.shape}")
    return np.take_along_axis(t, masks.astype(np.intp), axis=1)


def effective_masks(pins: npt.ArrayLike, positions: npt.ArrayLike, length: int) -> npt.NDArray[np.uint8]:
    """``(K, length)`` 6-bit masks of the wheels whose presented pin is effective, letter by letter."""
    p = _check_pins(pins)
    pos = _check_positions(positions, p.shape[0])
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    steps = np.arange(length, dtype=np.int64)
    masks = np.zeros((p.shape[0], length), dtype=np.uint8)
    for w in range(NUM_WHEELS):
        idx = (pos[:, w:w + 1] + steps + GUIDE_OFFSETS[w]) % WHEEL_SIZES[w] + WHEEL_STARTS[w]
        masks |= np.take_along_axis(p, idx, axis=1).astype(np.uint8) << w
    return masks


def keystream(pins: npt.ArrayLike, lugs: npt.ArrayLike, positions: npt.ArrayLike,
              length: int) -> npt.NDArray[np.uint8]:
    """Drum counts ``k`` (0..27) for ``length`` letters, for K keys at once.

    ``pins``: (K, 131) bool; ``lugs``: (K, 27, 2) ints 0..6; ``positions``: (K, 6) or (6,) wheel
    positions (``positions_from_letters``), or six-letter settings. Returns (K, length) uint8.
    The cipher uses ``k mod 26``."""
    tables = drum_tables(lugs)
    masks = effective_masks(pins, positions, length)
    if tables.shape[0] != masks.shape[0]:
        raise ValueError(f"pins are for {masks.shape[0]} keys but lugs for {tables.shape[0]}")
    return np.take_along_axis(tables, masks.astype(np.intp), axis=1)


def _text(text: npt.ArrayLike | str, k: int) -> npt.NDArray[np.int64]:
    a = letters_to_array(text) if isinstance(text, str) else np.asarray(text)
    if a.ndim == 1:
        a = np.broadcast_to(a, (k, a.shape[0]))
    if a.ndim != 2 or a.shape[0] != k:
        raise ValueError(f"text: need shape (L,) or ({k}, L), got {a.shape}")
    if a.size and (a.min() < 0 or a.max() > 25):
        raise ValueError("text: letters must be 0..25 (A = 0)")
    return a.astype(np.int64)


def encrypt(pins: npt.ArrayLike, lugs: npt.ArrayLike, positions: npt.ArrayLike,
            plaintext: npt.ArrayLike | str) -> npt.NDArray[np.uint8]:
    """Encipher ``plaintext`` ((L,) shared by all keys, (K, L), or a string) under K keys from
    the given wheel positions: ``c = (25 - p + k) mod 26``. Returns (K, L) uint8."""
    k = np.asarray(pins).shape[0] if np.asarray(pins).ndim == 2 else -1
    p = _text(plaintext, k)
    ks = keystream(pins, lugs, positions, p.shape[1]).astype(np.int64)
    return ((25 - p + ks) % 26).astype(np.uint8)


def decrypt(pins: npt.ArrayLike, lugs: npt.ArrayLike, positions: npt.ArrayLike,
            ciphertext: npt.ArrayLike | str) -> npt.NDArray[np.uint8]:
    """Decipher: the M-209's map is an involution, so this is ``encrypt``. A deciphered Z stands
    for a space (``array_to_letters(..., z_as_space=True)``)."""
    return encrypt(pins, lugs, positions, ciphertext)


def keystream_from_known_plaintext(plaintext: npt.ArrayLike, ciphertext: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """``k mod 26 = (c + p + 1) mod 26``; for the all-A plaintext, ``(c + 1) mod 26``."""
    p, c = np.asarray(plaintext, dtype=np.int64), np.asarray(ciphertext, dtype=np.int64)
    return ((c + p + 1) % 26).astype(np.uint8)


# --- one key ---------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Key:
    """One M-209 key: ``pins`` (131,) bool (wheel 1's 26 first), ``lugs`` (27, 2) normalised
    to ``a <= b``. Validated on construction; arrays are copied and made read-only."""

    pins: npt.NDArray[np.bool_]
    lugs: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        pins = _check_pins(np.asarray(self.pins)[None])[0].copy()
        lugs = _check_lugs(np.asarray(self.lugs)[None])[0].copy()
        pins.flags.writeable = False
        lugs.flags.writeable = False
        object.__setattr__(self, "pins", pins)
        object.__setattr__(self, "lugs", lugs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        return bool(np.array_equal(self.pins, other.pins)
                    and np.array_equal(self.lug_pair_counts(), other.lug_pair_counts()))

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_wheels(cls, wheels: Sequence[npt.ArrayLike], lugs: npt.ArrayLike) -> Key:
        """Pins given per wheel: six bool arrays of 26, 25, 23, 21, 19, 17 pins."""
        if len(wheels) != NUM_WHEELS:
            raise ValueError(f"from_wheels: need 6 wheels of pins, got {len(wheels)}")
        parts = [np.asarray(w, dtype=np.bool_) for w in wheels]
        bad = [f"wheel {i + 1}: {p.shape[0] if p.ndim == 1 else p.shape} pins, needs {n}"
               for i, (p, n) in enumerate(zip(parts, WHEEL_SIZES)) if p.shape != (n,)]
        if bad:
            raise ValueError("from_wheels: " + "; ".join(bad))
        return cls(pins=np.concatenate(parts), lugs=np.asarray(lugs))

    def wheel_pins(self, wheel: int) -> npt.NDArray[np.bool_]:
        """Pins of wheel 1..6."""
        if not 1 <= wheel <= NUM_WHEELS:
            raise ValueError(f"wheel must be 1..6, got {wheel}")
        s = WHEEL_STARTS[wheel - 1]
        return self.pins[s:s + WHEEL_SIZES[wheel - 1]]

    def lug_pair_counts(self) -> npt.NDArray[np.int64]:
        """The 22 lug-pair counts (see the module function); they sum to 27."""
        return lug_pair_counts(self.lugs[None])[0]

    @property
    def overlaps(self) -> int:
        """Bars with both lugs on wheels."""
        return int(((self.lugs[:, 0] > 0) & (self.lugs[:, 1] > 0)).sum())

    def pin_list(self) -> list[str]:
        """Effective pins as the reference's six strings of letters."""
        return ["".join(c for c, e in zip(WHEEL_LETTERS[w], self.wheel_pins(w + 1)) if e)
                for w in range(NUM_WHEELS)]

    def lug_string(self) -> str:
        """Lugs in key-list notation, as the reference's ``Drum.to_key_list()`` prints them."""
        from m209.drum import Drum

        bars = [(int(b) - 1,) if a == 0 else (int(a) - 1, int(b) - 1) for a, b in self.lugs if b > 0]
        return str(Drum(bars).to_key_list())

    def letter_check(self) -> str:
        """26 A's enciphered from AAAAAA, in groups of five: the key list's letter check."""
        c = array_to_letters(encrypt(self.pins[None], self.lugs[None], np.zeros(6, np.int64), "A" * 26)[0])
        return " ".join(c[i:i + 5] for i in range(0, 26, 5))

    def to_reference(self, indicator: str = "AA") -> Any:
        """The reference package's ``m209.keylist.KeyList`` for this key."""
        from m209.keylist import KeyList

        return KeyList(indicator=indicator, lugs=self.lug_string(), pin_list=self.pin_list(),
                       letter_check=self.letter_check())

    def reference_machine(self) -> Any:
        """A reference ``m209.converter.M209`` set to this key (wheels at AAAAAA)."""
        from m209.converter import M209

        return M209(lugs=self.lug_string(), pin_list=self.pin_list())

    @classmethod
    def from_reference(cls, key_list: Any) -> Key:
        """From an ``m209.keylist.KeyList`` (or anything with ``lugs`` in key-list notation and a
        six-string ``pin_list``)."""
        from m209.drum import Drum

        bars = Drum.from_key_list(key_list.lugs).bars
        if len(bars) > NUM_BARS:
            raise ValueError(f"from_reference: {len(bars)} bars, the drum has 27")
        lugs = np.zeros((NUM_BARS, 2), dtype=np.int64)
        for i, bar in enumerate(bars):
            if bar is None:
                continue
            if len(bar) == 1:
                lugs[i] = (0, bar[0] + 1)
            else:
                lugs[i] = sorted((bar[0] + 1, bar[1] + 1))
        pin_list = list(key_list.pin_list)
        if len(pin_list) != NUM_WHEELS:
            raise ValueError(f"from_reference: pin_list has {len(pin_list)} wheels, need 6")
        wheels = []
        for w, letters in enumerate(pin_list):
            bad = set(letters) - set(WHEEL_LETTERS[w])
            if bad:
                raise ValueError(f"from_reference: wheel {w + 1} has no pins {sorted(bad)}")
            wheels.append(np.array([c in letters for c in WHEEL_LETTERS[w]]))
        return cls.from_wheels(wheels, lugs)


def stack_keys(keys: Sequence[Key]) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """Keys to the batch arrays ``(pins (K, 131), lugs (K, 27, 2))`` that ``keystream`` takes."""
    return np.stack([k.pins for k in keys]), np.stack([k.lugs for k in keys])
