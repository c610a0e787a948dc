"""veil.he: conversion to an HE plan, parameters at 128-bit security, key files, batched CKKS inference."""

import stat

import pytest
import torch
from torch import nn

from veil.he import ciphertexts
from veil.he.batched import BatchedEvaluator, decrypt_batch, encrypt_batch
from veil.he.keys import HEParams, keygen, load_keys, read_container, save_keys
from veil.he.models import HEError, Poly, Square, he_lenet, run_plan, to_plan


def _perturbed(model):
    """BatchNorm statistics away from the identity, so that folding them is really tested."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


def test_the_plan_of_the_he_lenet_computes_what_the_module_computes():
    model = _perturbed(he_lenet(channels=4, hidden=20, activation="poly"))
    plan = to_plan(model, (1, 28, 28))
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was
    assert plan.depth == 5 and plan.outputs == 10  # conv, act, fc, act, fc: BatchNorms folded away
    x = torch.rand(7, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(run_plan(plan, x), model.double()(x), atol=1e-9)


@pytest.mark.parametrize(("layer", "name"), [(nn.ReLU(), "ReLU"), (nn.MaxPool2d(2), "MaxPool2d"),
                                             (nn.Softmax(dim=1), "Softmax")])
def test_layers_he_cannot_evaluate_are_refused_by_name(layer, name):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), layer, nn.Flatten(), nn.Linear(2 * 26 * 26 // (4 if name == "MaxPool2d"
                                                                                           else 1), 10))
    with pytest.raises(HEError, match=f"layer 1 \\({name}\\): homomorphic encryption cannot evaluate {name}"):
        to_plan(model, (1, 28, 28))


def test_parameters_below_128_bit_security_are_refused():
    with pytest.raises(HEError, match="less than 128-bit security"):
        HEParams(8192, (60, 40, 40, 40, 60), 40)  # 240 > 218 bits
    with pytest.raises(HEError, match="poly_modulus_degree must be one of"):
        HEParams(6000)
    assert HEParams().security_bits == 128 and HEParams().depth == 5


@pytest.fixture(scope="module")
def key_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("he")
    save_keys(keygen(HEParams()), d / "client.key", d / "server.key")
    return d


def test_the_server_key_file_holds_no_secret_and_the_client_file_is_private(key_files):
    client, server = key_files / "client.key", key_files / "server.key"
    assert stat.S_IMODE(client.stat().st_mode) == 0o600
    header, blobs = read_container(server, "server-key")
    assert set(blobs) == {"public", "relin"} and header["params"]["security_bits"] == 128
    assert load_keys(client).is_private and not load_keys(server).is_private


def test_tampered_and_mismatched_files_are_refused_with_their_cause(key_files, tmp_path):
    data = bytearray((key_files / "server.key").read_bytes())
    data[-100] ^= 1
    (tmp_path / "bad.key").write_bytes(bytes(data))
    with pytest.raises(HEError, match="does not match its digest"):
        load_keys(tmp_path / "bad.key")
    (tmp_path / "junk.key").write_bytes(b"hello")
    with pytest.raises(HEError, match="not a Veil HE file"):
        load_keys(tmp_path / "junk.key")


@pytest.fixture(scope="module")
def small_plan():
    torch.manual_seed(0)
    model = _perturbed(nn.Sequential(nn.Linear(64, 12), nn.BatchNorm1d(12), Poly(), nn.Linear(12, 8), Square(),
                                     nn.Linear(8, 10)))
    return to_plan(model, (64,))


def test_batched_decryptions_match_the_plaintext_plan(key_files, small_plan, tmp_path):
    client, server = load_keys(key_files / "client.key"), load_keys(key_files / "server.key")
    x = torch.rand(300, 64)
    ciphertexts.save(ciphertexts.encrypt(client, x, "batched"), tmp_path / "x.ct")
    out = ciphertexts.evaluate(server, small_plan, ciphertexts.load(tmp_path / "x.ct", server))
    ciphertexts.save(out, tmp_path / "y.ct")
    got = ciphertexts.decrypt(client, ciphertexts.load(tmp_path / "y.ct", client))
    want = run_plan(small_plan, x)
    # stated bound: 1e-3 absolute on logits of magnitude ~1 at a 2^28 scale (measured ~1e-5)
    assert got.shape == (300, 10) and float((got - want).abs().max()) < 1e-3
    with pytest.raises(HEError, match="needs the client key file"):
        ciphertexts.decrypt(server, out)
    with pytest.raises(HEError, match="not a model's outputs"):
        ciphertexts.decrypt(client, ciphertexts.load(tmp_path / "x.ct", client))


def test_ciphertexts_under_another_key_or_tampered_are_refused(key_files, small_plan, tmp_path):
    client = load_keys(key_files / "client.key")
    other = keygen(HEParams())
    enc = encrypt_batch(other, torch.rand(5, 64))
    ciphertexts.save(ciphertexts.encrypt(other, torch.rand(5, 64), "batched"), tmp_path / "other.ct")
    with pytest.raises(HEError, match="wrong key"):
        ciphertexts.load(tmp_path / "other.ct", client)
    with pytest.raises(HEError, match="wrong key"):
        decrypt_batch(client, enc)
    data = bytearray((tmp_path / "other.ct").read_bytes())
    data[len(data) // 2] ^= 0x40
    (tmp_path / "tampered.ct").write_bytes(bytes(data))
    with pytest.raises(HEError, match="tampered"):
        ciphertexts.load(tmp_path / "tampered.ct", other)


def test_a_model_deeper_than_the_parameters_is_refused(key_files):
    layers = [nn.Linear(4, 4)]
    for _ in range(3):
        layers += [Square(), nn.Linear(4, 4)]
    plan = to_plan(nn.Sequential(*layers), (4,))  # 7 levels > 5
    with pytest.raises(HEError, match="needs 7 multiplicative levels, the parameters give 5"):
        BatchedEvaluator(load_keys(key_files / "server.key"), plan)


def test_nan_inputs_and_oversized_batches_are_refused(key_files):
    client = load_keys(key_files / "client.key")
    with pytest.raises(HEError, match="NaN or infinite"):
        encrypt_batch(client, torch.full((2, 4), float("nan")))
    with pytest.raises(HEError, match=r"a batch holds 1\.\.4096 images"):
        encrypt_batch(client, torch.zeros(4097, 1))


def test_ciphertexts_with_other_parameters_in_their_header_are_refused(key_files, tmp_path):
    from veil.he.keys import pack_container, unpack_container

    client = load_keys(key_files / "client.key")
    data = ciphertexts.pack(ciphertexts.encrypt(client, torch.rand(3, 4), "batched"))
    header, blobs = unpack_container(data, "ciphertexts", "test")
    header["params"] = {**header["params"], "coeff_mod_bit_sizes": [38, 27, 27, 27, 27, 27, 38], "scale_bits": 27}
    del header["blobs"]
    with pytest.raises(HEError, match="encrypted with other parameters"):
        ciphertexts.unpack(pack_container(header, blobs), client, "x.ct")
    header["params"] = {"poly_modulus_degree": "big"}
    with pytest.raises(HEError, match="malformed parameters"):
        ciphertexts.unpack(pack_container(header, blobs), client, "x.ct")
