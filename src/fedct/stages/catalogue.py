"""``fedct catalogue``: sort every CT series of an archive by site and acquisition condition.

Reads DICOM headers only (never pixel data) and writes, under OUT_DIR:

- ``series.parquet``: one row per series (pseudonymised keys, site, vendor, model,
  kernel, geometry, ``usable`` and the ``reason`` when not);
- ``rejects.parquet``: every file that is not catalogued (``file_key``, a keyed hash of
  its path, and ``reason``);
- reports: ``exam_counts.csv`` (vendor x site, the source study's layout),
  ``combos.csv`` (vendor+model+kernel x site), ``usable_by_site.csv``,
  ``unusable_reasons.csv``, ``reject_reasons.csv``, the domain-shift candidates
  ``shift_combos.csv`` / ``shift_sites.csv`` with ``shift_heatmap.png``;
- ``metrics.json``: counts and the top shift candidates (deterministic: no timings).

These hold no archive path: they are what a DVC remote receives. What does hold paths
stays at the site, in folders of its own (in dvc.yaml outside OUT_DIR, neither cached by
DVC nor tracked by git; docs/security/dvc-remote.md):

- PATHS_DIR (``--paths-dir``, default OUT_DIR/paths): ``series_files.parquet``, the files
  of each series in slice order (``series_key``, ``slice``, ``relpath`` relative to the
  archive), so that the cohort reads a series without walking the archive or the index,
  and ``rejects.parquet`` with each reject's ``path`` and ``detail`` too;
- INDEX_DIR (``--index-dir``, default OUT_DIR/index): the per-file index that makes a
  rescan incremental.

The work is done by :mod:`fedct.catalogue` (scale and PHI handling are described there).
An unchanged rescan (no file changed, the outputs as this code and these params wrote
them) writes nothing and opens no MLflow run: it imports neither pandas nor mlflow
(``tests/test_cli.py`` checks), so a daily rescan of an unchanged archive costs the walk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fedct.catalogue
from fedct import dicom
from fedct.catalogue import (
    PATH_FILES,
    PATHS_DIRNAME,
    REJECTS_FILE,
    REPORT_FILES,
    SERIES_FILE,
    SERIES_FILES_FILE,
    TABLE_FILES,
)
from fedct.catalogue.index import INDEX_VERSION, FileIndex
from fedct.catalogue.pseudonym import PseudonymKey, load_key
from fedct.catalogue.scan import ScanStats, scan
from fedct.config import CatalogueParams, to_dict
from fedct.errors import FedctError
from fedct.provenance import source_digest

INDEX_DIRNAME = "index"


@dataclass
class CatalogueResult:
    """Where the outputs are, the deterministic metrics, and what the scan did."""

    out_dir: Path
    paths_dir: Path
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
        return self.out_dir / SERIES_FILE

    @property
    def rejects_path(self) -> Path:
        """Rejects by file key and reason (no path)."""
        return self.out_dir / REJECTS_FILE

    @property
    def local_rejects_path(self) -> Path:
        """Rejects with their archive paths and details: stays at the site."""
        return self.paths_dir / REJECTS_FILE

    @property
    def series_files_path(self) -> Path:
        return self.paths_dir / SERIES_FILES_FILE


def _fingerprint(params: CatalogueParams, key: PseudonymKey, index: FileIndex,
                 archive: Path, out: Path, paths: Path, n_errors: int,
                 mapping: dict[str, str] | None) -> str:
    # The mapping's contents, not only its path: an edited sites.csv must rebuild the sites.
    state = {"params": to_dict(params), "mapping": sorted((mapping or {}).items()),
             "key_id": key.key_id, "index": index.fingerprint(),
             "archive": str(archive), "out": str(out.resolve()),
             "paths": str(paths.resolve()), "errors": n_errors, "version": INDEX_VERSION,
             "outputs": [*TABLE_FILES, *REPORT_FILES, *PATH_FILES],
             # The code that makes the outputs: a fixed aggregation must rebuild them.
             "code": source_digest(sys.modules[__name__], fedct.catalogue, dicom)}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def run(params: CatalogueParams, archive_dir: str | Path, out_dir: str | Path, *,
        index_dir: str | Path | None = None, paths_dir: str | Path | None = None,
        track: bool = True, progress: bool = True) -> CatalogueResult:
    """Catalogue ``archive_dir`` into ``out_dir`` (see the module docstring).

    Args:
        params: the ``catalogue`` section of params.yaml.
        archive_dir: root of the DICOM archive (read only).
        out_dir: where series.parquet, rejects.parquet (no paths) and the reports go.
        index_dir: the per-file index for incremental rescans [default: OUT_DIR/index].
            Keep it outside a DVC-managed output if DVC should not delete it.
        paths_dir: where the tables with archive paths go (series_files.parquet and
            rejects.parquet with paths) [default: OUT_DIR/paths]. Keep it outside any
            output that DVC caches: a DVC remote must not receive it.
        track: log the run to MLflow through ``fedct.tracking``.
        progress: show a tqdm progress bar.
    """
    archive = Path(archive_dir).resolve()
    if not archive.is_dir():
        raise FedctError(f"archive {archive}: not a directory")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index_path = Path(index_dir) if index_dir is not None else out / INDEX_DIRNAME
    paths = Path(paths_dir) if paths_dir is not None else out / PATHS_DIRNAME
    paths.mkdir(parents=True, exist_ok=True)
    # Where earlier versions wrote the file lists, archive paths and all: OUT_DIR is what
    # DVC pushes, so a stale copy must not stay there.
    (out / SERIES_FILES_FILE).unlink(missing_ok=True)
    key = load_key(params)
    mapping = None
    if params.site_rule == "mapping":
        from fedct.catalogue.series import site_mapping

        mapping = site_mapping(params)
    with FileIndex(index_path, key.key_id, params.chunk_size) as index:
        stats = scan(archive, index, key, workers=params.workers, scheduler=params.scheduler,
                     exclude=[out, index_path, paths], progress=progress)
        state_file = index_path / "outputs.json"
        fingerprint = _fingerprint(params, key, index, archive, out, paths, len(stats.errors),
                                   mapping)
        up_to_date = (
            stats.n_parsed == 0 and stats.n_dropped == 0 and state_file.exists()
            and json.loads(state_file.read_text()).get("fingerprint") == fingerprint
            and all((out / f).exists() for f in (*TABLE_FILES, *REPORT_FILES))
            and all((paths / f).exists() for f in PATH_FILES)
        )
        if up_to_date:
            # Nothing to write, nothing new to log: the run that wrote the outputs holds them.
            metrics = json.loads((out / "metrics.json").read_text())
            _warn_paths_with_ids(metrics, out, paths, index_path)
            return CatalogueResult(out, paths, metrics, stats, up_to_date=True)
        tracker: contextlib.AbstractContextManager[Any] = contextlib.nullcontext(None)
        if track:
            from fedct import tracking

            tracker = tracking.start_run("catalogue", tags={"fedct.key_id": key.key_id})
        with tracker as mlrun:
            if mlrun is not None:
                mlrun.log_params({**to_dict(params), "demo_key_used": key.demo})
            t_agg = time.perf_counter()
            metrics = _build_outputs(index, params, key, mapping, stats, out, paths,
                                     index_path)
            stats.seconds += time.perf_counter() - t_agg
            state_file.write_text(json.dumps({"fingerprint": fingerprint}))
            _warn_paths_with_ids(metrics, out, paths, index_path)
            if mlrun is not None:
                mlrun.log_metrics({k: v for k, v in metrics.items()
                                   if isinstance(v, int | float) and not isinstance(v, bool)})
                mlrun.log_metrics({"n_parsed": stats.n_parsed, "scan_seconds": stats.seconds,
                                   "files_per_second": stats.n_parsed / max(stats.seconds,
                                                                            1e-9)})
                # The tables go to DVC; the path tables and the index stay at the site.
                for name in REPORT_FILES:
                    mlrun.log_artifact(out / name)
    return CatalogueResult(out, paths, metrics, stats, up_to_date)


def _warn_paths_with_ids(metrics: dict[str, Any], out: Path, paths: Path,
                         index_path: Path) -> None:
    if metrics.get("n_paths_with_patient_id"):
        warnings.warn(
            f"catalogue: the archive paths of {metrics['n_paths_with_patient_id']} files "
            f"contain their own PatientID, a part of the PatientName or the "
            f"PatientBirthDate (e.g. folders named after patients), so the path "
            f"tables in {paths} and the index {index_path} hold patient identifiers: "
            f"keep both inside the archive's privacy boundary (never in an output "
            f"that DVC caches or git tracks), or export the archive by UID; {out}, "
            f"the reports, metrics and MLflow run hold no path",
            stacklevel=3)


def _build_outputs(index: FileIndex, params: CatalogueParams, key: PseudonymKey,
                   mapping: dict[str, str] | None, stats: ScanStats, out: Path,
                   paths: Path, index_path: Path) -> dict[str, Any]:
    import pyarrow.compute as pc

    from fedct.catalogue import reports
    from fedct.catalogue.series import SERIES_FILES_SCHEMA, build_catalogue

    tmp = index_path / f"tmp-{uuid.uuid4().hex[:8]}"
    try:
        with reports.parquet_sink(paths / SERIES_FILES_FILE, SERIES_FILES_SCHEMA,
                                  reports.parquet_metadata(key)) as files_sink:
            series, rejects = build_catalogue(index, params, key.key_id, mapping, tmp,
                                              files_sink, stats.errors)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_id_paths = sum(pc.sum(b.column(0)).as_py() or 0
                     for b in index.batches(["path_has_patient_id"]))
    return reports.write_outputs(series, rejects, out, paths, key, stats.n_files,
                                 n_id_paths)
