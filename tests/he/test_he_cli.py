"""``veil he``: the file route (train, describe, keygen, encrypt, infer, decrypt), the network demo with
a confined server process, and the errors users meet."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from veil.cli.main import main
from veil.data.images import load_pixels
from veil.he.keys import read_container
from veil.he.models import load_he_model


def _run(capsys, *argv):
    code = main(["he", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("he-model") / "small.pt"
    torch.manual_seed(0)
    assert main(["he", "train", "--data", "digits", "--epochs", "12", "--channels", "2", "--hidden", "16",
                 "--out", str(path), "--no-progress"]) == 0
    return path


def test_the_file_route_gives_the_client_the_plaintext_models_predictions(small_model, tmp_path, capsys):
    d = tmp_path
    assert _run(capsys, "describe", "--model", small_model, "--out", d / "model.json")[0] == 0
    code, (keys,), _ = _run(capsys, "keygen", "--model-description", d / "model.json", "--out", d / "keys")
    assert code == 0 and keys["security_bits"] == 128 and keys["modes"] == ["batched", "latency"]
    assert stat.S_IMODE((d / "keys" / "client.key").stat().st_mode) == 0o600
    assert "secret" not in read_container(d / "keys" / "server.key", "server-key")[1]

    model, shape, metrics = load_he_model(small_model)
    x, y = load_pixels("digits", "test")
    with torch.no_grad():
        plain = model(x).argmax(1)
    for mode, n in (("batched", 60), ("latency", 3)):
        assert _run(capsys, "encrypt", "--keys", d / "keys" / "client.key", "--data", "digits", "--limit", n,
                    "--mode", mode, "--model-description", d / "model.json", "--out", d / f"x-{mode}.ct")[0] == 0
        code, (served,), _ = _run(capsys, "infer", "--keys", d / "keys" / "server.key", "--model", small_model,
                                  "--in", d / f"x-{mode}.ct", "--out", d / f"y-{mode}.ct", "--no-progress")
        assert code == 0 and served["images"] == n
        code, (result,), _ = _run(capsys, "decrypt", "--keys", d / "keys" / "client.key", "--in", d / f"y-{mode}.ct",
                                  "--labels", "digits", "--limit", n, "--out", d / f"p-{mode}.npy")
        import numpy as np

        preds = torch.from_numpy(np.load(d / f"p-{mode}.npy"))
        assert code == 0 and torch.equal(preds, plain[:n]), mode  # encrypted = plaintext, image by image
        assert result["accuracy"] == round(float((plain[:n] == y[:n]).float().mean()), 4)
        assert stat.S_IMODE((d / f"p-{mode}.npy").stat().st_mode) == 0o600  # the client's secret
    assert metrics["test_accuracy"] > 0.8 and shape == (1, 8, 8)


def test_users_mistakes_end_with_a_message_naming_them(small_model, tmp_path, capsys):
    d = tmp_path
    assert _run(capsys, "keygen", "--out", d / "keys")[0] == 0
    assert _run(capsys, "keygen", "--out", d / "other")[0] == 0
    assert _run(capsys, "encrypt", "--keys", d / "keys" / "client.key", "--data", "digits", "--limit", 4,
                "--out", d / "x.ct")[0] == 0
    code, _, err = _run(capsys, "infer", "--keys", d / "keys" / "client.key", "--model", small_model,
                        "--in", d / "x.ct", "--out", d / "y.ct")
    assert code == 1 and "a client key file, which holds the secret key: the server refuses it" in err
    code, _, err = _run(capsys, "infer", "--keys", d / "other" / "server.key", "--model", small_model, "--in",
                        d / "x.ct", "--out", d / "y.ct")
    assert code == 1 and "wrong key" in err
    data = bytearray((d / "x.ct").read_bytes())
    data[len(data) // 3] ^= 1
    (d / "bad.ct").write_bytes(bytes(data))
    code, _, err = _run(capsys, "infer", "--keys", d / "keys" / "server.key", "--model", small_model, "--in",
                        d / "bad.ct", "--out", d / "y.ct")
    assert code == 1 and "does not match its digest (truncated or tampered with)" in err
    code, _, err = _run(capsys, "encrypt", "--keys", d / "keys" / "client.key", "--data", "digits", "--mode", "latency",
                        "--out", d / "z.ct")
    assert code == 1 and "--model-description" in err
    code, _, err = _run(capsys, "keygen", "--out", d / "weak", "--coeff-mod-bits", "60,40,40,40,60")
    assert code == 1 and "less than 128-bit security" in err
    code, _, err = _run(capsys, "decrypt", "--keys", d / "keys" / "client.key", "--in", d / "x.ct")
    assert code == 1 and "not a model's outputs" in err
    code, _, err = _run(capsys, "describe", "--model", d, "--out", d / "m.json")
    assert code == 1 and f"{d}: is a directory, not a model file" in err
    code, _, err = _run(capsys, "keygen", "--model-description", d, "--out", d / "k2")
    assert code == 1 and f"{d}: is a directory" in err and "Errno" not in err


def test_the_demo_server_runs_confined_and_the_client_alone_decrypts(small_model, tmp_path, capsys):
    code, lines, err = _run(capsys, "demo", "--model", small_model, "--data", "digits", "--images", 30,
                            "--latency-images", 2, "--workdir", tmp_path / "demo")
    assert code == 0, err
    batched, latency, server = lines
    assert batched["mode"] == "batched" and batched["images"] == 30 and batched["accuracy"] > 0.7
    assert latency["mode"] == "latency" and latency["images"] == 2
    assert server["server_requests"] == 2 and server["server_images"] == 32
    client_dir = tmp_path / "demo" / "client"
    assert {p.name for p in client_dir.iterdir()} >= {"client.key", "client.pem"}  # the secrets stay here
    assert "client.key" not in {p.name for p in (tmp_path / "demo" / "server").iterdir()}
    if os.geteuid() == 0:  # root: the server drops to 'nobody' and checked it cannot list the client's directory
        assert server["server_uid"] != 0 and server["server_checked_unreadable"] == [str(client_dir)]


def test_a_server_that_could_read_the_client_key_refuses_to_start(small_model, tmp_path):
    from veil.net.certs import generate_certificates

    generate_certificates(["server"], tmp_path / "pki")
    shared = Path(tempfile.mkdtemp(prefix="veil-he-test-"))  # pytest's tmp_path is not traversable by others
    shared.chmod(0o755)
    readable = shared / "client.key"
    readable.write_bytes(b"not for the server")
    readable.chmod(0o644)
    cmd = [sys.executable, "-m", "veil.cli.main", "he", "serve", "--model", str(small_model), "--listen",
           "127.0.0.1:0", "--certs", str(tmp_path / "pki"), "--unreadable", str(readable), "--sessions", "1"]
    if os.geteuid() == 0:
        cmd += ["--user", "nobody"]  # the file is world-readable: dropping privileges does not help
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(shared)
    assert done.returncode == 1 and "can read" in done.stderr and "must stay with the client" in done.stderr


def test_the_network_client_gets_the_plaintext_models_predictions(small_model, tmp_path, capsys):
    import threading

    import numpy as np

    from veil.he.models import to_plan
    from veil.he.service import HEServer
    from veil.net.certs import generate_certificates

    generate_certificates(["server", "client"], tmp_path / "pki")
    model, shape, _ = load_he_model(small_model)
    server = HEServer(to_plan(model, shape), ("127.0.0.1", 0), tmp_path / "pki", timeout=30, log=lambda msg: None)
    threading.Thread(target=server.serve, args=(2,), daemon=True).start()
    address = f"127.0.0.1:{server.address[1]}"
    x, _ = load_pixels("digits", "test", 20)
    with torch.no_grad():
        plain = model(x).argmax(1)
    code, (line,), err = _run(capsys, "client", "--connect", address, "--certs", tmp_path / "pki", "--data", "digits",
                              "--limit", 20, "--out", tmp_path / "p.npy")  # fresh keys for the session
    assert code == 0, err
    assert line["images"] == 20 and torch.equal(torch.from_numpy(np.load(tmp_path / "p.npy")), plain)
    assert line["accuracy"] == round(float((plain == load_pixels("digits", "test", 20)[1]).float().mean()), 4)
    assert _run(capsys, "describe", "--model", small_model, "--out", tmp_path / "m.json")[0] == 0
    assert _run(capsys, "keygen", "--model-description", tmp_path / "m.json", "--out", tmp_path / "keys")[0] == 0
    code, (line,), err = _run(capsys, "client", "--connect", address, "--certs", tmp_path / "pki", "--keys",
                              tmp_path / "keys", "--data", "digits", "--limit", 2, "--mode", "latency")
    assert code == 0 and line["mode"] == "latency" and line["images"] == 2, err
    from veil.he.keys import load_keys

    assert line["key_id"] == load_keys(tmp_path / "keys" / "client.key").key_id  # the keys given, not fresh ones
