"""Secret-shared dataset files (veil.data.shares): sharing by several owners, the file format and its
checks, and batches read in the same order by both parties, all against plaintext."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from mpc_testing import ULP, encodings, quantize, randn, run_local, run_parties

from veil.data.shares import (
    DIGEST_BYTES,
    PREAMBLE,
    ShareFileError,
    agree_seed,
    load_shares,
    share_dataset,
    shuffle_order,
    verify_file,
)
from veil.mpc.session import Session
from veil.ring import EncodingError

N_ALICE, N_BOB, D = 7, 5, 6


def owners_data() -> dict[str, dict[str, torch.Tensor]]:
    """Alice's and bob's rows of one dataset: features x and integer labels y."""
    return {"alice": {"x": randn(1, N_ALICE, D), "y": torch.arange(N_ALICE) % 3},
            "bob": {"x": randn(2, N_BOB, D, scale=10.0), "y": torch.arange(N_BOB) % 3 + 5}}


def share_all(out: Path, data: dict[str, dict[str, Any] | None], *, name: str = "toy", **kwargs: Any
              ) -> dict[str, Path]:
    def program(session: Session) -> Path:
        return share_dataset(session, data.get(session.party), out=out, name=name, **kwargs)

    return run_local(program)


def reveal_rows(paths: dict[str, Path], indices: Any = slice(None)) -> dict[str, torch.Tensor]:
    """Load both parties' files and reveal the rows ``indices`` of every field to both (checked equal)."""
    def program(session: Session) -> dict[str, torch.Tensor]:
        ds = load_shares(session, paths[session.party])
        return {k: v.reveal(to=["alice", "bob"]) for k, v in ds.get(indices).items()}

    out = run_local(program)
    for k in out["alice"]:
        assert torch.equal(out["alice"][k], out["bob"][k])
    return out["alice"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return share_all(tmp_path_factory.mktemp("shares"), owners_data())


def copy_files(paths: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    return {p: Path(shutil.copy(path, tmp_path / path.name)) for p, path in paths.items()}


# ---- sharing and reading back -----------------------------------------------------------------------
def test_horizontal_round_trip_is_the_concatenation_in_owner_order(shared: dict[str, Path], tmp_path: Path) -> None:
    data = owners_data()
    assert shared == {p: shared["alice"].parent / f"toy.{p}.veilshares" for p in ("alice", "bob")}
    got = reveal_rows(shared)
    want_x = torch.cat([data["alice"]["x"], data["bob"]["x"]])
    want_y = torch.cat([data["alice"]["y"], data["bob"]["y"]]).double()
    assert (got["x"].double() - want_x).abs().max() <= ULP
    assert torch.equal(got["y"].double(), want_y)
    ha, _ = verify_file(shared["alice"])
    hb, _ = verify_file(shared["bob"])
    assert ha.party == "alice" and hb.party == "bob" and ha.common() == hb.common()
    assert len(ha.dataset_id) == 32 and ha.frac_bits == 16 and ha.split == "horizontal"
    assert [(f.name, f.shape, f.dtype) for f in ha.fields] == [("x", (12, D), "float32"), ("y", (12,), "int64")]
    assert {(c.owner, c.field, c.rows) for c in ha.contributions} == {
        ("alice", "x", (0, 7)), ("alice", "y", (0, 7)), ("bob", "x", (7, 12)), ("bob", "y", (7, 12))}


def test_vertical_round_trip_concatenates_features_and_keeps_the_label_owners_y(tmp_path: Path) -> None:
    xa, xb = randn(3, 9, 4), randn(4, 9, 2)
    y = torch.nn.functional.one_hot(torch.arange(9) % 3, 3).float()  # targets (N, C)
    paths = share_all(tmp_path, {"alice": {"x": xa}, "bob": {"x": xb, "y": y}}, split="vertical", name="vert")
    got = reveal_rows(paths, [8, 0, 3])
    assert (got["x"].double() - torch.cat([xa, xb], dim=1)[[8, 0, 3]]).abs().max() <= ULP
    assert torch.equal(got["y"], y[[8, 0, 3]])
    header, _ = verify_file(paths["bob"])
    assert {(c.owner, c.field, c.columns) for c in header.contributions} == {
        ("alice", "x", (0, 4)), ("bob", "x", (4, 6)), ("bob", "y", None)}


def test_a_single_owner_and_a_party_that_owns_nothing(tmp_path: Path) -> None:
    x = randn(5, 10, 2, 3)
    paths = share_all(tmp_path, {"alice": {"x": x}}, owners=("alice",), name="solo")
    assert (reveal_rows(paths)["x"].double() - x).abs().max() <= ULP


def test_both_parties_read_batches_in_the_same_shuffled_order(shared: dict[str, Path]) -> None:
    data = owners_data()
    plain = torch.cat([data["alice"]["x"], data["bob"]["x"]])

    def program(session: Session) -> tuple[bytes, list[torch.Tensor], list[torch.Tensor], list[int]]:
        ds = load_shares(session, shared[session.party])
        seed = agree_seed(session)
        shuffled = [b["x"].reveal(to=["alice", "bob"]) for b in ds.batches(5, shuffle_seed=seed)]
        in_order = [b["x"].reveal(to=["alice", "bob"]) for b in ds.batches(5, shuffle_seed=None, drop_last=True)]
        return seed, shuffled, in_order, [len(b["y"]) for b in ds.batches(5, shuffle_seed=seed, drop_last=True)]

    out = run_local(program)
    seed, shuffled, in_order, sizes = out["alice"]
    assert out["bob"][0] == seed and len(seed) == 16
    assert all(torch.equal(a, b) for a, b in zip(shuffled, out["bob"][1]))
    order = shuffle_order(seed, len(plain))
    assert sorted(order.tolist()) == list(range(12)) and order.tolist() != list(range(12))
    assert [len(b) for b in shuffled] == [5, 5, 2] and sizes == [5, 5]
    assert (torch.cat(shuffled).double() - plain[order]).abs().max() <= ULP
    assert (torch.cat(in_order).double() - plain[:10]).abs().max() <= ULP


def test_parties_with_different_seeds_or_batch_sizes_stop_together(shared: dict[str, Path]) -> None:
    def program(session: Session) -> None:
        ds = load_shares(session, shared[session.party])
        ds.batches(4 if session.party == "alice" else 5, shuffle_seed=bytes(16) if session.index else None)

    with pytest.raises(ValueError, match=r"read different batches of 'toy': their batch_size, seed differ"):
        run_local(program)


def test_a_partys_file_does_not_contain_the_data(shared: dict[str, Path]) -> None:
    data = owners_data()
    secrets = encodings(data["alice"]["x"], data["bob"]["x"], data["alice"]["y"][1:], data["bob"]["y"])
    payloads = {}
    for party, path in shared.items():
        _, offset = verify_file(path)
        raw = path.read_bytes()
        payload = raw[offset:len(raw) - DIGEST_BYTES]
        assert not [o for o in range(len(payload) - 7) if payload[o:o + 8] in secrets], party
        payloads[party] = torch.frombuffer(bytearray(payload), dtype=torch.int64)
        assert payloads[party].double().abs().mean() > 2.0**60  # uniform words, not small encodings
    # not vacuous: the two payloads add up to the encodings
    both = payloads["alice"] + payloads["bob"]
    want = torch.cat([torch.cat([data["alice"]["x"], data["bob"]["x"]]).flatten(),
                      torch.cat([data["alice"]["y"], data["bob"]["y"]]).double()])
    assert torch.equal(both, torch.round(want * 2**16).to(torch.int64))


# ---- damaged, altered and mismatched files ------------------------------------------------------------
def test_a_tampered_byte_is_a_digest_error_in_both_parties(shared: dict[str, Path], tmp_path: Path) -> None:
    paths = copy_files(shared, tmp_path)
    raw = bytearray(paths["bob"].read_bytes())
    raw[len(raw) // 2] ^= 0x01
    paths["bob"].write_bytes(raw)
    with pytest.raises(ShareFileError, match=r"toy\.bob\.veilshares: SHA-256 digest mismatch"):
        verify_file(paths["bob"])

    def program(session: Session) -> None:
        load_shares(session, paths[session.party])

    run = run_parties(program)
    assert set(run.errors) == {"alice", "bob"}  # both stop, neither waits for the other
    assert all(type(e) is ShareFileError for e in run.errors.values())
    assert str(run.errors["bob"]).startswith(str(paths["bob"]))
    assert str(run.errors["alice"]).startswith("bob cannot use its share file: ")
    assert "SHA-256 digest mismatch" in str(run.errors["alice"])


@pytest.mark.parametrize("keep", [5, 40, -1])
def test_a_truncated_file_is_refused(shared: dict[str, Path], tmp_path: Path, keep: int) -> None:
    path = copy_files(shared, tmp_path)["alice"]
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    with pytest.raises(ShareFileError, match=r"toy\.alice\.veilshares: truncated"):
        verify_file(path)


def test_not_a_share_file_and_an_unknown_version(tmp_path: Path, shared: dict[str, Path]) -> None:
    bad = tmp_path / "x.veilshares"
    bad.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ShareFileError, match="not a Veil share file"):
        verify_file(bad)
    raw = bytearray(shared["alice"].read_bytes())
    raw[8:12] = struct.pack("<I", 2)
    bad.write_bytes(raw)
    with pytest.raises(ShareFileError, match="format version 2; this Veil reads version 1"):
        verify_file(bad)
    with pytest.raises(ShareFileError, match="no such share file"):
        verify_file(tmp_path / "missing.veilshares")


def rewrite_header(path: Path, change: Any) -> None:
    """Edit a file's header and recompute its digest (a consistent-looking but wrong file)."""
    raw = path.read_bytes()
    _, _, hlen = PREAMBLE.unpack(raw[:PREAMBLE.size])
    header = json.loads(raw[PREAMBLE.size:PREAMBLE.size + hlen])
    change(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    out = raw[:8] + struct.pack("<II", 1, len(body)) + body + raw[PREAMBLE.size + hlen:len(raw) - DIGEST_BYTES]
    path.write_bytes(out + hashlib.sha256(out).digest())


def test_a_header_that_does_not_match_the_payload(shared: dict[str, Path], tmp_path: Path) -> None:
    path = copy_files(shared, tmp_path)["alice"]
    rewrite_header(path, lambda h: h["fields"][0].update(shape=[12, D + 1]))
    with pytest.raises(ShareFileError, match="header/payload size mismatch"):
        verify_file(path)


def test_loading_the_other_partys_file_is_refused(shared: dict[str, Path]) -> None:
    def program(session: Session) -> None:
        load_shares(session, shared["bob"])

    with pytest.raises(ShareFileError, match=r"this is bob's share file; alice must load its own \(toy.alice"):
        run_local(program)


def test_files_of_two_sharings_do_not_mix(shared: dict[str, Path], tmp_path: Path) -> None:
    other = share_all(tmp_path, owners_data())  # same data, shapes and name: only the dataset_id differs

    def program(session: Session) -> None:
        load_shares(session, shared["alice"] if session.party == "alice" else other["bob"])

    with pytest.raises(ShareFileError, match=r"not two halves of one sharing \(dataset_id: "):
        run_local(program)


def test_a_session_with_another_precision_is_told_which(shared: dict[str, Path]) -> None:
    def program(session: Session) -> None:
        load_shares(session.replace(precision=20), shared[session.party])

    with pytest.raises(ShareFileError, match=r"16 fractional bits, the session uses 20: use session.replace"):
        run_local(program)


# ---- refused inputs -----------------------------------------------------------------------------------
def test_nan_in_an_owners_data_is_an_encoding_error_before_anything_is_written(tmp_path: Path) -> None:
    data = owners_data()
    data["bob"]["x"][2, 1] = float("nan")
    with pytest.raises(EncodingError, match=r"cannot encode bob's field 'x': it contains NaN"):
        share_all(tmp_path, data)
    run = run_parties(lambda s: share_dataset(s, data[s.party], out=tmp_path, name="toy"))
    assert type(run.errors["alice"]) is EncodingError and str(run.errors["alice"]).startswith("bob cannot share")
    data["bob"]["x"][2, 1] = 1e20
    with pytest.raises(EncodingError, match="outside the fixed-point range"):
        share_all(tmp_path, data)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("split", "bob", "message"), [
    ("horizontal", {"x": torch.zeros(N_BOB, D + 1), "y": torch.zeros(N_BOB)},
     r"field 'x': the owners' rows do not line up: alice has shape \(7, 6\), bob has shape \(5, 7\)"),
    ("horizontal", {"x": torch.zeros(N_BOB, D)},
     r"every owner shares the same fields: alice has \['x', 'y'\], bob has \['x'\]"),
    ("horizontal", {"x": torch.zeros(N_BOB, D), "y": torch.zeros(N_BOB + 1)}, r"bob's fields must have the same"),
    ("vertical", {"x": torch.zeros(N_BOB, 2)}, r"rows are aligned by index.*alice 'x' 7.*bob 'x' 5"),
    ("vertical", {"x": torch.zeros(N_ALICE, 2, 2)}, r"'x' is split by columns .* alice \(7, 6\), bob \(7, 2, 2\)"),
])
def test_shapes_that_do_not_line_up_are_refused_in_both_parties(tmp_path: Path, split: str, bob: dict[str, Any],
                                                                 message: str) -> None:
    alice = owners_data()["alice"] if split == "horizontal" else {"x": owners_data()["alice"]["x"]}
    with pytest.raises(ValueError, match=message):
        share_all(tmp_path, {"alice": alice, "bob": bob}, split=split)


@pytest.mark.parametrize(("data", "kwargs", "error", "message"), [
    ({"alice": {"x": torch.ones(2, 2)}, "bob": None}, {}, TypeError, "bob is an owner: data must be a non-empty dict"),
    ({"alice": {"x": torch.ones(2, 2)}, "bob": {"x": torch.ones(2, 2)}}, {"owners": ("alice",)}, ValueError,
     r"bob is not one of the owners \['alice'\] but passed data"),
    ({"alice": {"x": torch.ones(2, 2)}}, {"split": "diagonal", "owners": ("alice",)}, ValueError,
     "split must be one of"),
    ({"alice": {"x": torch.ones(2, 2)}}, {"owners": ("alice",), "name": "../evil"}, ValueError, "name '../evil'"),
    ({"alice": {"x": torch.ones(2, 2)}}, {"owners": ("alice", "carol")}, ValueError, "owners must be distinct"),
])
def test_bad_arguments_fail_in_both_parties_with_the_cause(tmp_path: Path, data: dict[str, Any],
                                                            kwargs: dict[str, Any], error: type[Exception],
                                                            message: str) -> None:
    with pytest.raises(error, match=message):
        share_all(tmp_path, data, **kwargs)


def test_the_parties_must_agree_on_the_options(tmp_path: Path) -> None:
    def program(session: Session) -> None:
        share_dataset(session, owners_data()[session.party], out=tmp_path, name="toy",
                      split="horizontal" if session.party == "alice" else "vertical")

    with pytest.raises(ValueError, match="called share_dataset with different split: 'horizontal' and 'vertical'"):
        run_local(program)


def test_get_refuses_rows_out_of_range(shared: dict[str, Path]) -> None:
    def program(session: Session) -> None:
        load_shares(session, shared[session.party]).get([0, 12])

    with pytest.raises(IndexError, match="out of range for 'toy' with 12 rows"):
        run_local(program)


def test_quantized_values_come_back_exactly(shared: dict[str, Path]) -> None:
    got = reveal_rows(shared, torch.tensor([0, 11, -1]))
    data = owners_data()
    want = quantize(torch.cat([data["alice"]["x"], data["bob"]["x"]])[[0, 11, -1]])
    assert torch.equal(got["x"].double(), want)
