"""A shared MLflow tracking server on PostgreSQL, started and stopped by PID.

``make mlflow-server`` (or ``python -m fedct.mlflow_server``) runs ``mlflow server`` with a
PostgreSQL backend store (runs, metrics and the model registry) and a local artifact
folder that the server proxies (``mlflow-artifacts:/``), on loopback. Clients then set::

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000

and every fedct command logs and registers there; without the variable fedct keeps
MLflow's embedded local store (``tracking.configure``). The server is a child in its own
process group: ``mlflow server`` starts uvicorn workers, and stopping the group by its
PID stops them all, never anything else. mlflow itself runs as a subprocess, so this
module does not import it (``fedct.tracking`` stays the only one that does).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from fedct import procs
from fedct.errors import FedctError

#: PostgreSQL on these machines and in CI: loopback, trust authentication. The driver is
#: named because SQLAlchemy 2.1 defaults ``postgresql://`` to psycopg 3, which fedct does
#: not install; psycopg2 is what it pins.
DEFAULT_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432"
DEFAULT_DATABASE = "fedct_mlflow"
_ADMIN_DB = "postgres"


def database_uri(database: str = DEFAULT_DATABASE, server: str = DEFAULT_PG) -> str:
    """SQLAlchemy URI of ``database`` on ``server`` (``postgresql+psycopg2://user@host:port``)."""
    return f"{server.rstrip('/')}/{database}"


def _connect_admin(uri: str):
    """Autocommit connection to the server's maintenance database, and the target's name."""
    import psycopg2
    from psycopg2.extensions import parse_dsn

    libpq_uri = uri.replace("postgresql+psycopg2://", "postgresql://", 1)
    try:
        params = parse_dsn(libpq_uri)
    except psycopg2.ProgrammingError as exc:
        raise FedctError(f"PostgreSQL URI {_safe(uri)}: {exc}") from exc
    database = params.pop("dbname", None)
    if not database:
        raise FedctError(f"PostgreSQL URI {_safe(uri)}: names no database")
    try:
        conn = psycopg2.connect(**params, dbname=_ADMIN_DB, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreachable"
        raise FedctError(f"PostgreSQL at {_safe(uri)}: {reason}") from exc
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    return conn, database


def _safe(uri: str) -> str:
    """The URI without a password, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def ensure_database(uri: str) -> bool:
    """Create the database ``uri`` names if it is missing; True when it was created.

    Raises:
        FedctError: the server is unreachable or refuses (message names host and reason).
    """
    from psycopg2 import sql

    conn, database = _connect_admin(uri)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone():
                return False
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
            return True
    finally:
        conn.close()


def drop_database(uri: str) -> None:
    """Drop the database ``uri`` names, closing its connections (tests' scratch databases)."""
    from psycopg2 import sql

    conn, database = _connect_admin(uri)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                        .format(sql.Identifier(database)))
    finally:
        conn.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class MlflowServer:
    """A running server: what clients need (``url``) and what stops it (``pid``)."""

    url: str
    pid: int
    backend_store_uri: str
    artifacts: Path


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str,
    artifacts: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    log_path: str | Path | None = None,
    timeout_s: float = 120.0,
) -> Iterator[MlflowServer]:
    """Run ``mlflow server`` for the duration of the ``with`` block.

    Args:
        backend_store_uri: e.g. ``database_uri("fedct_mlflow")``; a PostgreSQL database
            is created when missing. MLflow creates its tables on first start.
        artifacts: local folder the server stores and serves artifacts from.
        host, port: where to listen; ``port=None`` picks a free one.
        workers: uvicorn workers (1 suits a 2-core machine).
        log_path: file for the server's output; None leaves it on this terminal.
        timeout_s: how long to wait for ``/health`` (the first start migrates the schema).

    Yields:
        ``MlflowServer`` with the ``url`` to set as ``MLFLOW_TRACKING_URI``.

    Raises:
        FedctError: PostgreSQL unreachable, or the server exited or never became healthy
            (the message ends with the last lines of its log).
    """
    if backend_store_uri.startswith(("postgresql", "postgres:")):
        ensure_database(backend_store_uri)
    artifacts = Path(artifacts).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port),
           "--workers", str(workers)]
    # The server must not follow a client setting meant for fedct's own commands.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # MLflow 3's job runner (huey consumers for GenAI jobs, ~8 processes) serves nothing
    # fedct uses and would compete for the cores; set the variable to opt back in.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # No usage data leaves a hospital's machine (MLflow 3 sends it by default).
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
    try:
        proc = procs.start_group(cmd, stdout=log, stderr=subprocess.STDOUT if log else None,
                                 stdin=subprocess.DEVNULL, env=env)
    except BaseException:
        if log:
            log.close()
        raise
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if proc.poll() is not None:
                raise FedctError(f"mlflow server on {url} exited with status {proc.returncode}"
                                 f"{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise FedctError(f"mlflow server on {url} not healthy after {timeout_s:g} s"
                                 f"{_tail(log_path)}")
            time.sleep(0.5)
        yield MlflowServer(url=url, pid=proc.pid, backend_store_uri=backend_store_uri,
                           artifacts=artifacts)
    finally:
        try:
            procs.stop_group(proc)
        finally:
            if log:
                log.close()


def _tail(log_path: str | Path | None, lines: int = 5) -> str:
    if log_path is None or not Path(log_path).exists():
        return ""
    text = Path(log_path).read_text(errors="replace").strip().splitlines()[-lines:]
    return " (log " + str(log_path) + "): " + " | ".join(text) if text else ""


@click.command()
@click.option("--pg", "pg_server", default=DEFAULT_PG, show_default=True,
              help="PostgreSQL server, postgresql+psycopg2://user@host:port")
@click.option("--database", default=DEFAULT_DATABASE, show_default=True,
              help="database for runs and the registry (created if missing)")
@click.option("--artifacts", type=click.Path(file_okay=False), default="mlartifacts",
              show_default=True, help="local folder the server keeps artifacts in")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--workers", type=int, default=1, show_default=True)
def main(pg_server: str, database: str, artifacts: str, host: str, port: int,
         workers: int) -> None:
    """Serve MLflow on PostgreSQL until Ctrl-C; then stop the server by its PID."""
    # SIGTERM (e.g. from a job scheduler) unwinds like Ctrl-C, so the server is stopped;
    # SIGINT too when the shell started us with it ignored (a background job).
    uri = database_uri(database, pg_server)
    try:
        with procs.raising(signals=(signal.SIGTERM, signal.SIGINT)), \
                mlflow_server(uri, artifacts, host=host, port=port, workers=workers) as server:
            click.echo(f"MLflow on {server.url} (PID {server.pid}), backend {_safe(uri)}, "
                       f"artifacts {server.artifacts}")
            click.echo(f"clients: export MLFLOW_TRACKING_URI={server.url}   (Ctrl-C stops it)")
            while True:
                time.sleep(3600)
    except FedctError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo("MLflow server stopped")


if __name__ == "__main__":
    main()
