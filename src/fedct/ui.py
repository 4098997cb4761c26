"""``fedct ui``: MLflow's web UI on the study's store, opened on its runs and its registry.

One ``mlflow server`` (``fedct.mlflow_server.mlflow_server``: one uvicorn worker, MLflow 3's job
runner and telemetry off, loopback, its own process group) serves the embedded SQLite
store that the pipeline wrote (``mlflow.db``, artifacts under ``mlruns/``), and this
prints the two pages a reader of the study wants: the runs of the ``fedct`` experiment
and the registered model ``fedct-seg``. Both URLs carry ``workflowType=machine_learning``:
MLflow 3's UI otherwise opens in its GenAI mode (traces, no Models entry in the sidebar).
Ctrl-C (or SIGTERM) stops the server's process group by its PID.

The store is checked first (``tracking.check_store_schema``): a newer MLflow would have
migrated it beyond what the installed one reads. mlflow runs as a subprocess, so this
module does not import it.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click

from fedct import procs
from fedct.config import PromoteParams
from fedct.errors import FedctError
from fedct.mlflow_server import mlflow_server
from fedct.tracking import DEFAULT_STORE, EXPERIMENT, check_store_schema

#: The query that makes MLflow 3's UI show the classic ML pages (runs, models).
ML_MODE = "workflowType=machine_learning"


@dataclass(frozen=True)
class UiPages:
    """A running UI: the server's PID, the study's runs page and the registry page."""

    pid: int
    url: str
    runs: str
    registry: str


def pages(url: str, experiment_id: str | None, model: str) -> tuple[str, str]:
    """The runs page of ``experiment_id`` (the experiments list when None) and the page of
    registered model ``model``, in ML mode."""
    runs = (f"{url}/#/experiments/{urllib.parse.quote(experiment_id)}/runs?{ML_MODE}"
            if experiment_id else f"{url}/#/experiments?{ML_MODE}")
    return runs, f"{url}/#/models/{urllib.parse.quote(model)}?{ML_MODE}"


def _experiment_id(url: str, name: str) -> str | None:
    """The id of experiment ``name`` from the server's REST API; None when it has none."""
    query = urllib.parse.urlencode({"experiment_name": name})
    try:
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?{query}",
                                    timeout=30) as response:
            return str(json.load(response)["experiment"]["experiment_id"])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise FedctError(f"MLflow on {url}: experiment {name!r}: HTTP {exc.code}") from exc


@contextmanager
def serve_ui(store: str | Path = DEFAULT_STORE, *, host: str = "127.0.0.1",
             port: int | None = None, workers: int = 1, experiment: str = EXPERIMENT,
             model: str = PromoteParams().model_name, log_path: str | Path | None = None,
             timeout_s: float = 120.0) -> Iterator[UiPages]:
    """Serve the UI on ``store`` for the duration of the ``with`` block.

    Args:
        store: the pipeline's SQLite store; its ``mlruns/`` beside it holds the artifacts.
        host, port: where to listen (loopback by default; ``port=None``: a free one).
        workers: uvicorn workers (1 suits 2 cores; MLflow's default is 4).
        experiment, model: the experiment and registered model the printed pages open.
        log_path: the server's log; None: a temporary file, named in errors.
        timeout_s: how long to wait for the server to answer.

    Raises:
        FedctError: no store there, a store another MLflow migrated, or a server that
            did not start (the message ends with its log).
    """
    store = Path(store)
    if not store.is_file():
        raise FedctError(f"{store}: no MLflow store (run the pipeline here first, or "
                         "name the store with --store)")
    check_store_schema(store)
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="fedct-ui-")) / "mlflow-server.log"
    backend = f"sqlite:///{store.resolve()}"
    with mlflow_server(backend, store.resolve().parent / "mlruns", host=host, port=port,
                       workers=workers, log_path=log_path, timeout_s=timeout_s) as server:
        runs, registry = pages(server.url, _experiment_id(server.url, experiment), model)
        yield UiPages(server.pid, server.url, runs, registry)


def run(store: Path, host: str, port: int, workers: int) -> None:
    """``fedct ui``: serve until Ctrl-C, printing the pages to open."""
    # SIGTERM unwinds like Ctrl-C, so the server's group is stopped either way.
    started = time.monotonic()
    try:
        with procs.raising(signals=(signal.SIGTERM, signal.SIGINT)), \
                serve_ui(store, host=host, port=port, workers=workers) as ui:
            click.echo(f"MLflow UI on {ui.url} (server PID {ui.pid}, store {store}, ready "
                       f"in {time.monotonic() - started:.0f} s); Ctrl-C stops it")
            click.echo(f"runs of the study:  {ui.runs}")
            click.echo(f"registered model:   {ui.registry}")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("MLflow UI stopped")
