"""A real MLflow server on PostgreSQL (loopback): log, register, promote, read back.

Needs PostgreSQL on 127.0.0.1:5432 with trust auth (or ``FEDCT_TEST_PG``). Elsewhere the
test skips with the reason; in CI (``CI=true``) a missing database or a server that does
not start is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedct import mlflow_server, tracking
from fedct.errors import FedctError
from fedct.model.io import architecture, build_from_arch, load_model, save_model

NAME = "fedct-seg"
IN_CI = os.environ.get("CI", "").lower() == "true"
# Another PostgreSQL for this test, e.g. postgresql+psycopg2://user@db-host:5432
PG = os.environ.get("FEDCT_TEST_PG", mlflow_server.DEFAULT_PG)


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and the server path is unavailable: {reason}")
    pytest.skip(reason)


def tiny_model(folder: Path, seed: int) -> Path:
    """A 4-8 channel Bayesian U-Net and its card, as the train stage writes them."""
    torch.manual_seed(seed)
    arch = architecture(3, (4, 8), (2,), 0.5, 1)
    folder.mkdir(parents=True)
    save_model(build_from_arch(arch), folder / "model.safetensors", arch,
               {"site": "fed", "labels": {"1": "femur", "2": "pelvis"}})
    return folder


@pytest.fixture
def mlflow_on_postgres(tmp_path: Path) -> Iterator[mlflow_server.MlflowServer]:
    """A server on a fresh PostgreSQL database; stopped by PID and the database dropped."""
    db_uri = mlflow_server.database_uri(f"fedct_test_{uuid.uuid4().hex[:12]}", PG)
    try:
        mlflow_server.ensure_database(db_uri)
    except FedctError as exc:
        unavailable(str(exc))
    try:
        with contextlib.ExitStack() as stack:
            try:
                srv = stack.enter_context(mlflow_server.mlflow_server(
                    db_uri, tmp_path / "artifacts", log_path=tmp_path / "server.log"))
            except FedctError as exc:
                unavailable(str(exc))
            yield srv
        with pytest.raises(ProcessLookupError):  # stopped by its PID and reaped
            os.kill(srv.pid, 0)
    finally:
        mlflow_server.drop_database(db_uri)


@pytest.mark.slow
def test_register_and_promote_through_a_postgres_backed_server(
        mlflow_on_postgres: mlflow_server.MlflowServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_on_postgres.url)
    champion_dir = tiny_model(tmp_path / "fed1", seed=1)
    evidence = {"git_commit": "abc123", "dvc.cohort": "md5-1", "comparison": "sha-1"}
    with tracking.start_run("promote") as run:
        logged = tracking.log_fedct_model(run, champion_dir)
    version = tracking.register_with_evidence(logged.model_uri, NAME, evidence, champion_dir)
    # Idempotent on this backend too: the same evidence adds no version.
    assert tracking.register_with_evidence(logged.model_uri, NAME, evidence,
                                           champion_dir) == version
    tracking.set_champion(NAME, version, reasons=["bound above margin"])

    # A weaker candidate is registered and refused, and the champion stays.
    weak_dir = tiny_model(tmp_path / "fed2", seed=2)
    with tracking.start_run("promote") as run:
        weak = tracking.log_fedct_model(run, weak_dir)
    weak_version = tracking.register_with_evidence(weak.model_uri, NAME,
                                                   {**evidence, "dvc.cohort": "md5-2"},
                                                   weak_dir)
    tracking.record_refusal(NAME, weak_version, ["lower bound below margin"])
    assert tracking.list_versions(NAME) == [version, weak_version]
    assert tracking.get_alias(NAME, "champion") == version
    assert tracking.version_tags(NAME, weak_version)["fedct.decision"] == "refused"

    got = tracking.download_model(f"models:/{NAME}@champion", tmp_path / "download")
    assert (got / tracking.MODEL_FILE).read_bytes() == \
        (champion_dir / tracking.MODEL_FILE).read_bytes()
    _, card = load_model(got / tracking.MODEL_FILE)
    assert card["site"] == "fed"
    # The server keeps the artifacts in its destination folder; the client wrote none.
    assert len(list((tmp_path / "artifacts").rglob(tracking.MODEL_FILE))) == 2
    assert not (tmp_path / "mlruns").exists()


def test_a_server_that_cannot_start_is_a_fedct_error_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with pytest.raises(FedctError, match=r"exited with status \d+ \(log .*server\.log\)"), \
            mlflow_server.mlflow_server("bogus://nowhere", tmp_path / "artifacts", log_path=log):
        pass
    assert log.read_text().strip()


def test_uris_name_the_driver_and_hide_passwords() -> None:
    assert mlflow_server.database_uri("db") == "postgresql+psycopg2://postgres@127.0.0.1:5432/db"
    with pytest.raises(FedctError, match=r"u:\*\*\*@h:1: names no database"):
        mlflow_server.ensure_database("postgresql+psycopg2://u:secret@h:1")
