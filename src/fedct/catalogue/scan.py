"""Scanning: bring the index up to date on a local process pool or a Dask cluster."""

from __future__ import annotations

import logging
import multiprocessing
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from fedct.catalogue.index import FileIndex, WalkError, walk_archive
from fedct.catalogue.pseudonym import PseudonymKey
from fedct.catalogue.rows import parse_files

log = logging.getLogger(__name__)

# Files per task sent to a worker: large enough to amortise the scanner and IPC, small
# enough to balance two workers on a few thousand files.
TASK_FILES = 256


@dataclass
class ScanStats:
    """What one scan did (``n_parsed`` counts header reads: 0 on an unchanged rescan)."""

    n_files: int = 0
    n_parsed: int = 0
    n_unchanged: int = 0
    n_dropped: int = 0
    n_redone: int = 0  # chunks re-read with pydicom after a worker failure
    seconds: float = 0.0
    errors: list[WalkError] = field(default_factory=list)


def secret_exposure(address: str) -> str | None:
    """Why sending the pseudonym secret to the workers of scheduler ``address`` is a risk,
    or None when it stays in this process or machine (``inproc://``, loopback) or travels
    encrypted (``tls://``). Every task carries the secret: workers hash the identifiers
    they read, so that no raw identifier leaves them."""
    scheme, sep, rest = address.partition("://")
    scheme = scheme.lower() if sep else "tcp"
    host = (rest if sep else address).rsplit(":", 1)[0].strip("[]").lower()
    if scheme in ("tls", "inproc") or (scheme == "tcp" and (
            host in ("localhost", "::1") or host.startswith("127."))):
        return None
    return (f"catalogue: scheduler {address}: the pseudonym secret goes to its workers "
            f"with every task over {scheme}://, unencrypted; use a tls:// scheduler "
            f"(distributed's TLS security) on the archive's own network")


class _Runner:
    """Runs ``parse_files`` on chunks: in-process, on a process pool, or on Dask.

    The pool starts on the first chunk only, so an unchanged rescan starts no
    processes. Workers fork from a forkserver that has imported this module once.
    """

    def __init__(self, root: str, secret: bytes, workers: int, scheduler: str | None) -> None:
        self.root, self.secret = root, secret
        self.workers, self.scheduler = max(1, workers), scheduler
        self._pool: ProcessPoolExecutor | None = None
        self._client: Any = None
        self.redone = 0
        self.pending: dict[Any, list[tuple[str, int, int]]] = {}

    @property
    def capacity(self) -> int:
        return 2 * self.workers if self.scheduler is None else 4 * self.workers

    def submit(self, items: list[tuple[str, int, int]]) -> Iterator[pa.RecordBatch]:
        """Queue a chunk; yields any results that are done (blocking when queue is full)."""
        if self.scheduler is None and self.workers == 1:
            yield parse_files(self.root, items, self.secret)
            return
        if self.scheduler is not None:
            if self._client is None:
                from distributed import Client

                if (why := secret_exposure(self.scheduler)) is not None:
                    warnings.warn(why, stacklevel=2)
                self._client = Client(self.scheduler, set_as_default=False)
            fut = self._client.submit(parse_files, self.root, items, self.secret, pure=False)
        else:
            if self._pool is None:
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload([__name__])
                self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
            fut = self._pool.submit(parse_files, self.root, items, self.secret)
        self.pending[fut] = items
        yield from self._collect(block=len(self.pending) >= self.capacity)

    def drain(self) -> Iterator[pa.RecordBatch]:
        while self.pending:
            yield from self._collect(block=True)

    def _collect(self, block: bool) -> Iterator[pa.RecordBatch]:
        done = [f for f in self.pending if f.done()]
        if not done and block:
            if self._client is not None:
                from distributed import wait as dask_wait

                with self._client.as_current():
                    dask_wait(list(self.pending), return_when="FIRST_COMPLETED")
            else:
                wait(list(self.pending), return_when=FIRST_COMPLETED)
            done = [f for f in self.pending if f.done()]
        for fut in done:
            items = self.pending.pop(fut)
            try:
                yield fut.result()
            except Exception as exc:  # noqa: BLE001 - e.g. the C++ scanner killed a worker
                log.warning("worker failed on a chunk of %d files (%s: %s); re-reading "
                            "it with pydicom in this process", len(items),
                            type(exc).__name__, exc)
                self.redone += 1
                if self._pool is not None and getattr(self._pool, "_broken", False):
                    self._pool.shutdown(wait=False, cancel_futures=False)
                    self._pool = None
                yield parse_files(self.root, items, self.secret, engine="pydicom")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._client is not None:
            self._client.close()


def _batched(it: Iterable, n: int) -> Iterator[list]:
    batch: list = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def scan(root: Path, index: FileIndex, key: PseudonymKey, *, workers: int = 2,
         scheduler: str | None = None, exclude: Iterable[Path] = (),
         progress: bool = True) -> ScanStats:
    """Bring ``index`` up to date with the files under ``root``; parse only what changed."""
    stats = ScanStats()
    t0 = time.perf_counter()
    runner = _Runner(str(root), key.secret, workers, scheduler)
    todo: list[tuple[str, int, int]] = []
    bar = tqdm(desc="catalogue", unit="file", disable=not progress, dynamic_ncols=True)
    try:
        def consume(results: Iterator[pa.RecordBatch]) -> None:
            for batch in results:
                index.write(batch)
                stats.n_parsed += batch.num_rows
                bar.set_postfix(parsed=stats.n_parsed, refresh=False)

        for batch in _batched(walk_archive(root, exclude, stats.errors), TASK_FILES):
            stats.n_files += len(batch)
            todo.extend(index.changed(batch))
            while len(todo) >= TASK_FILES:
                consume(runner.submit(todo[:TASK_FILES]))
                todo = todo[TASK_FILES:]
            bar.update(len(batch))
        if todo:
            consume(runner.submit(todo))
        consume(runner.drain())
    finally:
        runner.close()
        bar.close()
    stats.n_redone = runner.redone
    stats.n_unchanged = stats.n_files - stats.n_parsed
    stats.n_dropped = index.commit()
    stats.seconds = time.perf_counter() - t0
    return stats
