"""veil.he.service: encrypted inference over mutual TLS, a server that never gets a secret key."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from veil.data.images import load_pixels
from veil.he import ciphertexts
from veil.he.keys import HEParams, keygen, pack_container, server_key_bytes
from veil.he.latency import rotation_steps
from veil.he.models import HEError, he_lenet, run_plan, save_he_model, to_plan, train_he_model
from veil.he.service import HEClient, HEServer, HEServiceError, assert_unreadable, drop_privileges
from veil.net.certs import generate_certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    generate_certificates(["server", "client", "mallory"], d / "ours")
    generate_certificates(["server", "client"], d / "theirs")  # another deployment's CA
    return d


@pytest.fixture(scope="module")
def plan():
    torch.manual_seed(0)
    x, y = load_pixels("digits", "train")
    model = train_he_model(he_lenet(2, 16, side=8, kernel=3, stride=1), x, y, epochs=5, progress=False)
    return to_plan(model, (1, 8, 8))


@pytest.fixture
def server(pki, plan):
    srv = HEServer(plan, ("127.0.0.1", 0), pki / "ours", admit=("client",), timeout=30, log=lambda msg: None)
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    yield srv
    srv.close()


def test_a_client_gets_both_modes_decrypted_and_the_server_only_ever_has_public_keys(server, pki, plan):
    x, _ = load_pixels("digits", "test", 6)
    with HEClient(server.address, pki / "ours", "client") as client:
        assert client.description["outputs"] == 10 and "weight" not in str(client.description)
        params = HEParams()
        keys = keygen(params, rotation_steps(client.plan, params.slots))
        client.open(keys)
        want = run_plan(plan, x)
        for mode in ("batched", "latency"):
            got = ciphertexts.decrypt(keys, client.infer(ciphertexts.encrypt(keys, x, mode, client.plan)))
            # stated bound: 1e-2 absolute on the logits (a 2^28 scale; measured ~1e-5 batched, ~3e-3 latency)
            assert float((got - want).abs().max()) < 1e-2, mode
        assert client.bytes_sent > len(server_key_bytes(keys)) > 0
    assert server.stats.requests == 2 and server.stats.images == 12


def test_the_server_refuses_a_client_key_file(server, pki):
    keys = keygen(HEParams())
    from veil.he.keys import to_bytes

    secret_file = pack_container({"kind": "client-key", "key_id": keys.key_id, "params": keys.params.as_dict()},
                                 {"secret": to_bytes(keys.secret), "public": to_bytes(keys.public)})
    with HEClient(server.address, pki / "ours", "client") as client:
        client._send(secret_file)
        with pytest.raises(HEServiceError, match="holds the secret key: the server refuses it"):
            client._receive("he-ready")


def test_unadmitted_foreign_and_impostor_peers_are_refused(server, pki):
    with pytest.raises(HEServiceError, match=r"certificate \['mallory'\] is not admitted"):
        HEClient(server.address, pki / "ours", "mallory")
    with pytest.raises(HEServiceError, match=r"TLS handshake|CA did not sign"):
        HEClient(server.address, pki / "theirs", "client")
    with pytest.raises(HEServiceError, match="not the server 'backend'"):
        HEClient(server.address, pki / "ours", "client", server_name="backend")


def test_a_bad_request_gets_an_error_and_the_session_goes_on(server, pki):
    x, _ = load_pixels("digits", "test", 2)
    with HEClient(server.address, pki / "ours", "client") as client:
        keys = keygen(HEParams())  # no rotation keys: batched only
        client.open(keys)
        with pytest.raises(HEServiceError, match="lack Galois keys for rotation steps"):
            client.infer(ciphertexts.encrypt(keys, x, "latency", client.plan))
        other = keygen(HEParams())
        with pytest.raises(HEServiceError, match="wrong key"):
            client.infer(ciphertexts.encrypt(other, x, "batched"))
        out = client.infer(ciphertexts.encrypt(keys, x, "batched"))
        assert ciphertexts.decrypt(keys, out).shape == (2, 10)


def test_a_server_process_that_can_read_the_client_files_refuses_to_serve(tmp_path):
    readable = tmp_path / "client.key"
    readable.write_bytes(b"secret")
    with pytest.raises(HEError, match=r"can read .*client\.key, which must stay with the client"):
        assert_unreadable([readable])
    with pytest.raises(HEError, match="no such file"):
        assert_unreadable([tmp_path / "missing.key"])
    if os.geteuid() != 0:
        with pytest.raises(HEError, match="needs root"):
            drop_privileges("nobody")


def test_a_server_that_dies_mid_session_ends_the_client_with_a_message(pki, plan, tmp_path):
    """The server process is killed after the key upload: the client's request fails at once, naming it."""
    torch.manual_seed(0)
    model = he_lenet(2, 16, side=8, kernel=3, stride=1).eval()
    save_he_model(model, tmp_path / "m.pt", input_shape=(1, 8, 8), config={"channels": 2, "hidden": 16, "side": 8,
                                                                           "kernel": 3, "stride": 1})
    server = subprocess.Popen([sys.executable, "-m", "veil.cli.main", "he", "serve", "--model", str(tmp_path / "m.pt"),
                               "--listen", "127.0.0.1:0", "--certs", str(pki / "ours")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        host, _, port = json.loads(server.stdout.readline())["listening"].rpartition(":")
        x, _ = load_pixels("digits", "test", 2)
        with HEClient((host, int(port)), pki / "ours", "client", timeout=30) as client:
            keys = keygen(HEParams())
            client.open(keys)
            server.kill()
            server.wait()
            with pytest.raises(HEServiceError, match=r"closed the connection|broke the connection"):
                client.infer(ciphertexts.encrypt(keys, x, "batched"))
    finally:
        if server.poll() is None:
            server.kill()
