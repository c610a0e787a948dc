"""M-209 datasets: keys by the manual's procedure, ciphertexts, and one packed set per split.

Three resumable steps (each a ``veil m209`` command), then ``load_packed`` for the training code::

    DIR/<split>/keys.json, cipher.json   manifests: settings; per chunk its count, sha256, source chunk's sha256
    DIR/<split>/keys-00000.npz       pins (n, 131) bool, lugs (n, 27, 2) int8        (generate_key_chunks)
    DIR/<split>/cipher-00000.npz     plaintext, ciphertext (n, L) uint8, positions (n, 6) uint8  (encrypt_split)
    DIR/<split>/packed/              (pack_split; written into a temporary directory, then renamed)
        keystream.npy (N, L) uint8   drum count mod 26 recovered from the known plaintext
        ciphertext.npy, plaintext.npy (N, L) uint8; positions.npy (N, 6) uint8 wheel positions
        pins.npy (N, 131) uint8 0/1; lugs.npy (N, 22) uint8 lug-pair counts (``LUG_PAIRS`` order)
        overlaps.npy (N,) uint8 bars with two lugs; fingerprints.npy (N, 16) uint8 (``key_fingerprints``)
        meta.json                    format, split, n, letters, plaintext and indicator modes, sha256 per .npy

Compatibility contract: ``FORMAT`` names this layout; readers refuse another and never unpickle. Re-running a
step with the same settings makes only the chunks its manifest does not list; other settings are refused
(``DatasetError``) unless ``force``, which deletes that step's chunks first. No key may be in two splits of one
DIR, nor in an ``exclude`` directory: fingerprints are compared after keygen and before pack.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from veil.files import write_atomic
from veil.m209.keys import generate_keys, generate_positions, make_rng
from veil.m209.machine import NUM_PINS, encrypt, letters_to_array, lug_pair_counts, positions_from_letters
from veil.m209.machine import keystream_from_known_plaintext as known_keystream

FORMAT = "veil-m209-dataset/1"
#: Packed arrays (all uint8): their shapes after N (L: letters) and the bound their values stay below.
PACKED_SPEC: dict[str, tuple[tuple[int | str, ...], int]] = {
    "keystream": (("L",), 26), "ciphertext": (("L",), 26), "plaintext": (("L",), 26), "positions": ((6,), 26),
    "pins": ((NUM_PINS,), 2), "lugs": ((22,), 28), "overlaps": ((), 13), "fingerprints": ((16,), 256)}
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
Task = tuple[Any, ...]  # (chunk file name, sha256 of the chunk it is made from or None, ...): one chunk's work


class DatasetError(ValueError):
    """A dataset directory that cannot be used as asked: missing, tampered, or made with other settings."""


@dataclass(frozen=True)
class StepResult:
    """What one step did: ``made`` of ``total`` items in ``chunks_made`` new chunks (others were there)."""

    split_dir: Path
    total: int
    made: int
    chunks_made: int
    chunks_skipped: int
    seconds: float


@dataclass(frozen=True, eq=False)
class PackedSet:
    """A packed split (shapes in the module docstring); ``meta`` is its meta.json."""

    path: Path
    meta: dict[str, Any]
    keystream: npt.NDArray[np.uint8]
    ciphertext: npt.NDArray[np.uint8]
    plaintext: npt.NDArray[np.uint8]
    positions: npt.NDArray[np.uint8]
    pins: npt.NDArray[np.uint8]
    lugs: npt.NDArray[np.uint8]
    overlaps: npt.NDArray[np.uint8]
    fingerprints: npt.NDArray[np.uint8] = field(repr=False)

    def __len__(self) -> int:
        return len(self.pins)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _save(path: Path, save: Callable[..., None], *args: Any, **kwargs: Any) -> str:
    """``save(buffer, *args, **kwargs)`` (np.save, np.savez), then the bytes to ``path`` atomically; their sha256."""
    buf = io.BytesIO()
    save(buf, *args, **kwargs)
    write_atomic(path, buf.getvalue())
    return _sha(buf.getvalue())


def _load_npz(path: Path, sha256: str, names: Iterable[str]) -> dict[str, npt.NDArray[Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing; re-run the step that makes it with the same settings") from None
    if _sha(data) != sha256:
        raise DatasetError(f"{path}: sha256 differs from its manifest: changed or corrupted; delete it and "
                           "re-run the step that makes it")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {n: z[n] for n in names}


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise DatasetError(f"{path}: not a {what} of format {FORMAT}")
    return obj


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _chunk_plan(total: int, chunk: int) -> list[tuple[int, int]]:
    if total < 1 or chunk < 1:
        raise DatasetError(f"need keys >= 1 and chunk >= 1, got keys={total}, chunk={chunk}")
    return [(i, min(chunk, total - i * chunk)) for i in range((total + chunk - 1) // chunk)]


def _chunk_seed(seed: int | None, split: str, kind: str, index: int) -> int | None:
    digest = hashlib.sha256(f"{seed}:{split}:{kind}:{index}".encode()).digest()  # seeds for tests only
    return None if seed is None else int.from_bytes(digest[:16], "little")


def _run_step(split_dir: Path, kind: str, settings: dict[str, Any], force: bool, tasks: Sequence[Task],
              worker: Callable[[Task], dict[str, Any]], workers: int | None, progress: bool, total: int) -> StepResult:
    """Make each chunk ``task[0]`` that ``kind.json`` does not list (or that is missing), by ``workers`` processes
    (default: all CPUs; 1 runs here), listing each as it completes. ``task[1]`` is the sha256 of the chunk it is
    made from (or None). Other settings than the manifest's are refused unless ``force``, which deletes the chunks."""
    start, path = time.perf_counter(), split_dir / f"{kind}.json"
    old, chunks = None if force else _read_json(path, "manifest"), sorted(split_dir.glob(f"{kind}-*.npz"))
    if (old is None and chunks and not force) or (old is not None and old["settings"] != settings):
        why = "were made with " + ", ".join(f"{k}={old['settings'].get(k)!r} (this run: {v!r})" for k, v in
                                            settings.items() if old["settings"].get(k) != v) if old else "are unlisted"
        raise DatasetError(f"{path}: this split's {kind} {why}; re-run with the same settings to resume, or pass "
                           f"--force (force=True) to delete its {len(chunks)} {kind} chunk(s)")
    manifest = old or {"format": FORMAT, "settings": settings, "chunks": {}}
    for f in [] if old else chunks:
        f.unlink()
    for t in tasks:
        if manifest["chunks"].get(t[0], {"source": t[1]})["source"] != t[1]:
            raise DatasetError(f"{split_dir / t[0]} was made from other keys (regenerated?); re-run with --force")
    split_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, manifest)
    todo = [t for t in tasks if not (t[0] in manifest["chunks"] and (split_dir / t[0]).exists())]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    fork = "fork" in multiprocessing.get_all_start_methods()  # cheap workers: no re-import of veil (torch)
    pool = multiprocessing.get_context("fork" if fork else None).Pool(workers) if workers > 1 else None
    with pool or contextlib.nullcontext(), tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="chunk",
                                                desc=f"{kind} {split_dir.name}", disable=not progress) as bar:
        for entry in pool.imap_unordered(worker, todo) if pool else map(worker, todo):
            manifest["chunks"][entry.pop("name")] = entry
            _write_json(path, manifest)
            bar.update(1)
    made = sum(manifest["chunks"][t[0]]["count"] for t in todo)
    return StepResult(split_dir, total, made, len(todo), len(tasks) - len(todo), time.perf_counter() - start)


def _complete(split_dir: Path, kind: str, step: str) -> dict[str, Any]:
    """The manifest of ``kind``, which must list every chunk that keys.json plans."""
    m, keys_m = _read_json(split_dir / f"{kind}.json", "manifest"), _read_json(split_dir / "keys.json", "manifest")
    if m is None or keys_m is None:
        raise DatasetError(f"{split_dir / (kind + '.json')}: missing; run `veil m209 {step}` first")
    want = len(_chunk_plan(int(keys_m["settings"]["keys"]), int(keys_m["settings"]["chunk"])))
    if len(m["chunks"]) != want:
        raise DatasetError(f"{split_dir}: {len(m['chunks'])} of {want} {kind} chunks made; re-run "
                           f"`veil m209 {step}` with the same settings to finish")
    for name, e in m["chunks"].items():  # a cipher chunk must encipher the keys listed now (None: a key chunk)
        if e["source"] not in (None, keys_m["chunks"].get(name.replace("cipher-", "keys-"), {}).get("sha256")):
            raise DatasetError(f"{split_dir / name} was made from other keys (regenerated?); re-run encrypt --force")
    return m


def key_fingerprints(pins: npt.ArrayLike, lug_counts: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """(N, 16): the first 16 bytes of sha256(pins as 131 bytes 0/1 + the 22 lug-pair counts as bytes), a key's
    identity independent of the order of its bars."""
    p, c = np.asarray(pins).astype(np.uint8), np.asarray(lug_counts).astype(np.uint8)
    if p.ndim != 2 or p.shape[1] != NUM_PINS or c.shape != (p.shape[0], 22):
        raise DatasetError(f"key_fingerprints: need pins (N, 131) and lug counts (N, 22), got {p.shape}, {c.shape}")
    digests = b"".join(hashlib.sha256(row.tobytes()).digest()[:16] for row in np.concatenate([p, c], axis=1))
    return np.frombuffer(digests, dtype=np.uint8).reshape(-1, 16).copy()


def _count_shared(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> int:
    return len({r.tobytes() for r in a} & {r.tobytes() for r in b})


def check_disjoint(train: PackedSet, test: PackedSet) -> None:
    """Raise DatasetError if a key (by fingerprint) is in both sets."""
    if n := _count_shared(test.fingerprints, train.fingerprints):
        raise DatasetError(f"{test.path} shares {n} key(s) with {train.path}: a key may be in one split only")


def _split_fingerprints(split_dir: Path) -> npt.NDArray[np.uint8]:
    m = _read_json(split_dir / "keys.json", "keys manifest")
    if m is None:
        return load_packed(split_dir / "packed").fingerprints
    keys = [_load_npz(split_dir / n, e["sha256"], ("pins", "lugs")) for n, e in sorted(m["chunks"].items())]
    return np.concatenate([np.empty((0, 16), np.uint8)]
                          + [key_fingerprints(k["pins"], lug_pair_counts(k["lugs"])) for k in keys])


def _check_against(split_dir: Path, fingerprints: npt.NDArray[np.uint8], exclude: Sequence[str | Path],
                   hint: str) -> None:
    """Refuse keys that a sibling split of ``split_dir`` or an ``exclude`` split (or DIR of splits) holds."""
    def is_split(d: Path) -> bool:
        return (d / "keys.json").exists() or (d / "packed" / "meta.json").exists()

    def splits_in(d: Path) -> list[Path]:
        return [s for s in sorted(d.iterdir()) if s.is_dir() and is_split(s)] if d.is_dir() else []

    others = splits_in(split_dir.parent)
    for e in map(Path, exclude):
        if not (more := [e] if is_split(e) else splits_in(e)):
            raise DatasetError(f"--exclude {e}: neither a split directory nor a directory holding splits")
        others += more
    for other in {d.resolve(): d for d in others if d.resolve() != split_dir.resolve()}.values():
        if n := _count_shared(fingerprints, _split_fingerprints(other)):
            raise DatasetError(f"{split_dir} shares {n} key(s) with {other}: a key may be in one split only; {hint}")


def _keygen_worker(task: Task) -> dict[str, Any]:
    name, _, split_dir, n, overlaps, seed = task
    pins, lugs = generate_keys(n, overlaps=overlaps, rng=make_rng(seed))
    sha = _save(split_dir / name, np.savez, pins=pins, lugs=lugs.astype(np.int8))
    return {"name": name, "count": n, "sha256": sha, "source": None}


def generate_key_chunks(out: str | Path, split: str, keys: int, *, overlaps: int | None = None, chunk: int = 10_000,
                        workers: int | None = None, seed: int | None = None, exclude: Sequence[str | Path] = (),
                        force: bool = False, progress: bool = True) -> StepResult:
    """Make the missing ``keys-*.npz`` chunks of ``out/split`` (``generate_keys`` on a fresh secrets-seeded
    ``make_rng()`` per chunk; ``seed`` derives per-chunk seeds instead: reproducible, for tests only), then
    check that no key is in another split (siblings, ``exclude``)."""
    if seed is not None:
        warnings.warn("keys from a fixed seed are reproducible by anyone who knows it: for tests only", stacklevel=2)
    if not _SPLIT_NAME.match(split):
        raise DatasetError(f"split name {split!r}: use letters, digits, '-' or '_' (e.g. train, test)")
    split_dir, plan = Path(out) / split, _chunk_plan(keys, chunk)
    settings = {"split": split, "keys": keys, "chunk": chunk, "overlaps": overlaps, "seed": seed}
    tasks = [(f"keys-{i:05d}.npz", None, split_dir, n, overlaps, _chunk_seed(seed, split, "keys", i)) for i, n in plan]
    result = _run_step(split_dir, "keys", settings, force, tasks, _keygen_worker, workers, progress, keys)
    _check_against(split_dir, _split_fingerprints(split_dir), exclude,
                   "delete this split's chunks holding them and re-run keygen")
    return result


def _plaintext_setting(plaintext: str, letters: int) -> tuple[str, npt.NDArray[np.uint8] | None]:
    if plaintext in ("all-a", "random"):
        return plaintext, None
    try:
        text = " ".join(Path(plaintext).read_text().upper().split())  # line breaks and tabs become spaces (Z)
        arr = np.resize(letters_to_array(text, spaces=True), letters).astype(np.uint8) if text else None
    except (OSError, ValueError) as e:
        raise DatasetError(f"plaintext {plaintext!r}: not all-a, random, or a readable file of letters: {e}") from e
    if arr is None:
        raise DatasetError(f"plaintext file {plaintext}: no letters")
    return f"file:{_sha(arr.tobytes())}", arr


def _encrypt_worker(task: Task) -> dict[str, Any]:
    name, key_sha, split_dir, key_name, letters, plain_mode, plain, indicator, seed = task
    k = _load_npz(split_dir / key_name, key_sha, ("pins", "lugs"))
    n, rng = k["pins"].shape[0], make_rng(seed)
    positions = (generate_positions(n, rng=rng) if indicator == "random"
                 else np.broadcast_to(positions_from_letters(indicator), (n, 6)))
    plain = (rng.integers(0, 26, size=(n, letters), dtype=np.uint8) if plain_mode == "random"
             else np.broadcast_to(np.zeros(letters, np.uint8) if plain is None else plain, (n, letters)))
    cipher = encrypt(k["pins"], k["lugs"], positions, plain)
    sha = _save(split_dir / name, np.savez, plaintext=np.ascontiguousarray(plain, dtype=np.uint8), ciphertext=cipher,
                    positions=np.ascontiguousarray(positions, dtype=np.uint8))
    return {"name": name, "count": n, "sha256": sha, "source": key_sha}


def encrypt_split(out: str | Path, split: str, letters: int, *, plaintext: str = "all-a", indicator: str = "random",
                  workers: int | None = None, seed: int | None = None, force: bool = False,
                  progress: bool = True) -> StepResult:
    """Make the missing ``cipher-*.npz`` chunks: each key enciphers ``letters`` letters of ``plaintext`` (``all-a``,
    ``random``, or a text file cycled or cut to length) from wheel positions ``indicator`` (``random``, ``AAAAAA``)."""
    if letters < 1:
        raise DatasetError(f"letters must be >= 1, got {letters}")
    if indicator != "random":
        positions_from_letters(indicator)  # a clear ValueError for a bad setting, before any work
    split_dir = Path(out) / split
    keys_m = _complete(split_dir, "keys", "keygen")
    plain_mode, plain = _plaintext_setting(plaintext, letters)
    settings = {"split": split, "letters": letters, "plaintext": plain_mode, "indicator": indicator, "seed": seed}
    tasks = [(name.replace("keys-", "cipher-"), e["sha256"], split_dir, name, letters, plain_mode, plain, indicator,
              _chunk_seed(seed, split, "cipher", i)) for i, (name, e) in enumerate(sorted(keys_m["chunks"].items()))]
    return _run_step(split_dir, "cipher", settings, force, tasks, _encrypt_worker, workers, progress,
                     int(keys_m["settings"]["keys"]))


def _packed_arrays(split_dir: Path, keys_m: dict[str, Any], cipher_m: dict[str, Any]) -> dict[str, npt.NDArray[Any]]:
    parts: dict[str, list[npt.NDArray[Any]]] = {n: [] for n in PACKED_SPEC}
    for name, entry in sorted(cipher_m["chunks"].items()):
        key_name = name.replace("cipher-", "keys-")
        k = _load_npz(split_dir / key_name, keys_m["chunks"][key_name]["sha256"], ("pins", "lugs"))
        c = _load_npz(split_dir / name, entry["sha256"], ("plaintext", "ciphertext", "positions"))
        counts = lug_pair_counts(k["lugs"])
        for n, a in (("keystream", known_keystream(c["plaintext"], c["ciphertext"])), ("pins", k["pins"]),
                     ("ciphertext", c["ciphertext"]), ("plaintext", c["plaintext"]), ("positions", c["positions"]),
                     ("lugs", counts), ("overlaps", counts[:, 7:].sum(axis=1)),
                     ("fingerprints", key_fingerprints(k["pins"], counts))):
            parts[n].append(a.astype(np.uint8))
    return {n: np.ascontiguousarray(np.concatenate(p)) for n, p in parts.items()}


def pack_split(out: str | Path, split: str, *, exclude: Sequence[str | Path] = (), force: bool = False) -> Path:
    """Concatenate the split's chunks into ``out/split/packed`` (a temporary directory renamed into place) after
    checking that no key is in another split; if up to date (and not ``force``) nothing is done. Returns the dir."""
    split_dir = Path(out) / split
    keys_m, cipher_m = _complete(split_dir, "keys", "keygen"), _complete(split_dir, "cipher", "encrypt")
    sources = _sha(json.dumps([keys_m["chunks"], cipher_m["chunks"]], sort_keys=True).encode())
    target = split_dir / "packed"
    if not force and (old := _read_json(target / "meta.json", "packed set")) and old.get("sources") == sources:
        return target
    if target.exists() and not force:
        raise DatasetError(f"{target}: exists, packed from other chunks; pass --force (force=True) to replace it")
    arrays = _packed_arrays(split_dir, keys_m, cipher_m)
    _check_against(split_dir, arrays["fingerprints"], exclude, "regenerate this split's keys")
    s = cipher_m["settings"]
    meta = {"format": FORMAT, "split": split, "n": len(arrays["pins"]), "letters": s["letters"],
            "plaintext": s["plaintext"], "indicator": s["indicator"], "sources": sources, "sha256": {}}
    tmp = Path(tempfile.mkdtemp(dir=split_dir, prefix=".packed-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the packed set is as readable as the chunks
    try:
        for name, arr in arrays.items():
            meta["sha256"][f"{name}.npy"] = _save(tmp / f"{name}.npy", np.save, arr, allow_pickle=False)
        _write_json(tmp / "meta.json", meta)
        aside = Path(tempfile.mkdtemp(dir=split_dir, prefix=".packed-old-"))
        if target.exists():
            os.replace(target, aside / "packed")  # moved aside (kept there if the next rename fails)
        os.replace(tmp, target)
        shutil.rmtree(aside)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_packed(path: str | Path) -> PackedSet:
    """Read a packed directory (or a split directory holding ``packed/``), checking each file's sha256, shape,
    dtype and value range against meta.json; DatasetError names the file at fault."""
    path = Path(path)
    if not (path / "meta.json").exists() and (path / "packed" / "meta.json").exists():
        path = path / "packed"
    meta = _read_json(path / "meta.json", "packed set")
    if meta is None:
        raise DatasetError(f"{path / 'meta.json'}: missing; run `veil m209 pack` first")
    n, letters = int(meta["n"]), int(meta["letters"])
    arrays: dict[str, npt.NDArray[Any]] = {}
    for name, (cols, bound) in PACKED_SPEC.items():
        f, shape = path / f"{name}.npy", (n, *tuple(letters if c == "L" else c for c in cols))
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            raise DatasetError(f"{f}: missing from the packed set; re-run `veil m209 pack --force`") from None
        if _sha(data) != meta["sha256"].get(f.name):
            raise DatasetError(f"{f}: sha256 differs from meta.json: changed or corrupted; re-run "
                               "`veil m209 pack --force`")
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.shape != shape or arr.dtype != np.uint8:
            raise DatasetError(f"{f}: shape {arr.shape} dtype {arr.dtype}, expected {shape} uint8")
        if arr.size and arr.max() >= bound:
            raise DatasetError(f"{f}: values up to {arr.max()}, expected below {bound}")
        arrays[name] = arr
    return PackedSet(path=path, meta=meta, **arrays)


def build_dataset(out: str | Path, split: str, keys: int, letters: int, *, plaintext: str = "all-a",
                  indicator: str = "random", overlaps: int | None = None, chunk: int = 10_000,
                  workers: int | None = None, seed: int | None = None, exclude: Sequence[str | Path] = (),
                  progress: bool = True) -> PackedSet:
    """keygen, encrypt and pack one split (each resumable, as the ``veil m209`` steps); returns the packed set."""
    generate_key_chunks(out, split, keys, overlaps=overlaps, chunk=chunk, workers=workers, seed=seed,
                        exclude=exclude, progress=progress)
    encrypt_split(out, split, letters, plaintext=plaintext, indicator=indicator, workers=workers, seed=seed,
                  progress=progress)
    return load_packed(pack_split(out, split, exclude=exclude))
