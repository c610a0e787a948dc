"""``veil fl server`` / ``veil fl client``: Flower's deployment engine over TLS, one process per party.

The end-to-end test runs the server and three admitted clients as separate OS processes on
loopback, each client with its own ``.npz``, under SecAgg+: with full-batch local steps one FedAvg
round is one step of gradient descent on the union of the clients' data, so the deployed run is
checked against that to the quantisation of secure aggregation. A client holding a certificate of
the same CA that the server did not admit, and a client that trusts another CA, take no part.
"""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("flwr")

from veil.fl import FLError, FLTask, ServerSettings
from veil.fl.deploy import ClientPolicy, decode_spec, encode_spec
from veil.fl.hosts import _control_client, parse_address, serve
from veil.fl.privacy import ClientDP, RecordDP
from veil.fl.superlink import RemoteFleetOnly
from veil.fl.task import build_model, get_weights, load_task_data, set_weights
from veil.net.certs import generate_certificates

LR = 0.5
PARTS = [(0, 100), (100, 300), (300, 600)]


def test_the_run_configuration_round_trips_every_setting():
    task = FLTask(model="lenet", data="mnist", num_clients=4, partition="dirichlet0.5", faults=("1:drop@2",),
                  record_dp=RecordDP(3.0, rounds=5, max_grad_norm=0.5))
    settings = ServerSettings(rounds=5, strategy="fedprox", secure=True, max_client_records=7000,
                              client_dp=ClientDP(8.0, rounds=5))
    assert decode_spec(encode_spec(task, settings)) == (task, settings)
    explicit = FLTask(model="digits-mlp", data="digits").with_partitions([[0, 1], [2, 3, 4]])
    assert decode_spec(encode_spec(explicit, ServerSettings()))[0] == explicit


@pytest.mark.parametrize(("text", "message"), [
    ("{", "malformed run configuration"),
    ('{"task": {"model": "lenet", "color": 1}, "settings": {}}', "unexpected keyword argument 'color'"),
    ('{"task": {"num_clients": 0}, "settings": {}}', "num_clients must be >= 1"),
])
def test_a_malformed_run_configuration_is_refused_with_its_cause(text, message):
    with pytest.raises(FLError, match=message):
        decode_spec(text)


@pytest.mark.parametrize(("policy", "task", "settings", "message"), [
    (ClientPolicy(require_secure=True), FLTask(), ServerSettings(), "requires secure aggregation"),
    (ClientPolicy(max_epsilon=3.0), FLTask(), ServerSettings(), r"requires record-level DP \(epsilon <= 3\)"),
    (ClientPolicy(max_epsilon=3.0), FLTask(record_dp=RecordDP(8.0, rounds=10)), ServerSettings(),
     "epsilon 8, this client allows at most 3"),
    (ClientPolicy(), FLTask(model="os:getcwd"), ServerSettings(), "not one of Veil's named models"),
])
def test_a_client_refuses_what_it_did_not_agree_to(policy, task, settings, message):
    with pytest.raises(FLError, match=message):
        policy.check(task, settings)


def test_a_client_policy_survives_the_node_configuration():
    policy = ClientPolicy(require_secure=True, max_epsilon=2.5, allowed_models=("pkg.mod:net", "pkg.mod:other"))
    assert ClientPolicy.from_node_config(policy.node_config()) == policy
    policy.check(FLTask(model="pkg.mod:net", record_dp=RecordDP(2.0, rounds=10)), ServerSettings(secure=True))


def _call(app, host, path):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "path": path, "client": (host, 40000)}, receive, send))
    return sent


@pytest.mark.parametrize(("host", "path", "served"), [
    ("10.1.2.3", "/v1/fleet/pull-messages", True),
    ("10.1.2.3", "/v1/control/start-run", False),
    ("10.1.2.3", "/v1/runtime/pull-app-inputs", False),
    ("2001:db8::5", "/v1/control/list-runs", False),
    ("127.0.0.1", "/v1/control/start-run", True),
    ("::1", "/v1/runtime/pull-app-inputs", True),
])
def test_only_the_fleet_api_is_served_to_remote_peers(host, path, served):
    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    sent = _call(RemoteFleetOnly(inner), host, path)
    assert sent[0]["status"] == (200 if served else 403)


def test_the_fleet_api_answers_retry_later_until_the_clients_are_registered(tmp_path):
    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    ready = tmp_path / "fleet-ready"
    guard = RemoteFleetOnly(inner, ready_file=str(ready))
    assert _call(guard, "10.1.2.3", "/v1/fleet/activate-node")[0]["status"] == 503  # SuperNodes retry a 503
    assert _call(guard, "127.0.0.1", "/v1/control/list-runs")[0]["status"] == 200  # registration goes on
    ready.write_bytes(b"")
    assert _call(guard, "10.1.2.3", "/v1/fleet/activate-node")[0]["status"] == 200


def test_the_servers_control_client_takes_a_certificate_directory_relative_to_the_working_directory(
        tmp_path, monkeypatch):
    generate_certificates(["server"], tmp_path / "certs")
    monkeypatch.chdir(tmp_path)
    assert _control_client("127.0.0.1:19399", Path("certs") / "ca.pem") is not None  # no connection made yet


def test_parse_address():
    assert parse_address("fl.example.org:9100") == ("fl.example.org", 9100)
    assert parse_address("[::1]:9101") == ("::1", 9101)
    assert parse_address("10.0.0.5") == ("10.0.0.5", 9093)
    with pytest.raises(FLError, match="expected HOST:PORT"):
        parse_address(":0")


def test_a_server_certificate_that_does_not_name_loopback_is_refused_before_anything_starts(tmp_path):
    generate_certificates(["server"], tmp_path / "certs")  # no --san: only the DNS name "server"
    with pytest.raises(FLError, match=r"does not name '127\.0\.0\.1'.*--san server=localhost,127\.0\.0\.1"):
        serve(FLTask(model="digits-mlp", data="digits", num_clients=3), ServerSettings(rounds=1),
              certs=tmp_path / "certs", out=tmp_path / "out", listen="0.0.0.0:19301", progress=False)
    assert not (tmp_path / "out" / "superlink.log").exists()


def _veil(*argv, log=None):
    code = "import sys; from veil.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *argv], stdout=log or subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_a_secure_deployed_round_over_tls_is_a_step_of_gradient_descent_on_the_union(tmp_path):
    certs, other = tmp_path / "certs", tmp_path / "other-ca"
    generate_certificates(["server", "client0", "client1", "client2", "intruder"], certs,
                          extra_names={"server": ["localhost", "127.0.0.1", "::1"]})
    generate_certificates(["server"], other, extra_names={"server": ["localhost", "127.0.0.1", "::1"]})
    x, y, _, _ = load_task_data("digits")
    for k, (a, b) in enumerate(PARTS):
        np.savez(tmp_path / f"client{k}.npz", x_train=x[a:b].numpy(), y_train=y[a:b].numpy())
    torch.manual_seed(0)
    model = build_model("digits-mlp")
    init = get_weights(model)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    port = 19300 + os.getpid() % 500
    out = tmp_path / "run"
    server = _veil("fl", "server", "--model", "digits-mlp", "--data", "digits", "--clients", "3", "--rounds", "1",
                   "--batch-size", "10000", "--lr", str(LR), "--momentum", "0", "--secure", "--init",
                   str(tmp_path / "init.pt"), "--listen", f"127.0.0.1:{port}", "--certs", str(certs),
                   "--admit", "client0,client1,client2", "--max-client-records", "300", "--out", str(out),
                   "--no-progress")
    clients = [_veil("fl", "client", "--server", f"localhost:{port}", "--certs", str(certs), "--name", f"client{k}",
                     "--data", str(tmp_path / f"client{k}.npz"), "--require-secure", "--wait", "5",
                     "--runtime-port", str(port + 1 + k), log=open(tmp_path / f"client{k}.log", "wb"))
               for k in range(3)]
    intruder = _veil("fl", "client", "--server", f"localhost:{port}", "--certs", str(certs), "--name", "intruder",
                     "--data", str(tmp_path / "client0.npz"), "--wait", "5", "--start-timeout", "60",
                     "--runtime-port", str(port + 4))
    stranger = _veil("fl", "client", "--server", f"localhost:{port}", "--certs", str(other),
                     "--data", str(tmp_path / "client0.npz"), "--wait", "5", "--start-timeout", "30",
                     "--runtime-port", str(port + 5))
    try:
        server_out, _ = server.communicate(timeout=400)
        assert server.returncode == 0, server_out.decode(errors="replace")[-3000:]
        codes = [c.wait(timeout=60) for c in clients]
        assert codes == [0, 0, 0], [(tmp_path / f"client{k}.log").read_text()[-1500:] for k in range(3)]
        intruder_out, _ = intruder.communicate(timeout=120)
        stranger_out, _ = stranger.communicate(timeout=120)
    finally:
        for p in (server, *clients, intruder, stranger):
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert intruder.returncode == 1 and b"Failed to activate SuperNode" in intruder_out, intruder_out[-2000:]
    assert stranger.returncode == 1 and b"certificate verify failed" in stranger_out, stranger_out[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["secure_aggregation"] is True and summary["rounds"] == 1
    assert summary["history"][0]["clients"] == 3 and summary["history"][0]["failures"] == 0
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    got = torch.load(out / "model.pt", weights_only=True)
    reference = build_model("digits-mlp")
    set_weights(reference, init)
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    nn.functional.cross_entropy(reference(x[:600]), y[:600]).backward()
    opt.step()
    for name, value in reference.state_dict().items():
        assert float((got[name] - value).abs().max()) < 1e-4, name  # SecAgg+ quantisation: 2^-28 per unit
    assert float((got["1.weight"] - torch.as_tensor(init[0])).abs().max()) > 1e-3  # it trained
