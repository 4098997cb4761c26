"""Scanning: bring the index up to date on a local process pool or a Dask cluster."""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from fedct.catalogue.index import FileIndex, WalkError, walk_archive
from fedct.catalogue.pseudonym import PseudonymKey
from fedct.catalogue.rows import parse_files

log = logging.getLogger(__name__)

# Files per chunk: one task for a worker, one batch walk (fedct.dicom.batch), whose numpy
# steps cost per chunk, not per file. 2048 files: 16 MiB of first reads (8 KiB each), tens
# of ms of work; 2048 rather than 1024 took ~7% less CPU per file on the demo archive.
TASK_FILES = 2048
# Files per Dask task: a task costs the scheduler about a millisecond.
DASK_TASK_FILES = 8 * TASK_FILES
# What the workers import once, in the forkserver they fork from: the main module (else
# every worker would import it again: for ``fedct``, click and the config) and
# parse_files' closure (numpy, pyarrow, the header readers); pandas, never.
WORKER_PRELOAD = ["__main__", "fedct.catalogue.rows"]


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


_POOLS: dict[int, ProcessPoolExecutor] = {}  # started once per process, by size
_POOLS_LOCK = threading.Lock()


def _started() -> int:
    return os.getpid()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """This process's pool of ``workers`` scan processes, started on first use and kept
    for later scans (they fork from a forkserver that imported ``WORKER_PRELOAD``)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None or getattr(pool, "_broken", False):
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(WORKER_PRELOAD)
            pool = _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=ctx)
    # Start every process now (the pool starts them one per submitted task otherwise).
    wait([pool.submit(_started) for _ in range(workers)])
    return pool


def _drop_pool(pool: ProcessPoolExecutor) -> None:
    with _POOLS_LOCK:
        for k, v in list(_POOLS.items()):
            if v is pool:
                del _POOLS[k]
    pool.shutdown(wait=False, cancel_futures=True)


@atexit.register
def _close_pools() -> None:
    for pool in list(_POOLS.values()):
        pool.shutdown(wait=True, cancel_futures=True)
    _POOLS.clear()


class _Runner:
    """Runs ``parse_files`` on chunks: in this process, on a process pool, or on Dask.

    The local pool starts in a background thread when a second chunk is queued (an
    archive of one chunk never waits for processes), and this process parses chunks
    itself until the pool's processes are up; the pool is kept for the next scan.
    """

    def __init__(self, root: str, secret: bytes, workers: int, scheduler: str | None) -> None:
        self.root, self.secret = root, secret
        self.workers, self.scheduler = max(1, workers), scheduler
        self._pool: ProcessPoolExecutor | None = None
        self._starting: concurrent.futures.Future | None = None
        self._failed = False
        self._client: Any = None
        self.redone = 0
        self.chunks = 0
        self.pending: dict[Any, list[tuple[str, int, int]]] = {}

    @property
    def capacity(self) -> int:
        return 2 * self.workers if self.scheduler is None else 4 * self.workers

    def _local_pool(self) -> ProcessPoolExecutor | None:
        """The pool once its processes are up; None while it starts (or for one chunk,
        or after its processes failed: this process reads the rest)."""
        if self._pool is None and self.chunks >= 2 and not self._failed:
            if self._starting is None:
                starter = concurrent.futures.ThreadPoolExecutor(1)
                self._starting = starter.submit(worker_pool, self.workers)
                starter.shutdown(wait=False)
            if self._starting.done():
                self._pool = self._starting.result()
        if self._pool is not None and getattr(self._pool, "_broken", False):
            log.warning("the scan's worker processes failed (%s); reading the rest in "
                        "this process", self._pool._broken)  # noqa: SLF001
            _drop_pool(self._pool)
            self._pool, self._failed = None, True
        return self._pool

    def submit(self, items: list[tuple[str, int, int]]) -> Iterator[pa.RecordBatch]:
        """Queue a chunk; yields any results that are done (blocking when queue is full)."""
        self.chunks += 1
        if self.scheduler is not None:
            if self._client is None:
                from distributed import Client

                if (why := secret_exposure(self.scheduler)) is not None:
                    warnings.warn(why, stacklevel=2)
                self._client = Client(self.scheduler, set_as_default=False)
            fut = self._client.submit(parse_files, self.root, items, self.secret, pure=False)
        elif self.workers == 1 or (pool := self._local_pool()) is None:
            yield parse_files(self.root, items, self.secret)
            return
        else:
            try:
                fut = pool.submit(parse_files, self.root, items, self.secret)
            except BrokenProcessPool:
                self.chunks -= 1
                yield from self.submit(items)  # _local_pool drops the pool
                return
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
                yield parse_files(self.root, items, self.secret, engine="pydicom")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _batched(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
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

        chunk = TASK_FILES if scheduler is None else DASK_TASK_FILES
        for batch in _batched(walk_archive(root, exclude, stats.errors), TASK_FILES):
            stats.n_files += len(batch)
            todo.extend(index.changed(batch))
            while len(todo) >= chunk:
                consume(runner.submit(todo[:chunk]))
                todo = todo[chunk:]
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
