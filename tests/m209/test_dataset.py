"""The M-209 dataset steps (veil.m209.dataset, ``veil m209 keygen|encrypt|pack``): keys by the manual's
procedure, resume, refusals, arrays against the machine, tamper detection, disjoint splits."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from veil.cli.main import main
from veil.m209 import Key, check_procedure, keystream, lug_pair_counts
from veil.m209.dataset import (
    DatasetError,
    check_disjoint,
    encrypt_split,
    generate_key_chunks,
    key_fingerprints,
    load_packed,
    pack_split,
)


def _veil(*args: object) -> int:
    return main(["m209", *map(str, args)])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A train split of 300 keys (3 chunks) made by the CLI with 2 workers, enciphered (40 letters) and packed."""
    out = tmp_path_factory.mktemp("m209") / "data"
    assert _veil("keygen", "--split", "train", "--keys", 300, "--chunk", 100, "--workers", 2, "--out", out,
                 "--no-progress") == 0
    assert _veil("encrypt", "--data", out, "--split", "train", "--letters", 40, "--no-progress") == 0
    assert _veil("pack", "--data", out, "--split", "train") == 0
    return out


@pytest.fixture
def data(built, tmp_path) -> Path:
    """A private copy of the built dataset, for tests that change it."""
    return Path(shutil.copytree(built, tmp_path / "data"))


def _chunk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        return z["pins"], z["lugs"]


def test_keygen_follows_the_manual(built):
    manifest = json.loads((built / "train" / "keys.json").read_text())
    assert manifest["settings"] == {"split": "train", "keys": 300, "chunk": 100, "overlaps": None, "seed": None}
    assert sorted(manifest["chunks"]) == ["keys-00000.npz", "keys-00001.npz", "keys-00002.npz"]
    pins, lugs = _chunk(built / "train" / "keys-00001.npz")
    assert pins.shape == (100, 131) and pins.dtype == np.bool_
    assert lugs.shape == (100, 27, 2) and lugs.dtype == np.int8
    for i in range(0, 100, 7):
        assert check_procedure(Key(pins[i], lugs[i])) == [], f"key {i}"
    # fresh secrets-seeded generators per chunk: no two chunks repeat each other
    assert not np.array_equal(pins, _chunk(built / "train" / "keys-00000.npz")[0])


def test_keygen_overlaps_fixes_the_two_lug_bars(tmp_path):
    generate_key_chunks(tmp_path, "train", 20, overlaps=5, chunk=20, workers=1, progress=False)
    _, lugs = _chunk(tmp_path / "train" / "keys-00000.npz")
    assert (((lugs[..., 0] > 0) & (lugs[..., 1] > 0)).sum(axis=1) == 5).all()


def test_resume_makes_only_missing_chunks(data):
    split = data / "train"
    before = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
              for p in split.glob("keys-*.npz")}
    (split / "keys-00001.npz").unlink()
    result = generate_key_chunks(data, "train", 300, chunk=100, workers=2, progress=False)
    assert (result.chunks_made, result.chunks_skipped, result.made) == (1, 2, 100)
    after = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
             for p in split.glob("keys-*.npz")}
    assert after["keys-00000.npz"] == before["keys-00000.npz"]
    assert after["keys-00002.npz"] == before["keys-00002.npz"]
    assert after["keys-00001.npz"][1] != before["keys-00001.npz"][1]  # new keys, listed in the manifest
    manifest = json.loads((split / "keys.json").read_text())
    assert manifest["chunks"]["keys-00001.npz"]["sha256"] == after["keys-00001.npz"][1]
    # the old cipher chunk 1 was made from the deleted keys: encrypt refuses to mix them
    with pytest.raises(DatasetError, match=r"cipher-00001\.npz was made from other keys"):
        encrypt_split(data, "train", 40, workers=1, progress=False)
    with pytest.raises(DatasetError, match=r"cipher-00001\.npz was made from other keys"):
        pack_split(data, "train", force=True)  # nor does pack pair new keys with old ciphertexts
    # nothing left to do: a second run makes nothing
    assert generate_key_chunks(data, "train", 300, chunk=100, workers=1, progress=False).chunks_made == 0


def test_other_settings_are_refused_unless_forced(data, capsys):
    assert _veil("keygen", "--split", "train", "--keys", 400, "--chunk", 100, "--out", data, "--no-progress") == 1
    err = capsys.readouterr().err
    assert "keys=300 (this run: 400)" in err and "--force" in err
    assert len(list((data / "train").glob("keys-*.npz"))) == 3
    assert _veil("encrypt", "--data", data, "--split", "train", "--letters", 50, "--no-progress") == 1
    assert "letters=40 (this run: 50)" in capsys.readouterr().err
    assert _veil("encrypt", "--data", data, "--split", "train", "--letters", 40, "--indicator", "AAAAAA",
                 "--no-progress") == 1
    assert "indicator='random' (this run: 'AAAAAA')" in capsys.readouterr().err
    assert _veil("encrypt", "--data", data, "--split", "train", "--letters", 50, "--indicator", "AAAAAA",
                 "--force", "--no-progress") == 0
    # the packed set is from other chunks now: pack refuses to replace it without --force
    assert _veil("pack", "--data", data, "--split", "train") == 1
    assert "packed from other chunks" in capsys.readouterr().err
    assert _veil("pack", "--data", data, "--split", "train", "--force") == 0
    packed = load_packed(data / "train")
    assert packed.keystream.shape == (300, 50) and (packed.positions == 0).all()


def test_packed_arrays_agree_with_the_machine(built):
    packed = load_packed(built / "train" / "packed")
    assert len(packed) == 300 and packed.meta["letters"] == 40 and packed.meta["plaintext"] == "all-a"
    pins = np.concatenate([_chunk(built / "train" / f"keys-{i:05d}.npz")[0] for i in range(3)])
    lugs = np.concatenate([_chunk(built / "train" / f"keys-{i:05d}.npz")[1] for i in range(3)])
    assert np.array_equal(packed.pins, pins.astype(np.uint8))
    counts = lug_pair_counts(lugs)
    assert np.array_equal(packed.lugs, counts)
    assert np.array_equal(packed.overlaps, ((lugs[..., 0] > 0) & (lugs[..., 1] > 0)).sum(axis=1))
    assert np.array_equal(packed.keystream, keystream(pins, lugs, packed.positions, 40) % 26)
    assert (packed.plaintext == 0).all()
    assert np.array_equal(packed.ciphertext, (25 + packed.keystream.astype(int)) % 26)
    assert np.array_equal(packed.fingerprints, key_fingerprints(pins, counts))
    assert len({r.tobytes() for r in packed.positions}) > 250  # random indicators per message
    # a key's fingerprint ignores the order of its bars
    assert np.array_equal(key_fingerprints(pins[:1], lug_pair_counts(lugs[:1, ::-1])), packed.fingerprints[:1])


def test_plaintext_file_is_cycled(tmp_path):
    text = tmp_path / "plain.txt"
    text.write_text("attack at\ndawn\n")
    generate_key_chunks(tmp_path, "train", 5, chunk=5, workers=1, progress=False)
    encrypt_split(tmp_path, "train", 30, plaintext=str(text), indicator="AAAAAA", workers=1, progress=False)
    packed = load_packed(pack_split(tmp_path, "train"))
    expect = "ATTACKZATZDAWN" * 3
    assert [chr(65 + c) for c in packed.plaintext[3]] == list(expect[:30])
    assert packed.meta["plaintext"].startswith("file:")
    pins, lugs = _chunk(tmp_path / "train" / "keys-00000.npz")
    assert np.array_equal(packed.keystream, keystream(pins, lugs, np.zeros(6, np.int64), 30) % 26)
    text.write_text("attack at dawn!")
    with pytest.raises(DatasetError, match=r"plain\.txt"):
        encrypt_split(tmp_path, "train", 30, plaintext=str(text), workers=1, progress=False)


@pytest.mark.parametrize("name", ["pins.npy", "keystream.npy", "meta.json"])
def test_tampered_packed_file_is_named(data, name):
    path = data / "train" / "packed" / name
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=name.replace(".", r"\.")):
        load_packed(data / "train" / "packed")


def test_missing_or_reshaped_packed_file_is_named(data):
    packed = data / "train" / "packed"
    np.save(packed / "lugs.npy", np.zeros((300, 21), np.uint8))
    meta = json.loads((packed / "meta.json").read_text())
    meta["sha256"]["lugs.npy"] = hashlib.sha256((packed / "lugs.npy").read_bytes()).hexdigest()
    (packed / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"lugs\.npy: shape \(300, 21\)"):
        load_packed(packed)
    (packed / "keystream.npy").unlink()
    with pytest.raises(DatasetError, match=r"keystream\.npy: missing"):
        load_packed(packed)


def test_tampered_chunk_is_named(data):
    path = data / "train" / "cipher-00002.npz"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"cipher-00002\.npz: sha256 differs"):
        pack_split(data, "train", force=True)


def test_test_split_sharing_a_train_key_is_refused(data, capsys):
    assert _veil("keygen", "--split", "test", "--keys", 50, "--chunk", 50, "--workers", 1, "--out", data,
                 "--no-progress") == 0
    # copy one train key into the test split (as a careless merge would), keeping its manifest consistent
    test_chunk = data / "test" / "keys-00000.npz"
    pins, lugs = _chunk(test_chunk)
    train_pins, train_lugs = _chunk(data / "train" / "keys-00002.npz")
    pins[7], lugs[7] = train_pins[42], train_lugs[42][::-1]  # the same key with its bars in another order
    np.savez(test_chunk, pins=pins, lugs=lugs)
    manifest = json.loads((data / "test" / "keys.json").read_text())
    manifest["chunks"]["keys-00000.npz"]["sha256"] = hashlib.sha256(test_chunk.read_bytes()).hexdigest()
    (data / "test" / "keys.json").write_text(json.dumps(manifest))
    assert _veil("encrypt", "--data", data, "--split", "test", "--letters", 40, "--no-progress") == 0
    capsys.readouterr()
    assert _veil("pack", "--data", data, "--split", "test") == 1
    err = capsys.readouterr().err
    assert "shares 1 key(s)" in err and str(data / "train") in err
    assert not (data / "test" / "packed").exists()


def test_keygen_exclude_refuses_shared_keys(tmp_path, capsys):
    args = ("keygen", "--split", "test", "--keys", 30, "--chunk", 30, "--workers", 1, "--seed", 7, "--no-progress")
    with pytest.warns(UserWarning, match="tests only"):
        assert _veil(*args, "--out", tmp_path / "a") == 0
        assert _veil(*args, "--out", tmp_path / "b", "--exclude", tmp_path / "a") == 1
    assert "shares 30 key(s)" in capsys.readouterr().err


def test_check_disjoint(data):
    generate_key_chunks(data, "test", 20, chunk=20, workers=1, progress=False)
    encrypt_split(data, "test", 40, workers=1, progress=False)
    train, test = load_packed(data / "train"), load_packed(pack_split(data, "test"))
    check_disjoint(train, test)
    copied = dataclasses.replace(test, fingerprints=np.concatenate([test.fingerprints[:-2], train.fingerprints[:2]]))
    with pytest.raises(DatasetError, match="shares 2 key"):
        check_disjoint(train, copied)


def test_steps_in_the_wrong_order_say_what_to_run(tmp_path):
    with pytest.raises(DatasetError, match="veil m209 keygen"):
        encrypt_split(tmp_path, "train", 10, progress=False)
    generate_key_chunks(tmp_path, "train", 5, chunk=5, workers=1, progress=False)
    with pytest.raises(DatasetError, match="veil m209 encrypt"):
        pack_split(tmp_path, "train")
    with pytest.raises(DatasetError, match="veil m209 pack"):
        load_packed(tmp_path / "train")
