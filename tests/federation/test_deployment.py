"""A real Flower deployment on loopback: TLS, SuperNode authentication, ``flwr run``.

The certificates and node keys are made here. A SuperLink with TLS and
``--enable-supernode-auth`` listens on 127.0.0.1 only; the hospitals' SuperNodes dial the
Fleet gateway. It accepts the two registered hospitals (sites A and B of ``fed_cohort``,
each SuperNode naming its own site and data in its node config) and refuses a node whose key
was never registered and a node that lacks the CA. ``flwr run`` submits the shipped app
bundle for a FedAvg round. A party with only the CA and the hospital-facing address can
neither register a key nor list or submit runs. Private keys are 0600. Every process is
stopped by PID; none may remain.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from pathlib import Path

import psutil
import pytest
import tomli

from fedct.config import load_params, to_dict
from fedct.errors import FedctError
from fedct.federation.deploy import (
    APP_DIR,
    REFUSED_CODE,
    Deployment,
    free_port,
    make_node_key,
    make_tls,
    node_config_arg,
)
from fedct.federation.gateway import REFUSAL, create_app
from fedct.federation.run_config import FederationConfig, run_config
from fedct.model.io import load_model
from tests.federation.conftest import PARAMS, listening

# One round: each message starts a fresh flwr-clientapp that imports torch and MONAI (about
# 35 s per round on 2 idle cores), and the handshake, train and evaluate messages all run.
ROUNDS = 1
# Waits are limits against a hang, not speed targets. Under `make test` the other xdist worker
# trains models on the same 2 cores; there one round once took over 150 s (CI), each clientapp
# start being several times slower than on idle cores.
REPLY_TIMEOUT_S = 300.0  # the ServerApp's wait for each round's replies
RUN_TIMEOUT_S = 900.0  # the whole `flwr run`
REPO = Path(__file__).parents[2]


def _live_children(before: set[int] = frozenset()) -> list[psutil.Process]:
    """Live children of this process that were not there ``before`` (an earlier test file
    in the same pytest worker may have left multiprocessing's resource tracker)."""
    return [c for c in psutil.Process().children(recursive=True)
            if c.status() != psutil.STATUS_ZOMBIE and c.pid not in before]


def test_the_app_bundle_ships_config_only_and_its_defaults_parse() -> None:
    files = sorted(p.name for p in APP_DIR.rglob("*") if p.is_file())
    assert files == ["README.md", "pyproject.toml"]  # no data, no weights, no code copy
    project = tomli.loads((APP_DIR / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedct.federation.server_app:server_app",
                                 "clientapp": "fedct.federation.client_app:client_app"}
    FederationConfig.from_run_config(app["config"])


def test_the_app_bundle_defaults_are_params_yaml() -> None:
    # The bundle's [tool.flwr.app.config] is a copy of params.yaml that Flower reads (a
    # FAB carries no other file): it must hold every key of a run config, and the values
    # of params.yaml's federate and train keys, for FedAvg (proximal-mu 0; `fedct
    # federate` passes federate.proximal_mu for FedProx). Edit it when they change.
    params = load_params(REPO / "params.yaml")
    fed = params.federate
    app = tomli.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    cfg = FederationConfig.from_run_config(app["config"])
    expected = FederationConfig(
        sites=tuple(fed.sites), train_params=params.train, rounds=fed.rounds,
        local_steps=fed.local_steps, mu=0.0, min_clients=fed.min_clients, seed=fed.seed,
        site_weights=None if fed.weighting == "cases" else cfg.site_weights,
        cohort_dir="", init_model="", checkpoint_dir=cfg.checkpoint_dir,
        out_dir=cfg.out_dir, timeout=cfg.timeout, patience=fed.patience,
        min_delta=fed.min_delta)
    assert cfg == expected
    assert fed.weighting == "cases", "equal weighting: write the sites' weights to the bundle"
    # Every key a run config has, so that `flwr run --run-config` may override each one.
    assert set(app["config"]) == set(run_config(cfg))


def test_credentials_are_what_flower_loads(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    tls = make_tls(tmp_path, hosts=["superlink.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(map(str, san.get_values_for_type(x509.IPAddress))) == {
        "127.0.0.1", "::1", "10.0.0.5"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost",
                                                         "superlink.example.org"}
    assert tls.server_key.stat().st_mode & 0o077 == 0
    key = make_node_key(tmp_path, "node-A")
    assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    private = load_ssh_private_key(key.private.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key() == load_ssh_public_key(key.public.read_bytes())
    assert node_config_arg({"site": "A", "cohort-dir": "/data/c"}) == \
        "site='A' cohort-dir='/data/c'"


def test_private_keys_are_written_0600_replacing_a_looser_file(tmp_path: Path) -> None:
    # Files left by an earlier setup, readable by everyone (umask 022, a copy, a backup).
    for name in ("ca.key", "server.key", "hospital-A"):
        (tmp_path / name).write_text("old key")
        (tmp_path / name).chmod(0o644)
    before = {name: (tmp_path / name).stat().st_ino for name in ("server.key", "hospital-A")}
    with open(tmp_path / "server.key", "rb") as held:  # opened while it was readable
        tls = make_tls(tmp_path)
        key = make_node_key(tmp_path, "hospital-A")
        assert held.read() == b"old key"  # the old file, not the new key
    for path in (tmp_path / "ca.key", tls.server_key, key.private):
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert b"PRIVATE KEY" in path.read_bytes(), path
    assert all((tmp_path / n).stat().st_ino != ino for n, ino in before.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ca.crt", "ca.key", "server.pem", "server.key", "hospital-A", "hospital-A.pub"])
    # Fresh files too, whatever the umask.
    old = os.umask(0)
    try:
        fresh = make_node_key(tmp_path / "fresh", "hospital-B")
    finally:
        os.umask(old)
    assert fresh.private.stat().st_mode & 0o777 == 0o600


def test_a_private_key_that_others_can_read_is_refused_before_anything_starts(
        tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    key = make_node_key(tmp_path / "keys", "hospital-A")
    tls.server_key.chmod(0o640)
    key.private.chmod(0o604)
    with Deployment(tmp_path / "deploy") as dep:
        with pytest.raises(FedctError, match=r"server.key: private key is accessible to "
                                             r"group or others \(mode 0640\)"):
            dep.start_superlink(tls, free_port(), free_port())
        with pytest.raises(FedctError, match=r"hospital-A: private key .* \(mode 0604\)"):
            dep.start_supernode("node-A", "127.0.0.1:9", tls.ca_cert, key.private,
                                {"site": "A"}, port=free_port())
        assert dep.procs == {}  # nothing was started


def test_the_gateway_forwards_to_a_superlink_on_loopback_only(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    for upstream in ("10.0.0.5:9093", "superlink.example.org:9093", "[2001:db8::1]:9093",
                     "0.0.0.0:9093"):
        with pytest.raises(FedctError, match="must stay on loopback"):
            create_app(upstream, tls.ca_cert)
    for upstream in ("127.0.0.1:9093", "localhost:9093", "[::1]:9093"):
        create_app(upstream, tls.ca_cert)  # built, not started: nothing listens


def _raw_request(host: str, port: int, method: str, path: str, ca: Path) -> int:
    """Send ``METHOD PATH`` as written (no client-side normalisation); the HTTP status."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "Content-Type: application/protobuf\r\nContent-Length: 0\r\n"
                    "Connection: close\r\n\r\n".encode())
        reply = b""
        while b"\r\n" not in reply:
            chunk = tls.recv(4096)
            if not chunk:
                break
            reply += chunk
    return int(reply.split()[1])


def _json(text: str) -> dict:
    return json.loads(text[text.index("{"):])


@pytest.mark.slow
def test_a_party_with_only_the_ca_can_neither_register_nor_list_nor_submit(
        tmp_path: Path) -> None:
    """The attack of issue #24: every hospital holds ``ca.crt`` and reaches the address the
    SuperNodes dial. Here that address is 127.0.0.2, another loopback address, so that
    "reachable from the hospitals" and "bound to 127.0.0.1" differ on one machine."""
    hospital_side = "127.0.0.2"
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    tls = make_tls(tmp_path / "pki", hosts=[hospital_side])
    key = make_node_key(tmp_path / "keys", "hospital-A")
    rogue = make_node_key(tmp_path / "keys", "rogue")
    fleet_port, control_port = free_port(hospital_side), free_port()
    centre = Deployment(tmp_path / "centre")
    # The attacker's own FLWR_HOME: its config knows the address and the CA, nothing else.
    attacker = Deployment(tmp_path / "attacker")
    try:
        started = centre.start_superlink(tls, fleet_port, control_port,
                                         fleet_host=hospital_side)
        assert started.fleet_address == f"{hospital_side}:{fleet_port}"
        assert started.control_address == f"127.0.0.1:{control_port}"
        # The SuperLink (Control, Runtime and Fleet APIs on one port) and what it started
        # listen on 127.0.0.1 only; the gateway alone on the hospital-facing address.
        link = psutil.Process(started.superlink.pid)
        assert {(ip, port) for *_, ip, port in listening(
            [link, *link.children(recursive=True)])} == {("127.0.0.1", control_port)}
        assert {(ip, port) for *_, ip, port in listening(
            [psutil.Process(started.gateway.pid)])} == {(hospital_side, fleet_port)}
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((hospital_side, control_port), timeout=10).close()

        centre.add_connection("fedct", started.control_address, tls.ca_cert)
        centre.register(key.public, "fedct", "hospital-A")
        attacker.add_connection("hospital", started.fleet_address, tls.ca_cert)
        attempts = {
            "register a key": ["supernode", "register", str(rogue.public), "hospital",
                               "--name", "rogue"],
            "list nodes": ["supernode", "list", "hospital"],
            "list runs": ["ls", "hospital"],
            "submit an app": ["run", str(APP_DIR), "hospital"],
        }
        for what, args in attempts.items():
            done = attacker.flwr(args, timeout=120)
            assert done.returncode != 0 and REFUSAL in done.stdout, (what, done.stdout)
        # Nothing got through: one node (the registered hospital), no run.
        nodes = _json(centre.flwr(["supernode", "list", "fedct", "--format", "json"],
                                  60).stdout)["nodes"]
        assert len(nodes) == 1
        assert _json(centre.flwr(["ls", "fedct", "--format", "json"], 60).stdout)["runs"] == []
        # Neither other APIs nor tricks in the path get past the gateway ...
        for method, path in [("POST", "/v1/control/list-runs"),
                             ("POST", "/v1/runtime/get-nodes"),
                             ("POST", "/v1/fleet/../control/list-runs"),
                             ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
                             ("POST", "/v1/fleet//../../v1/control/list-runs"),
                             ("GET", "/docs"), ("GET", "/openapi.json"),
                             ("GET", "/health")]:
            assert _raw_request(hospital_side, fleet_port, method, path,
                                tls.ca_cert) == 403, path
        # ... and Fleet calls reach the SuperLink, which wants a registered node's signature.
        assert _raw_request(hospital_side, fleet_port, "POST", "/v1/fleet/register-node",
                            tls.ca_cert) == 401
        # The same request on the SuperLink's own port shows what the gateway withholds.
        assert _raw_request("127.0.0.1", control_port, "POST", "/v1/control/list-runs",
                            tls.ca_cert) == 200
    finally:
        centre.stop()
        attacker.stop()
    assert centre.leftovers() == [] and attacker.leftovers() == []
    assert _live_children(before) == []


@pytest.mark.slow
def test_tls_federation_of_two_registered_hospitals_refuses_an_unregistered_node(
        fed_cohort: Path, tmp_path: Path) -> None:
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    tls = make_tls(tmp_path / "pki")
    keys = {s: make_node_key(tmp_path / "keys", f"hospital-{s}") for s in "AB"}
    rogue = make_node_key(tmp_path / "keys", "rogue")
    out = tmp_path / "federation"
    times: dict[str, float] = {}
    dep = Deployment(tmp_path / "deploy")
    try:
        t0 = time.monotonic()
        started = dep.start_superlink(tls, free_port(), free_port())
        link = started.fleet_address  # what the hospitals' SuperNodes dial: the gateway
        times["superlink"] = time.monotonic() - t0
        dep.add_connection("fedct", started.control_address, tls.ca_cert)  # centre's flwr
        for site, key in keys.items():
            dep.register(key.public, "fedct", f"hospital-{site}")
        nodes = {s: dep.start_supernode(f"node-{s}", link, tls.ca_cert, keys[s].private,
                                        {"site": s, "cohort-dir": str(fed_cohort)},
                                        port=free_port()) for s in "AB"}
        refused = dep.start_supernode("rogue", link, tls.ca_cert, rogue.private,
                                      {"site": "A", "cohort-dir": str(fed_cohort)},
                                      port=free_port())
        # A registered key does not help a node that cannot verify the SuperLink.
        no_ca = dep.start_supernode("no-ca", link, None, keys["A"].private,
                                    {"site": "A", "cohort-dir": str(fed_cohort)},
                                    port=free_port())
        times["up"] = time.monotonic() - t0
        # A ServerApp that fails is reported as such (``flwr run --stream`` itself exits 0).
        with pytest.raises(FedctError, match="finished:failed.*federation run config"):
            dep.run_app("fedct", {"sites": "A,B", "train-params": "{not json"},
                        timeout=REPLY_TIMEOUT_S)
        times["failed run"] = time.monotonic() - t0 - times["up"]
        t1 = time.monotonic()
        done = dep.run_app("fedct", {
            "sites": "A,B", "rounds": ROUNDS, "local-steps": 2, "min-clients": 2, "seed": 1,
            "timeout": REPLY_TIMEOUT_S, "train-params": json.dumps(to_dict(PARAMS)),
            "out-dir": str(out), "checkpoint-dir": str(out / "checkpoint")},
            timeout=RUN_TIMEOUT_S)
        times["run"] = time.monotonic() - t1
        assert done.status == "finished:completed"  # run_app checks it; explicit here
        # The unregistered key is refused at activation; the registered nodes still run.
        assert refused.wait(timeout=30) == 1
        log = dep.log_path("rogue").read_text()
        assert f"Exit Code: {REFUSED_CODE}" in log and "Failed to activate SuperNode" in log
        assert no_ca.wait(timeout=30) == 1
        log = dep.log_path("no-ca").read_text()
        assert f"Exit Code: {REFUSED_CODE}" in log and "CERTIFICATE_VERIFY_FAILED" in log
        assert all(n.poll() is None for n in nodes.values())
    finally:
        dep.stop()
    print(f"deployment timings (s): {times}")
    assert dep.leftovers() == []
    assert _live_children(before) == []
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    assert all(r["clients"] == 2 and r["failed"] == [] for r in history)
    # Each node trained on its own site's split: A has 2 training cases, B 3.
    assert {s: v["n_train"] for s, v in history[-1]["sites"].items()} == {"A": 2, "B": 3}
    model, card = load_model(out / "model.safetensors")
    assert card["federation"]["sites"] == ["A", "B"] and card["federation"]["rounds"] == ROUNDS
