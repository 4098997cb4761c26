"""``fedct catalogue``: sort every CT series of an archive by site and acquisition condition.

Reads DICOM headers only (never pixel data) and writes, under OUT_DIR:

- ``series.parquet``: one row per series (pseudonymised keys, site, vendor, model,
  kernel, geometry, ``usable`` and the ``reason`` when not);
- ``rejects.parquet``: every file that is not catalogued (``path`` relative to the
  archive, ``reason``, ``detail``);
- reports: ``exam_counts.csv`` (vendor x site, the source study's layout),
  ``combos.csv`` (vendor+model+kernel x site), ``usable_by_site.csv``,
  ``unusable_reasons.csv``, ``reject_reasons.csv``, the domain-shift candidates
  ``shift_combos.csv`` / ``shift_sites.csv`` with ``shift_heatmap.png``;
- ``metrics.json``: counts and the top shift candidates (deterministic: no timings);
- ``index/``: the per-file index that makes a rescan incremental (a cache that stays
  at the site: it holds archive paths, like rejects.parquet).

Scale: the archive is walked lazily; files are parsed in chunks by a process pool (or a
Dask cluster); per-file rows stream into Parquet parts; series are aggregated bucket
by bucket (series hashed into buckets), so memory is bounded by the bucket size and
the number of series, not by the number of files.

PHI: PatientName, PatientBirthDate and AccessionNumber are never read; PatientID and
the study/series/SOP instance UIDs are replaced by keyed hashes (HMAC-SHA256) inside
the worker that reads them, before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from fedct import dicom
from fedct.config import CatalogueParams, to_dict
from fedct.errors import FedctError

log = logging.getLogger(__name__)

# Files per task sent to a worker: large enough to amortise the scanner and IPC, small
# enough to balance two workers on a few thousand files.
TASK_FILES = 256
# Rows per index part file before a new part starts.
PART_ROWS = 500_000
# Catalogued files per aggregation bucket: bounds the memory of the series pass.
BUCKET_ROWS = 500_000
# More parts than this (many small incremental rescans) are compacted.
MAX_PARTS = 64
# Bump when the per-file row changes meaning: an index of another version is rebuilt.
INDEX_VERSION = 1
INDEX_DIRNAME = "index"
UNKNOWN_SITE = "UNKNOWN"
KEY_ENV = "FEDCT_PSEUDONYM_KEY"
# Public demo key: pseudonyms made with it can be reversed by anyone holding the
# original identifiers. Synthetic data only; outputs record its use.
DEMO_KEY = b"fedct-public-demo-key: synthetic data only"
DEMO_KEY_ID = "demo"
MIN_KEY_BYTES = 16
# Slice positions are regular when every gap lies within this of the median gap.
SPACING_TOL_MM = 0.01
SPACING_TOL_REL = 0.05
# Thickness classes of the acquisition condition (mm, upper bounds inclusive).
THICKNESS_CLASSES = ((1.5, "thin"), (3.0, "medium"), (math.inf, "thick"))
# What makes an acquisition condition for the shift analysis.
CONDITION = ("vendor", "model", "kernel", "thickness_class")
HEATMAP_ROWS = 20
STUDY_VENDORS = ("CANON", "GE", "PHILIPS", "SIEMENS")


# ----------------------------------------------------------------------------------
# Pseudonymisation
# ----------------------------------------------------------------------------------

class PseudonymKeyError(FedctError):
    """No usable HMAC key: the message says where one is expected."""


@dataclass(frozen=True)
class PseudonymKey:
    """The site's HMAC secret and where it came from (never logged)."""

    secret: bytes = field(repr=False)
    demo: bool
    source: str  # "env", "file" or "demo"

    @property
    def key_id(self) -> str:
        """Public fingerprint: two catalogues with the same key_id share pseudonyms."""
        if self.demo:
            return DEMO_KEY_ID
        return hmac.new(self.secret, b"fedct:key-id", hashlib.sha256).hexdigest()[:12]


def load_key(params: CatalogueParams) -> PseudonymKey:
    """The HMAC key: ``FEDCT_PSEUDONYM_KEY``, else ``params.key_file``, else the demo key.

    The secret stays with the site that holds the archive; without it the pseudonyms
    cannot be linked back to patients. Raises PseudonymKeyError when no key is
    configured and ``demo_key`` is false, or a configured key is unusable.
    """
    env = os.environ.get(KEY_ENV)
    if env:
        secret, source = env.encode("utf-8"), "env"
        where = f"environment variable {KEY_ENV}"
    elif params.key_file:
        path = Path(params.key_file).expanduser()
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise PseudonymKeyError(
                f"catalogue.key_file {path}: cannot read the pseudonymisation key ({exc})"
            ) from exc
        source, where = "file", f"catalogue.key_file {path}"
    elif params.demo_key:
        log.warning("pseudonymising with the public demo key (demo_key: true): "
                    "synthetic data only")
        return PseudonymKey(DEMO_KEY, demo=True, source="demo")
    else:
        raise PseudonymKeyError(
            "no pseudonymisation key: set the environment variable "
            f"{KEY_ENV} or catalogue.key_file to a secret the site keeps "
            "(catalogue.demo_key: true allows the public demo key, synthetic data only)"
        )
    if len(secret) < MIN_KEY_BYTES:
        raise PseudonymKeyError(
            f"{where}: the pseudonymisation key has {len(secret)} bytes; "
            f"use at least {MIN_KEY_BYTES} random bytes"
        )
    return PseudonymKey(secret, demo=False, source=source)


class _Hasher:
    """HMAC-SHA256 pseudonyms, truncated to 128 bits (32 hex), one domain per kind.

    The domain prefix ("patient:", "study:", ...) keeps equal strings of different
    kinds from sharing a pseudonym. Keys of studies and series repeat over a chunk's
    files, so they are memoised.
    """

    def __init__(self, secret: bytes) -> None:
        self._base = hmac.new(secret, digestmod=hashlib.sha256)
        self._memo: dict[tuple[str, str], str] = {}

    def __call__(self, kind: str, value: str, memo: bool = False) -> str:
        if memo:
            hit = self._memo.get((kind, value))
            if hit is not None:
                return hit
        h = self._base.copy()
        h.update(f"{kind}:{value}".encode("utf-8", "surrogateescape"))
        out = h.hexdigest()[:32]
        if memo:
            self._memo[(kind, value)] = out
        return out


def pseudonym(secret: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of ``kind:value`` under ``secret``, first 32 hex digits."""
    return _Hasher(secret)(kind, value)


# ----------------------------------------------------------------------------------
# Per-file rows (run in the workers)
# ----------------------------------------------------------------------------------

INDEX_SCHEMA = pa.schema([
    ("relpath", pa.string()),
    ("path_hash", pa.int64()),
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("reader", pa.string()),
    ("reason", pa.string()),  # null: catalogued
    ("detail", pa.string()),
    ("sop_key", pa.string()),
    ("patient_key", pa.string()),
    ("study_key", pa.string()),
    ("series_key", pa.string()),
    ("bucket", pa.int32()),
    ("institution", pa.string()),
    ("sop_class", pa.string()),
    ("transfer_syntax", pa.string()),
    ("modality", pa.string()),
    ("image_type", pa.string()),
    ("manufacturer", pa.string()),
    ("model", pa.string()),
    ("kernel", pa.string()),
    ("body_part", pa.string()),
    ("study_ym", pa.string()),
    ("series_number", pa.int32()),
    ("rows", pa.int32()),
    ("cols", pa.int32()),
    ("ps_row", pa.float64()),
    ("ps_col", pa.float64()),
    ("thickness", pa.float64()),
    ("kvp", pa.float64()),
    ("exposure", pa.float64()),
    ("iop_key", pa.string()),
    ("orientation", pa.string()),
    ("pos_n", pa.float64()),  # ImagePositionPatient projected on the slice normal (mm)
    ("n_frames", pa.int32()),
    ("frame_pos", pa.list_(pa.float64())),  # per-frame pos_n of multi-frame images
    ("frames_consistent", pa.bool_()),
])
_FILE_COLUMNS = ("relpath", "path_hash", "size", "mtime_ns", "reader", "reason", "detail")


def path_hash(relpath: str, _blake2b: Any = hashlib.blake2b,
              _from_bytes: Any = int.from_bytes) -> int:
    """64-bit hash of a relative path: the index's lookup key (collisions ~ n^2 / 2^65)."""
    digest = _blake2b(relpath.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return _from_bytes(digest, "little", signed=True)


def display_path(relpath: str) -> str:
    """A relative path as text; undecodable bytes of a file name become escapes."""
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _geometry(iop_text: str | None, cache: dict) -> tuple[str, tuple | None, str | None]:
    """(orientation class, unit normal, rounded IOP text), memoised per IOP string.

    All files of a series share one IOP string, so the cache turns a per-file parse
    into a dictionary lookup.
    """
    hit = cache.get(iop_text)
    if hit is None:
        iop = dicom.parse_floats(iop_text, 6)
        normal = dicom.slice_normal(iop) if iop else None
        key = "\\".join(f"{round(v, 3) + 0.0:.3f}" for v in iop) if iop else None
        hit = cache[iop_text] = (dicom.orientation_class(iop) if iop_text else None,
                                 normal, key)
    return hit


def _floats(texts: list[str | None], n: int = 1) -> np.ndarray:
    """(len, n) float array of backslash-separated numbers; NaN where absent or malformed.

    One numpy conversion for the whole chunk; only a chunk with a malformed value pays
    the per-value parse.
    """
    nan = "\\".join(["nan"] * n)
    try:
        if n == 1:
            out = np.array([t if t else "nan" for t in texts], dtype=np.float64)
        else:
            flat = [t if t and t.count("\\") == n - 1 else nan for t in texts]
            out = np.array("\\".join(flat).split("\\") if flat else [],
                           dtype=np.float64).reshape(-1, n)
    except ValueError:
        if n == 1:
            out = np.array([np.nan if (v := dicom.parse_float(t)) is None else v
                            for t in texts], dtype=np.float64)
        else:
            out = np.array([dicom.parse_floats(t, n) or (np.nan,) * n for t in texts],
                           dtype=np.float64).reshape(-1, n)
    out[~np.isfinite(out)] = np.nan
    return out if n > 1 else out.reshape(-1)


def _ints(texts: list[str | None], default: int | None = None) -> pa.Array:
    values = _floats(texts)
    missing = np.isnan(values)
    if default is not None:
        values[missing] = default
        missing[:] = False
    ints = np.where(missing, 0, np.clip(np.nan_to_num(values), -2**31, 2**31 - 1))
    return pa.array(ints.astype(np.int32), mask=missing)


def _study_ym(date: str | None) -> str | None:
    return f"{date[:4]}-{date[4:6]}" if date and len(date) >= 6 and date[:6].isdigit() \
        else None


def parse_files(root: str, items: Sequence[tuple[str, int, int]], secret: bytes,
                engine: str = "auto") -> pa.RecordBatch:
    """Read the headers of ``items`` (relpath, size, mtime_ns) into PHI-free index rows.

    Runs in a worker process (or on a Dask worker): identifiers are hashed here, so
    that no raw identifier leaves the worker. Values are converted column-wise for the
    whole chunk (numpy), which keeps the Python cost per file well below the scanner's.
    """
    paths = [os.path.join(root, rel) for rel, _, _ in items]
    headers = dicom.read_headers(paths, [size for _, size, _ in items], engine=engine)
    hasher = _Hasher(secret)
    vals = [h.values for h in headers]  # {} for rejected files: every column null

    def col(kw: str) -> list[str | None]:
        return [v.get(kw) for v in vals]

    sop, study, series, pid = (col(k) for k in ("SOPInstanceUID", "StudyInstanceUID",
                                                "SeriesInstanceUID", "PatientID"))
    series_key = [hasher("series", u, memo=True) if u else None for u in series]
    # No PatientID: each study is its own patient rather than all sharing one.
    patient_key = [
        (hasher("patient", p, memo=True) if p else hasher("patient-of-study", st, memo=True))
        if st else None for p, st in zip(pid, study, strict=True)]
    geometry_cache: dict = {}
    geo = [_geometry(t, geometry_cache) for t in col("ImageOrientationPatient")]
    normals = np.array([g[1] if g[1] else (np.nan,) * 3 for g in geo],
                       dtype=np.float64).reshape(-1, 3)
    pos_n = np.einsum("ij,ij->i", _floats(col("ImagePositionPatient"), 3), normals)
    ps = _floats(col("PixelSpacing"), 2)
    kernels: dict[str | None, str | None] = {}
    frame_pos = []
    for h, g in zip(headers, geo, strict=True):
        fp = None
        if h.frame_positions and g[1]:
            nx, ny, nz = g[1]
            fp = [x * nx + y * ny + z * nz for x, y, z in h.frame_positions]
        frame_pos.append(fp)
    arrays = {
        "relpath": [r if r.isascii() else display_path(r) for r, _, _ in items],
        "path_hash": [path_hash(r) for r, _, _ in items],
        "size": [s for _, s, _ in items],
        "mtime_ns": [m for _, _, m in items],
        "reader": [h.reader for h in headers],
        "reason": [h.reject for h in headers],
        "detail": [h.detail for h in headers],
        "sop_key": [hasher("sop", u) if u else None for u in sop],
        "patient_key": patient_key,
        "study_key": [hasher("study", u, memo=True) if u else None for u in study],
        "series_key": series_key,
        "bucket": pa.array([int(k[:4], 16) if k else None for k in series_key], pa.int32()),
        "institution": col("InstitutionName"),
        "sop_class": [v.get("SOPClassUID") or v.get("MediaStorageSOPClassUID") for v in vals],
        "transfer_syntax": col("TransferSyntaxUID"),
        "modality": col("Modality"),
        "image_type": col("ImageType"),
        "manufacturer": col("Manufacturer"),
        "model": col("ManufacturerModelName"),
        "kernel": [kernels[k] if k in kernels else
                   kernels.setdefault(k, dicom.normalise_kernel(k) or None)
                   for k in col("ConvolutionKernel")],
        "body_part": col("BodyPartExamined"),
        "study_ym": [_study_ym(d) for d in col("StudyDate")],
        "series_number": _ints(col("SeriesNumber")),
        "rows": _ints(col("Rows")),
        "cols": _ints(col("Columns")),
        "ps_row": pa.array(ps[:, 0], from_pandas=True),
        "ps_col": pa.array(ps[:, 1], from_pandas=True),
        "thickness": pa.array(_floats(col("SliceThickness")), from_pandas=True),
        "kvp": pa.array(_floats(col("KVP")), from_pandas=True),
        "exposure": pa.array(_floats(col("Exposure")), from_pandas=True),
        "iop_key": [g[2] for g in geo],
        "orientation": [g[0] for g in geo],
        "pos_n": pa.array(pos_n, from_pandas=True),
        "n_frames": _ints(col("NumberOfFrames"), default=1),
        "frame_pos": pa.array(frame_pos, pa.list_(pa.float64())),
        "frames_consistent": [h.frames_consistent for h in headers],
    }
    ok = pa.array([h.reject is None for h in headers])
    columns = []
    for name, typ in zip(INDEX_SCHEMA.names, INDEX_SCHEMA.types, strict=True):
        arr = arrays[name]
        arr = arr if isinstance(arr, pa.Array) else pa.array(arr, typ)
        if name in ("n_frames", "frames_consistent"):  # defaults only mean something if ok
            arr = pc.if_else(ok, arr, pa.nulls(len(arr), typ))
        columns.append(arr.cast(typ) if arr.type != typ else arr)
    return pa.RecordBatch.from_arrays(columns, schema=INDEX_SCHEMA)


# ----------------------------------------------------------------------------------
# Walking the archive, and the incremental per-file index
# ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WalkError:
    """A directory the walk could not list (its files can be neither read nor rejected)."""

    relpath: str
    detail: str


def walk_archive(root: Path, exclude: Iterable[Path] = (),
                 errors: list[WalkError] | None = None) -> Iterator[tuple[str, int, int]]:
    """Yield (relpath, size, mtime_ns) of every regular file under ``root``, lazily.

    Depth-first with ``os.scandir``, entries sorted per directory (deterministic order,
    memory bounded by the largest directory). Symbolic links to directories are not
    followed (no cycles); ``exclude`` (e.g. an output folder inside the archive) is
    skipped.
    """
    root = Path(root)
    # Excluded folders by (device, inode): no realpath() per directory on the way.
    skip = set()
    for p in exclude:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            skip.add((st.st_dev, st.st_ino))
    root_dev = os.stat(root).st_dev
    stack = [""]
    while stack:
        rel = stack.pop()
        here = os.path.join(root, rel) if rel else str(root)
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if errors is not None:
                errors.append(WalkError(display_path(rel or "."),
                                        f"cannot list directory ({exc.strerror})"))
            continue
        subdirs = []
        for entry in entries:
            relpath = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not skip or (root_dev, entry.inode()) not in skip:
                        subdirs.append(relpath)
                elif entry.is_file():
                    st = entry.stat()
                    yield relpath, st.st_size, st.st_mtime_ns
            except OSError as exc:
                if errors is not None:
                    errors.append(WalkError(display_path(relpath),
                                            f"cannot stat ({exc.strerror})"))
        stack.extend(reversed(subdirs))


class FileIndex:
    """Per-file header rows of earlier scans, looked up by (path, size, mtime).

    Layout: ``manifest.json`` (version, key id, part files and their row counts) and
    immutable Parquet parts. A scan marks the rows of unchanged files as seen; new
    and changed files are parsed into new parts; ``commit`` drops the rows of changed
    and deleted files (rewriting only the parts that hold such rows) and writes the
    manifest last, so a crash leaves the previous index intact.

    The lookup arrays cost 17 bytes per indexed file (hash, size, mtime, seen flag):
    about 170 MB for ten million files.
    """

    MANIFEST = "manifest.json"
    LOCK = ".lock"

    def __init__(self, directory: Path, key_id: str, chunk_size: int = 2000) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        # One scan at a time per index: a second one would delete the first one's parts.
        self._lock = open(self.dir / self.LOCK, "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            raise RuntimeError(f"index {self.dir}: in use by another catalogue run") from exc
        self.key_id = key_id
        self.chunk_size = max(1, chunk_size)
        self.parts: dict[str, int] = {}
        manifest = self._read_manifest()
        if manifest and manifest.get("version") == INDEX_VERSION \
                and manifest.get("key_id") == key_id:
            self.parts = {k: int(v) for k, v in manifest.get("parts", {}).items()
                          if (self.dir / k).exists()}
        elif manifest:
            log.info("index %s: other version or key; rebuilding", self.dir)
        for stray in self.dir.glob("part-*"):
            if stray.name not in self.parts:
                stray.unlink()
        self._load_lookup()
        self._new_parts: dict[str, int] = {}
        self._writer: pq.ParquetWriter | None = None
        self._writer_name = ""
        self._writer_rows = 0
        self._buffer: list[pa.RecordBatch] = []
        self._buffer_rows = 0

    def close(self) -> None:
        """Release the index (aborts an uncommitted part)."""
        if self._writer is not None:
            self._writer.close()
            (self.dir / (self._writer_name + ".tmp")).unlink(missing_ok=True)
            self._writer = None
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> FileIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_manifest(self) -> dict | None:
        path = self.dir / self.MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _load_lookup(self) -> None:
        hashes, sizes, mtimes = [], [], []
        for name in self.parts:
            t = pq.read_table(self.dir / name, columns=["path_hash", "size", "mtime_ns"])
            hashes.append(t["path_hash"].to_numpy())
            sizes.append(t["size"].to_numpy())
            mtimes.append(t["mtime_ns"].to_numpy())
        h = np.concatenate(hashes) if hashes else np.empty(0, np.int64)
        order = np.argsort(h, kind="stable")
        self.hashes = h[order]
        self.sizes = (np.concatenate(sizes) if sizes else np.empty(0, np.int64))[order]
        self.mtimes = (np.concatenate(mtimes) if mtimes else np.empty(0, np.int64))[order]
        if len(self.hashes) and (np.diff(self.hashes) == 0).any():
            # Two rows for one path: only an interrupted bug could do this; start over.
            log.warning("index %s: duplicate paths; rebuilding", self.dir)
            for name in list(self.parts):
                (self.dir / name).unlink(missing_ok=True)
            self.parts = {}
            self.hashes = self.sizes = self.mtimes = np.empty(0, np.int64)
        self.seen = np.zeros(len(self.hashes), dtype=bool)

    @property
    def n_rows(self) -> int:
        return sum(self.parts.values())

    def changed(self, batch: Sequence[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        """The files of ``batch`` that are new or changed; marks the others as seen."""
        if not len(self.hashes) or not batch:
            return list(batch)
        h = np.array([path_hash(rel) for rel, _, _ in batch], np.int64)
        size = np.array([s for _, s, _ in batch], np.int64)
        mtime = np.array([m for _, _, m in batch], np.int64)
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        same = (self.hashes[pos] == h) & (self.sizes[pos] == size) & (self.mtimes[pos] == mtime)
        self.seen[pos[same]] = True
        return [item for item, ok in zip(batch, same, strict=True) if not ok]

    def write(self, batch: pa.RecordBatch) -> None:
        """Append parsed rows (row groups of ``chunk_size`` rows)."""
        self._buffer.append(batch)
        self._buffer_rows += batch.num_rows
        if self._buffer_rows >= self.chunk_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer_rows:
            return
        table = pa.Table.from_batches(self._buffer, schema=INDEX_SCHEMA)
        self._buffer, self._buffer_rows = [], 0
        if self._writer is None:
            self._writer_name = f"part-{uuid.uuid4().hex[:16]}.parquet"
            self._writer = pq.ParquetWriter(self.dir / (self._writer_name + ".tmp"),
                                            INDEX_SCHEMA)
            self._writer_rows = 0
        self._writer.write_table(table, row_group_size=self.chunk_size)
        self._writer_rows += table.num_rows
        if self._writer_rows >= PART_ROWS:
            self._close_part()

    def _close_part(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        os.replace(self.dir / (self._writer_name + ".tmp"), self.dir / self._writer_name)
        self._new_parts[self._writer_name] = self._writer_rows
        self._writer = None

    def commit(self) -> int:
        """Drop rows of changed/deleted files, add the new parts; returns rows dropped."""
        self._flush()
        self._close_part()
        parts: dict[str, int] = {}
        obsolete: list[str] = []
        dropped = 0
        for name, n in self.parts.items():
            h = pq.read_table(self.dir / name, columns=["path_hash"])["path_hash"].to_numpy()
            pos = np.minimum(np.searchsorted(self.hashes, h), max(len(self.hashes) - 1, 0))
            keep = self.seen[pos] & (self.hashes[pos] == h) if len(self.hashes) else \
                np.zeros(len(h), bool)
            if keep.all():
                parts[name] = n
                continue
            obsolete.append(name)
            dropped += int((~keep).sum())
            if keep.any():
                table = pq.read_table(self.dir / name).filter(pa.array(keep))
                new = f"part-{uuid.uuid4().hex[:16]}.parquet"
                pq.write_table(table, self.dir / (new + ".tmp"), row_group_size=self.chunk_size)
                os.replace(self.dir / (new + ".tmp"), self.dir / new)
                parts[new] = table.num_rows
        parts.update(self._new_parts)
        if len(parts) > MAX_PARTS:
            parts, merged = self._compact(parts)
            obsolete.extend(merged)
        self._write_manifest(parts)
        for name in obsolete:
            (self.dir / name).unlink(missing_ok=True)
        self.parts, self._new_parts = parts, {}
        return dropped

    def _compact(self, parts: dict[str, int]) -> tuple[dict[str, int], list[str]]:
        """Merge the small parts into one, streaming row group by row group."""
        small = [k for k, n in parts.items() if n < PART_ROWS // 2]
        if len(small) < 2:
            return parts, []
        new = f"part-{uuid.uuid4().hex[:16]}.parquet"
        rows = 0
        with pq.ParquetWriter(self.dir / (new + ".tmp"), INDEX_SCHEMA) as writer:
            for name in small:
                for batch in pq.ParquetFile(self.dir / name).iter_batches(self.chunk_size):
                    writer.write_batch(batch, row_group_size=self.chunk_size)
                    rows += batch.num_rows
        os.replace(self.dir / (new + ".tmp"), self.dir / new)
        out = {k: n for k, n in parts.items() if k not in small}
        out[new] = rows
        return out, small

    def _write_manifest(self, parts: dict[str, int]) -> None:
        body = {"version": INDEX_VERSION, "key_id": self.key_id,
                "parts": dict(sorted(parts.items()))}
        tmp = self.dir / (self.MANIFEST + ".tmp")
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, self.dir / self.MANIFEST)

    def batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream the committed rows, row group by row group."""
        for name in sorted(self.parts):
            yield from pq.ParquetFile(self.dir / name).iter_batches(
                self.chunk_size, columns=list(columns) if columns else None)

    def fingerprint(self) -> str:
        """Changes whenever the committed rows change (part names are never reused)."""
        return hashlib.sha256(json.dumps(sorted(self.parts.items())).encode()).hexdigest()


# ----------------------------------------------------------------------------------
# Scanning: local process pool or Dask
# ----------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------
# Series: site, de-duplication, geometry, usability (pure functions over tables)
# ----------------------------------------------------------------------------------

def load_site_mapping(path: str | Path) -> dict[str, str]:
    """CSV ``key,site``: an InstitutionName or a folder name -> site label."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"site mapping {path}: cannot read ({exc})") from exc
    if not {"key", "site"} <= set(df.columns):
        raise ValueError(f"site mapping {path}: needs columns key,site; has {list(df.columns)}")
    return {k.strip(): s.strip() for k, s in zip(df["key"], df["site"], strict=True)
            if k.strip()}


def site_of(files: pd.DataFrame, rule: str, level: int = 0,
            mapping: dict[str, str] | None = None) -> pd.Series:
    """Site label of each file row (columns ``relpath``, ``institution``).

    ``folder``: the folder ``level`` levels below the archive root; ``institution``:
    InstitutionName; ``mapping``: InstitutionName, else that folder, looked up in
    ``mapping``. Files without one get UNKNOWN_SITE.
    """
    rel = files["relpath"].astype(str)
    depth_ok = rel.str.count("/") > level
    folder = rel.str.split("/", n=level + 1).str[level].where(depth_ok)
    institution = files["institution"].astype("string").str.strip()
    if rule == "folder":
        site = folder
    elif rule == "institution":
        site = institution.where(institution != "")
    elif rule == "mapping":
        if mapping is None:
            raise ValueError("site_rule 'mapping' needs catalogue.site_mapping (a CSV key,site)")
        site = institution.map(mapping)
        site = site.where(site.notna(), folder.map(mapping))
    else:
        raise ValueError(f"unknown site_rule {rule!r}: folder, institution or mapping")
    return site.fillna(UNKNOWN_SITE).astype(str)


def thickness_class(thickness: pd.Series) -> pd.Series:
    """thin / medium / thick / unknown from slice thickness (mm)."""
    out = pd.Series("unknown", index=thickness.index, dtype=object)
    t = pd.to_numeric(thickness, errors="coerce")
    for bound, name in reversed(THICKNESS_CLASSES):
        out[t <= bound] = name
    return out.astype(str)


SERIES_COLUMNS = (
    "series_key", "study_key", "patient_key", "site", "vendor", "manufacturer", "model",
    "kernel", "kernel_class", "series_number", "study_ym", "body_part", "modality",
    "sop_class", "transfer_syntax", "compressed", "image_type", "image_type_raw",
    "orientation", "n_files", "n_slices", "n_duplicates", "rows", "cols",
    "pixel_spacing_row", "pixel_spacing_col", "slice_thickness", "thickness_class",
    "slice_spacing", "spacing_regular", "z_extent", "kvp", "exposure", "usable", "reason",
    "key_id",
)
_AGG_INPUT = ("relpath", "sop_key", "patient_key", "study_key", "series_key", "institution",
              "sop_class", "transfer_syntax", "modality", "image_type", "manufacturer",
              "model", "kernel", "body_part", "study_ym", "series_number", "rows", "cols",
              "ps_row", "ps_col", "thickness", "kvp", "exposure", "iop_key", "orientation",
              "pos_n", "n_frames", "frame_pos", "frames_consistent")


def aggregate_series(files: pd.DataFrame, min_slices: int = 32) -> tuple[pd.DataFrame,
                                                                       pd.DataFrame]:
    """One row per series from catalogued file rows (index columns + ``site``).

    Duplicated SOP instances count once: the copy with the first path is kept, the
    others come back as rejects (``path``, ``reason``, ``detail``). Bounded by the
    rows given (one bucket of series), vectorised.
    """
    if files.empty:
        return _empty_series(), _empty_rejects()
    files = files.sort_values(["sop_key", "relpath"], kind="stable")
    dup = files.duplicated("sop_key", keep="first").to_numpy()
    kept = files.loc[~dup]
    dups = files.loc[dup]
    first_path = kept.set_index("sop_key")["relpath"]
    duplicates = pd.DataFrame({
        "path": dups["relpath"].astype(str).to_numpy(),
        "reason": dicom.DUPLICATE,
        "detail": ("same SOP instance as " + dups["sop_key"].map(first_path).astype(str)
                   ).to_numpy(),
    })
    n_dup = dups.groupby("series_key").size()

    # Slice positions: one per single-frame file, one per frame of multi-frame files.
    single = kept.loc[kept["frame_pos"].isna(), ["series_key", "pos_n"]]
    multi = kept.loc[kept["frame_pos"].notna(), ["series_key", "frame_pos"]]
    multi = multi.explode("frame_pos").rename(columns={"frame_pos": "pos_n"})
    slices = pd.concat([single, multi], ignore_index=True)
    slices["pos_n"] = pd.to_numeric(slices["pos_n"], errors="coerce").round(3)
    slices = slices.sort_values(["series_key", "pos_n"], kind="stable")
    gap = slices.groupby("series_key", sort=False)["pos_n"].diff()
    slices["missing"] = slices["pos_n"].isna()
    slices["dup_pos"] = gap == 0
    slices["gap"] = gap.where(gap > 0)
    pos = slices.groupby("series_key").agg(
        n_missing_pos=("missing", "sum"), n_dup_pos=("dup_pos", "sum"),
        spacing=("gap", "median"), spacing_min=("gap", "min"), spacing_max=("gap", "max"),
        z_min=("pos_n", "min"), z_max=("pos_n", "max"))

    k = kept.assign(
        is_compressed=~kept["transfer_syntax"].isin(list(dicom.NATIVE_TRANSFER_SYNTAXES)),
        frames_ok=kept["frames_consistent"].fillna(True).astype(bool),
    )
    g = k.groupby("series_key", sort=True)
    s = g.agg(
        study_key=("study_key", "first"), patient_key=("patient_key", "first"),
        site=("site", "first"), manufacturer=("manufacturer", "first"),
        model=("model", "first"), kernel=("kernel", "first"),
        series_number=("series_number", "first"), study_ym=("study_ym", "min"),
        body_part=("body_part", "first"), modality=("modality", "first"),
        sop_class=("sop_class", "first"), transfer_syntax=("transfer_syntax", "first"),
        compressed=("is_compressed", "any"), image_type_raw=("image_type", "first"),
        orientation=("orientation", "first"),
        n_files=("relpath", "size"), n_slices=("n_frames", "sum"),
        rows=("rows", "first"), cols=("cols", "first"),
        pixel_spacing_row=("ps_row", "first"), pixel_spacing_col=("ps_col", "first"),
        slice_thickness=("thickness", "median"), kvp=("kvp", "median"),
        exposure=("exposure", "median"),
        u_rows=("rows", "nunique"), u_cols=("cols", "nunique"),
        u_ps_row=("ps_row", "nunique"), u_ps_col=("ps_col", "nunique"),
        u_iop=("iop_key", "nunique"), c_iop=("iop_key", "count"),
        c_ps=("ps_row", "count"), frames_ok=("frames_ok", "all"),
    )
    s = s.join(pos, how="left")
    s["n_duplicates"] = n_dup.reindex(s.index).fillna(0).astype(int)
    s = s.reset_index()
    s["vendor"] = [dicom.vendor(m if isinstance(m, str) else None) for m in s["manufacturer"]]
    s["kernel_class"] = [dicom.kernel_class(v, kn if isinstance(kn, str) else None)
                         for v, kn in zip(s["vendor"], s["kernel"], strict=True)]
    s["image_type"] = s["image_type_raw"].map(
        lambda t: dicom.image_type_class(t if isinstance(t, str) else None))
    s["orientation"] = s["orientation"].fillna("unknown")
    s["thickness_class"] = thickness_class(s["slice_thickness"])
    s["slice_spacing"] = s["spacing"]
    s["z_extent"] = s["z_max"] - s["z_min"]
    tol = np.maximum(SPACING_TOL_MM, SPACING_TOL_REL * s["spacing"].fillna(0))
    s["spacing_regular"] = (
        ((s["spacing_max"] - s["spacing_min"]).fillna(0) <= tol) & (s["n_dup_pos"] == 0)
    )
    s["usable"], s["reason"] = usability(s, min_slices)
    return s, duplicates


def usability(s: pd.DataFrame, min_slices: int) -> tuple[pd.Series, pd.Series]:
    """``usable`` and ``reason`` (every failed criterion, most telling first, "; ").

    Usable = CT, axial, one consistent geometry (same matrix, pixel spacing and
    orientation, regularly spaced positions), not a localizer or reformat, and at
    least ``min_slices`` slices (frames of multi-frame images count).
    """
    reasons: list[str] = []
    cols = zip(s["modality"], s["image_type"], s["orientation"], s["n_files"], s["c_iop"],
               s["c_ps"], s["n_missing_pos"], s["u_rows"], s["u_cols"], s["u_ps_row"],
               s["u_ps_col"], s["u_iop"], s["frames_ok"], s["n_dup_pos"],
               s["spacing_regular"], s["spacing_min"], s["spacing_max"], s["n_slices"],
               strict=True)
    for (modality, itype, orient, n_files, c_iop, c_ps, n_missing, u_rows, u_cols,
         u_psr, u_psc, u_iop, frames_ok, n_dup_pos, regular, sp_min, sp_max,
         n_slices) in cols:
        r: list[str] = []
        if str(modality).upper() != "CT":
            r.append(f"not CT ({modality})")
        if itype == "localizer":
            r.append("localizer")
        if orient != "axial":
            r.append(orient if orient != "unknown" else "unknown orientation")
        if itype == "reformat":
            r.append("derived reformat")
        missing = [name for name, bad in (("ImageOrientationPatient", c_iop < n_files),
                                          ("ImagePositionPatient", n_missing > 0),
                                          ("PixelSpacing", c_ps < n_files)) if bad]
        if missing:
            r.append("no geometry (missing " + ", ".join(missing) + ")")
        else:
            what = [name for name, bad in (("matrix", u_rows > 1 or u_cols > 1),
                                           ("pixel spacing", u_psr > 1 or u_psc > 1),
                                           ("orientation", u_iop > 1 or not frames_ok))
                    if bad]
            if what:
                r.append("inconsistent geometry (" + ", ".join(what) + " differ)")
            elif n_dup_pos > 0:
                r.append(f"inconsistent geometry ({int(n_dup_pos)} duplicate slice positions)")
            elif not regular:
                r.append(f"irregular slice spacing ({sp_min:.2f}-{sp_max:.2f} mm)")
        if n_slices < min_slices:
            r.append(f"too few slices ({int(n_slices)} < {min_slices})")
        reasons.append("; ".join(r))
    reason = pd.Series(reasons, index=s.index, dtype=object).astype(str)
    return reason == "", reason


def _empty_series() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in SERIES_COLUMNS}).astype(
        {"usable": bool, "n_slices": "int64", "n_files": "int64", "n_duplicates": "int64"})


def _empty_rejects() -> pd.DataFrame:
    return pd.DataFrame({"path": pd.Series(dtype=str), "reason": pd.Series(dtype=str),
                         "detail": pd.Series(dtype=str)})


def _series_buckets(index: FileIndex, tmp: Path) -> Iterator[pd.DataFrame]:
    """Catalogued file rows, grouped so that each series lies in exactly one bucket.

    With few rows this is one table. Beyond BUCKET_ROWS the rows are shuffled to
    bucket files by the series hash first, so that no pass holds more than about
    BUCKET_ROWS rows.
    """
    n_buckets = max(1, math.ceil(index.n_rows / BUCKET_ROWS))
    columns = list(_AGG_INPUT) + ["bucket", "reason"]

    def catalogued(batch: pa.RecordBatch) -> pa.Table:
        table = pa.Table.from_batches([batch])
        return table.filter(pc.is_null(table["reason"]))

    if n_buckets == 1:
        tables = [catalogued(b) for b in index.batches(columns)]
        tables = [t for t in tables if t.num_rows]
        if tables:
            yield pa.concat_tables(tables).to_pandas()
        return
    tmp.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for batch in index.batches(columns):
            table = catalogued(batch)
            if not table.num_rows:
                continue
            which = table["bucket"].to_numpy() % n_buckets
            for b in np.unique(which):
                part = table.filter(pa.array(which == b))
                if b not in writers:
                    writers[b] = pq.ParquetWriter(tmp / f"bucket-{b}.parquet", part.schema)
                writers[b].write_table(part)
    finally:
        for w in writers.values():
            w.close()
    for b in sorted(writers):
        path = tmp / f"bucket-{b}.parquet"
        yield pq.read_table(path).to_pandas()
        path.unlink()


def build_catalogue(index: FileIndex, params: CatalogueParams, key_id: str,
                    mapping: dict[str, str] | None, tmp: Path
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(series table, rejects table) from the committed index."""
    series_parts: list[pd.DataFrame] = []
    rejects: list[pd.DataFrame] = []
    for files in _series_buckets(index, tmp):
        files["site"] = site_of(files, params.site_rule, params.site_level, mapping)
        series, dups = aggregate_series(files, params.min_slices)
        series_parts.append(series)
        rejects.append(dups)
    reject_tables = []
    for batch in index.batches(["relpath", "reason", "detail"]):
        table = pa.Table.from_batches([batch])
        table = table.filter(pc.is_valid(table["reason"]))
        if table.num_rows:
            reject_tables.append(table)
    if reject_tables:
        rejects.append(pa.concat_tables(reject_tables).rename_columns(
            ["path", "reason", "detail"]).to_pandas())
    series = pd.concat(series_parts, ignore_index=True) if series_parts else _empty_series()
    series["key_id"] = key_id
    series = series[list(SERIES_COLUMNS)]
    series = series.sort_values(["site", "study_key", "series_number", "series_key"],
                                kind="stable", na_position="last").reset_index(drop=True)
    rej = pd.concat(rejects, ignore_index=True) if rejects else _empty_rejects()
    rej = rej.sort_values(["path", "reason"], kind="stable").reset_index(drop=True)
    return series, rej


# ----------------------------------------------------------------------------------
# Reports (pure functions of the series table)
# ----------------------------------------------------------------------------------

def _site_order(sites: Iterable[str]) -> list[str]:
    return sorted(set(sites), key=lambda s: (s == UNKNOWN_SITE, s))


def _vendor_order(vendors: Iterable[str]) -> list[str]:
    vs = set(vendors)
    return [v for v in STUDY_VENDORS if v in vs] + sorted(vs - set(STUDY_VENDORS))


def exam_counts(series: pd.DataFrame) -> pd.DataFrame:
    """Exams (distinct studies) per vendor x site, with totals: the source study's layout.

    Totals count distinct studies, so a study with two vendors counts once in them.
    """
    if series.empty:
        return pd.DataFrame({"total": pd.Series(dtype=int)}, index=pd.Index([], name="vendor"))
    t = series.groupby(["vendor", "site"])["study_key"].nunique().unstack(fill_value=0)
    t = t.reindex(index=_vendor_order(t.index), columns=_site_order(t.columns), fill_value=0)
    t["total"] = series.groupby("vendor")["study_key"].nunique().reindex(t.index)
    total = series.groupby("site")["study_key"].nunique().reindex(t.columns[:-1])
    t.loc["total"] = [*total.tolist(), series["study_key"].nunique()]
    t.index.name = "vendor"
    t.columns.name = None
    return t.astype(int)


def combo_counts(series: pd.DataFrame) -> pd.DataFrame:
    """Series per vendor+model+kernel (rows) x site, with totals and usable counts."""
    keys = ["vendor", "model", "kernel", "kernel_class"]
    if series.empty:
        return pd.DataFrame(columns=[*keys, "total", "usable"])
    data = series.assign(**{k: series[k].fillna("").astype(str) for k in keys})
    t = data.groupby([*keys, "site"]).size().unstack(fill_value=0)
    t = t.reindex(columns=_site_order(t.columns), fill_value=0)
    t["total"] = t.sum(axis=1)
    t["usable"] = data[data["usable"]].groupby(keys).size().reindex(t.index).fillna(0)
    t = t.astype(int).reset_index().sort_values(["total", *keys], ascending=[False] + [True] * 4)
    t.columns.name = None
    return t.reset_index(drop=True)


def usable_by_site(series: pd.DataFrame) -> pd.DataFrame:
    """Per site: studies, series, usable series and the usable fraction."""
    if series.empty:
        return pd.DataFrame(columns=["site", "n_studies", "n_series", "n_usable",
                                     "usable_fraction", "n_studies_with_usable"])
    g = series.groupby("site")
    out = pd.DataFrame({
        "n_studies": g["study_key"].nunique(),
        "n_series": g.size(),
        "n_usable": g["usable"].sum().astype(int),
        "n_studies_with_usable": series[series["usable"]].groupby("site")["study_key"]
        .nunique(),
    }).fillna(0).astype(int)
    out["usable_fraction"] = (out["n_usable"] / out["n_series"]).round(4)
    out = out.reindex(_site_order(out.index))
    out.index.name = "site"
    return out.reset_index()[["site", "n_studies", "n_series", "n_usable", "usable_fraction",
                              "n_studies_with_usable"]]


def unusable_reasons(series: pd.DataFrame) -> pd.DataFrame:
    """Series per first (most telling) unusable reason x site."""
    bad = series[~series["usable"].astype(bool)] if not series.empty else series
    if bad.empty:
        return pd.DataFrame(columns=["reason", "total"])
    first = bad["reason"].str.split("; ").str[0].str.replace(r" \(.*\)$", "", regex=True)
    t = pd.crosstab(first, bad["site"])
    t = t.reindex(columns=_site_order(t.columns), fill_value=0)
    t["total"] = t.sum(axis=1)
    t.index.name = "reason"
    t.columns.name = None
    return t.sort_values("total", ascending=False).reset_index()


def condition_table(series: pd.DataFrame, columns: Sequence[str] = CONDITION,
                    usable_only: bool = True) -> pd.DataFrame:
    """Contingency table site (rows) x acquisition condition (columns), in series.

    Counts usable series (the data a model will see) when there are any, else all.
    A condition label joins ``columns`` with " | ".
    """
    data = series
    if usable_only and not series.empty and series["usable"].any():
        data = series[series["usable"].astype(bool)]
    if data.empty:
        return pd.DataFrame()
    label = data[columns[0]].fillna("").astype(str)
    for c in columns[1:]:
        label = label + " | " + data[c].fillna("").astype(str)
    t = pd.crosstab(data["site"], label)
    t = t.reindex(index=_site_order(t.index))
    t.index.name, t.columns.name = "site", "condition"
    return t


def adjusted_residuals(table: pd.DataFrame) -> pd.DataFrame:
    """Haberman's adjusted standardised residuals of a contingency table.

    (O - E) / sqrt(E (1 - row share) (1 - column share)): approximately N(0, 1) under
    independence of site and condition, so > 3 flags a combination markedly
    concentrated at that site whatever the table's size.
    """
    o = table.to_numpy(dtype=float)
    n = o.sum()
    if n == 0:
        return table.astype(float) * 0
    r = o.sum(axis=1, keepdims=True)
    c = o.sum(axis=0, keepdims=True)
    e = r @ c / n
    var = e * (1 - r / n) * (1 - c / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        res = np.where(var > 0, (o - e) / np.sqrt(var), 0.0)
    return pd.DataFrame(res, index=table.index, columns=table.columns)


def pmi(table: pd.DataFrame, normalised: bool = False) -> pd.DataFrame:
    """Pointwise mutual information log2 p(site, cond) / (p(site) p(cond)); NaN where 0.

    ``normalised``: divide by -log2 p(site, cond) (NPMI in [-1, 1]; 1 = the condition
    occurs only at that site and the site has only that condition).
    """
    o = table.to_numpy(dtype=float)
    n = o.sum()
    r = o.sum(axis=1, keepdims=True)
    c = o.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = o / n
        out = np.where(o > 0, np.log2(p / ((r / n) * (c / n))), np.nan)
        if normalised:
            out = np.where(o > 0, np.where(p < 1, out / -np.log2(p), 1.0), np.nan)
    return pd.DataFrame(out, index=table.index, columns=table.columns)


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two count/probability vectors."""
    p = np.asarray(p, dtype=float)
    q = np.asarray(q, dtype=float)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def shift_combos(table: pd.DataFrame) -> pd.DataFrame:
    """(site, condition) cells ranked by how site-specific the condition is.

    Ranked by adjusted residual (evidence that the condition concentrates at the site),
    with PMI/NPMI (how strongly) and the share of the condition's series at that site.
    """
    cols = ["rank", "site", "condition", "n_site", "n_condition", "share_at_site",
            "site_share", "pmi", "npmi", "residual"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    res = adjusted_residuals(table)
    p = pmi(table)
    npmi = pmi(table, normalised=True)
    o = table.to_numpy(dtype=float)
    n = o.sum()
    rows = []
    for i, site in enumerate(table.index):
        for j, cond in enumerate(table.columns):
            if o[i, j] <= 0:
                continue
            rows.append({
                "site": site, "condition": cond, "n_site": int(o[i, j]),
                "n_condition": int(o[:, j].sum()),
                "share_at_site": o[i, j] / o[:, j].sum(), "site_share": o[i].sum() / n,
                "pmi": p.iat[i, j], "npmi": npmi.iat[i, j], "residual": res.iat[i, j],
            })
    out = pd.DataFrame(rows).sort_values(["residual", "npmi", "site", "condition"],
                                         ascending=[False, False, True, True])
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out.round(4).reset_index(drop=True)[cols]


def shift_sites(table: pd.DataFrame) -> pd.DataFrame:
    """Sites ranked by the JSD between their condition mix and that of all other sites."""
    cols = ["rank", "site", "n_series", "jsd", "top_condition", "top_residual"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    o = table.to_numpy(dtype=float)
    res = adjusted_residuals(table)
    rows = []
    for i, site in enumerate(table.index):
        rest = o.sum(axis=0) - o[i]
        j = int(np.argmax(res.iloc[i].to_numpy()))
        rows.append({"site": site, "n_series": int(o[i].sum()),
                     "jsd": jensen_shannon(o[i], rest),
                     "top_condition": table.columns[j], "top_residual": res.iat[i, j]})
    out = pd.DataFrame(rows).sort_values(["jsd", "site"], ascending=[False, True],
                                         na_position="last")
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out.round(4).reset_index(drop=True)[cols]


def plot_shift_heatmap(table: pd.DataFrame, path: Path, top: int = HEATMAP_ROWS) -> Path:
    """Heatmap of adjusted residuals (site x the ``top`` most site-specific conditions).

    Red: more series of the condition at the site than independence predicts; the
    number in each cell is the series count.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    label_width = max((len(str(c)) for c in table.columns), default=10) * 0.07
    fig = Figure(figsize=(2.5 + label_width + 0.6 * max(len(table.index), 1),
                          1.5 + 0.35 * min(top, max(len(table.columns), 1))),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if table.empty:
        ax.text(0.5, 0.5, "no series", ha="center", va="center")
        ax.axis("off")
    else:
        res = adjusted_residuals(table)
        order = res.max(axis=0).sort_values(ascending=False).index[:top]
        r = res[order].T
        counts = table[order].T
        lim = max(float(np.abs(r.to_numpy()).max()), 1e-6)
        im = ax.imshow(r.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(r.columns)), [str(c) for c in r.columns])
        ax.set_yticks(range(len(r.index)), [str(c) for c in r.index], fontsize=7)
        for (yi, xi), v in np.ndenumerate(counts.to_numpy()):
            if v:
                ax.text(xi, yi, str(int(v)), ha="center", va="center", fontsize=6)
        ax.set_xlabel("site")
        ax.set_title("Site-specific acquisition conditions (adjusted residuals; n series)",
                     fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------------
# Stage entry point
# ----------------------------------------------------------------------------------

REPORT_FILES = ("exam_counts.csv", "combos.csv", "usable_by_site.csv", "unusable_reasons.csv",
                "reject_reasons.csv", "shift_combos.csv", "shift_sites.csv",
                "shift_heatmap.png", "metrics.json")


@dataclass
class CatalogueResult:
    """Where the outputs are, the deterministic metrics, and what the scan did."""

    out_dir: Path
    metrics: dict[str, Any]
    scan: ScanStats
    up_to_date: bool = False

    def __str__(self) -> str:
        m, scan = self.metrics, self.scan
        state = "up to date" if self.up_to_date else f"read {scan.n_parsed} changed files"
        return (f"catalogued {m['n_files']} files ({state}, {scan.seconds:.1f} s): "
                f"{m['n_series']} series, {m['n_usable']} usable, {m['n_rejects']} files "
                f"rejected; top shift site {m['top_shift_site']} -> {self.out_dir}")

    @property
    def series_path(self) -> Path:
        return self.out_dir / "series.parquet"

    @property
    def rejects_path(self) -> Path:
        return self.out_dir / "rejects.parquet"


def _write_parquet(df: pd.DataFrame, path: Path, metadata: dict[str, str]) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           **{k.encode(): v.encode() for k, v in
                                              metadata.items()}})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_csv(df: pd.DataFrame, path: Path, index: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=index, float_format="%.6g")
    os.replace(tmp, path)


def write_reports(series: pd.DataFrame, rejects: pd.DataFrame, out: Path) -> dict[str, Any]:
    """Write the report files; returns the shift rankings' headline for metrics."""
    _write_csv(exam_counts(series), out / "exam_counts.csv", index=True)
    _write_csv(combo_counts(series), out / "combos.csv")
    _write_csv(usable_by_site(series), out / "usable_by_site.csv")
    _write_csv(unusable_reasons(series), out / "unusable_reasons.csv")
    reasons = (rejects.groupby("reason").size().rename("n_files").reset_index()
               if not rejects.empty else pd.DataFrame(columns=["reason", "n_files"]))
    _write_csv(reasons, out / "reject_reasons.csv")
    table = condition_table(series)
    combos = shift_combos(table)
    sites = shift_sites(table)
    _write_csv(combos, out / "shift_combos.csv")
    _write_csv(sites, out / "shift_sites.csv")
    plot_shift_heatmap(table, out / "shift_heatmap.png")
    head: dict[str, Any] = {"top_shift_site": None, "top_shift_site_jsd": None,
                            "top_shift_combo": None, "top_shift_combo_site": None,
                            "top_shift_combo_residual": None}
    if not sites.empty:
        head["top_shift_site"] = str(sites.iloc[0]["site"])
        head["top_shift_site_jsd"] = _num(sites.iloc[0]["jsd"])
        head["shift_site_ranking"] = [str(s) for s in sites["site"]]
    if not combos.empty:
        head["top_shift_combo"] = str(combos.iloc[0]["condition"])
        head["top_shift_combo_site"] = str(combos.iloc[0]["site"])
        head["top_shift_combo_residual"] = _num(combos.iloc[0]["residual"])
    return head


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fingerprint(params: CatalogueParams, key: PseudonymKey, index: FileIndex,
                 archive: Path, out: Path, n_errors: int) -> str:
    # The code is part of the state: a fixed aggregation must rebuild the outputs.
    code = hashlib.sha256(Path(__file__).read_bytes() + Path(dicom.__file__).read_bytes())
    state = {"params": to_dict(params), "key_id": key.key_id, "index": index.fingerprint(),
             "archive": str(archive), "out": str(out.resolve()), "errors": n_errors,
             "version": INDEX_VERSION, "outputs": list(REPORT_FILES),
             "code": code.hexdigest()}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def run(params: CatalogueParams, archive_dir: str | Path, out_dir: str | Path, *,
        index_dir: str | Path | None = None, track: bool = True,
        progress: bool = True) -> CatalogueResult:
    """Catalogue ``archive_dir`` into ``out_dir`` (see the module docstring).

    Args:
        params: the ``catalogue`` section of params.yaml.
        archive_dir: root of the DICOM archive (read only).
        out_dir: where series.parquet, rejects.parquet and the reports go.
        index_dir: the per-file index for incremental rescans [default: OUT_DIR/index].
            Keep it outside a DVC-managed output if DVC should not delete it.
        track: log the run to MLflow through ``fedct.tracking``.
        progress: show a tqdm progress bar.
    """
    archive = Path(archive_dir).resolve()
    if not archive.is_dir():
        raise FileNotFoundError(f"archive {archive}: not a directory")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index_path = Path(index_dir) if index_dir is not None else out / INDEX_DIRNAME
    key = load_key(params)
    mapping = None
    if params.site_rule == "mapping":
        if not params.site_mapping:
            raise ValueError("catalogue.site_rule is 'mapping' but catalogue.site_mapping "
                             "(a CSV with columns key,site) is not set")
        mapping = load_site_mapping(params.site_mapping)

    tracker: contextlib.AbstractContextManager[Any] = contextlib.nullcontext(None)
    if track:
        from fedct import tracking

        tracker = tracking.start_run("catalogue", tags={"fedct.key_id": key.key_id})
    with tracker as mlrun:
        if mlrun is not None:
            mlrun.log_params({**to_dict(params), "demo_key_used": key.demo})
        with FileIndex(index_path, key.key_id, params.chunk_size) as index:
            stats = scan(archive, index, key, workers=params.workers,
                         scheduler=params.scheduler, exclude=[out, index_path],
                         progress=progress)
            state_file = index_path / "outputs.json"
            fingerprint = _fingerprint(params, key, index, archive, out, len(stats.errors))
            up_to_date = (
                stats.n_parsed == 0 and stats.n_dropped == 0 and state_file.exists()
                and json.loads(state_file.read_text()).get("fingerprint") == fingerprint
                and all((out / f).exists() for f in ("series.parquet", "rejects.parquet",
                                                     *REPORT_FILES))
            )
            if up_to_date:
                metrics = json.loads((out / "metrics.json").read_text())
            else:
                t_agg = time.perf_counter()
                metrics = _build_outputs(index, params, key, mapping, stats, out, index_path)
                stats.seconds += time.perf_counter() - t_agg
                state_file.write_text(json.dumps({"fingerprint": fingerprint}))
        if mlrun is not None:
            mlrun.log_metrics({k: v for k, v in metrics.items()
                               if isinstance(v, int | float) and not isinstance(v, bool)})
            mlrun.log_metrics({"n_parsed": stats.n_parsed, "scan_seconds": stats.seconds,
                               "files_per_second": stats.n_parsed / max(stats.seconds, 1e-9)})
            # rejects.parquet and the index hold archive paths: they stay at the site.
            for name in REPORT_FILES:
                mlrun.log_artifact(out / name)
    return CatalogueResult(out, metrics, stats, up_to_date)


def _build_outputs(index: FileIndex, params: CatalogueParams, key: PseudonymKey,
                   mapping: dict[str, str] | None, stats: ScanStats, out: Path,
                   index_path: Path) -> dict[str, Any]:
    tmp = index_path / f"tmp-{uuid.uuid4().hex[:8]}"
    try:
        series, rejects = build_catalogue(index, params, key.key_id, mapping, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if stats.errors:
        walk = pd.DataFrame({"path": [e.relpath for e in stats.errors],
                             "reason": dicom.UNREADABLE,
                             "detail": [e.detail for e in stats.errors]})
        rejects = pd.concat([rejects, walk], ignore_index=True).sort_values(
            ["path", "reason"], kind="stable").reset_index(drop=True)
    meta = {"fedct.key_id": key.key_id, "fedct.demo_key": str(key.demo).lower()}
    _write_parquet(series, out / "series.parquet", meta)
    _write_parquet(rejects[["path", "reason", "detail"]], out / "rejects.parquet", meta)
    head = write_reports(series, rejects, out)
    n_usable = int(series["usable"].sum()) if not series.empty else 0
    metrics: dict[str, Any] = {
        "n_files": stats.n_files,
        "n_catalogued_files": int(series["n_files"].sum()) if not series.empty else 0,
        "n_rejects": len(rejects),
        "n_duplicates": int((rejects["reason"] == dicom.DUPLICATE).sum()),
        "n_series": len(series),
        "n_usable": n_usable,
        "usable_fraction": round(n_usable / len(series), 4) if len(series) else 0.0,
        "n_studies": int(series["study_key"].nunique()) if not series.empty else 0,
        "n_sites": int(series["site"].nunique()) if not series.empty else 0,
        "demo_key": key.demo,
        "key_id": key.key_id,
        **head,
    }
    tmp_metrics = out / "metrics.json.tmp"
    tmp_metrics.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    os.replace(tmp_metrics, out / "metrics.json")
    return metrics


__all__ = [
    "CatalogueResult", "FileIndex", "PseudonymKey", "PseudonymKeyError", "ScanStats",
    "adjusted_residuals", "aggregate_series", "build_catalogue", "combo_counts",
    "condition_table", "exam_counts", "jensen_shannon", "load_key", "load_site_mapping",
    "parse_files", "pmi", "pseudonym", "run", "scan", "shift_combos", "shift_sites",
    "site_of", "usability", "usable_by_site", "walk_archive", "write_reports",
]
