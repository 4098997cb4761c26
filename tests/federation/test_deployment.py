"""A real Flower deployment on loopback: TLS, SuperNode authentication, ``flwr run``.

The certificates and node keys are made here. A SuperLink with TLS and
``--enable-supernode-auth`` accepts the two registered hospitals (sites A and B of
``fed_cohort``, each SuperNode naming its own site and data in its node config) and refuses
a node whose key was never registered and a node that lacks the CA. ``flwr run`` submits
the shipped app bundle for a FedAvg round. Every process is stopped by PID; none may remain.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
import tomli

from fedct.config import to_dict
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
from fedct.federation.flower_app import FederationConfig
from fedct.model.io import load_model
from tests.federation.conftest import PARAMS

# One round: each message starts a fresh flwr-clientapp that imports torch and MONAI (about
# 35 s per round on 2 idle cores), and the handshake, train and evaluate messages all run.
ROUNDS = 1
# Waits are limits against a hang, not speed targets. Under `make test` the other xdist worker
# trains models on the same 2 cores; there one round once took over 150 s (CI), each clientapp
# start being several times slower than on idle cores.
REPLY_TIMEOUT_S = 300.0  # the ServerApp's wait for each round's replies
RUN_TIMEOUT_S = 900.0  # the whole `flwr run`


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
    assert app["components"] == {"serverapp": "fedct.federation.flower_app:server_app",
                                 "clientapp": "fedct.federation.flower_app:client_app"}
    cfg = FederationConfig.from_run_config(app["config"])
    # The defaults follow params.yaml (the dataclass defaults equal params.yaml).
    from fedct.config import FederateParams, TrainParams

    fed = FederateParams()
    assert cfg.train_params == TrainParams()
    assert (cfg.sites, cfg.rounds, cfg.local_steps, cfg.min_clients, cfg.seed) == (
        fed.sites, fed.rounds, fed.local_steps, fed.min_clients, fed.seed)


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


@pytest.mark.slow
def test_tls_federation_of_two_registered_hospitals_refuses_an_unregistered_node(
        fed_cohort: Path, tmp_path: Path) -> None:
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    tls = make_tls(tmp_path / "pki")
    keys = {s: make_node_key(tmp_path / "keys", f"hospital-{s}") for s in "AB"}
    rogue = make_node_key(tmp_path / "keys", "rogue")
    port = free_port()
    link = f"127.0.0.1:{port}"
    out = tmp_path / "federation"
    times: dict[str, float] = {}
    dep = Deployment(tmp_path / "deploy")
    try:
        t0 = time.monotonic()
        dep.start_superlink(tls, port)
        times["superlink"] = time.monotonic() - t0
        dep.add_connection("fedct", link, tls.ca_cert)
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
