"""The catalogue: sort every CT series of an archive by site and acquisition condition.

One module per job, in the order a catalogue run uses them:

- :mod:`~fedct.catalogue.pseudonym`: the site's HMAC key and keyed pseudonyms;
- :mod:`~fedct.catalogue.rows`: one PHI-free row per file from its DICOM header;
- :mod:`~fedct.catalogue.pathids`: which archive paths spell out their own patient;
- :mod:`~fedct.catalogue.index`: the archive walk and the incremental per-file index;
- :mod:`~fedct.catalogue.scan`: parsing what changed on a process pool or Dask;
- :mod:`~fedct.catalogue.series`: site rules, one row per series, usability;
- :mod:`~fedct.catalogue.conditions`: which site/acquisition combinations may shift a model;
- :mod:`~fedct.catalogue.reports`: report tables, plots and the output writers.

The ``fedct catalogue`` stage (:mod:`fedct.stages.catalogue`) only wires them together.

Scale: the archive is walked lazily; files are parsed in chunks by a process pool (or a
Dask cluster); per-file rows stream into Parquet parts; series are aggregated bucket
by bucket (series hashed into buckets), so memory is bounded by the bucket size and
the number of series, not by the number of files.

PHI: PatientName, PatientBirthDate and AccessionNumber are never read; PatientID and
the study/series/SOP instance UIDs are replaced by keyed hashes (HMAC-SHA256) inside
the worker that reads them, before anything is written.
"""

#: The tables that hold archive paths, which many exports name after patients: the
#: cohort reads the files of each series through them, so they stay at the site, in a
#: folder of their own (``--paths-dir``, by default OUT_DIR/paths) that is neither
#: cached by DVC nor tracked by git, and never logged.
PATHS_DIRNAME = "paths"
SERIES_FILES_FILE = "series_files.parquet"

# Tables for the next stages, in OUT_DIR (what DVC caches and pushes): pseudonyms, reasons
# and counts, no archive path. rejects.parquet keys each file by a keyed hash of its path.
SERIES_FILE = "series.parquet"
REJECTS_FILE = "rejects.parquet"
TABLE_FILES = (SERIES_FILE, REJECTS_FILE)
# In the paths folder (PATHS_DIRNAME): the same rejects with their archive paths and
# details, and the files of each series (the cohort's input). Like the index they stay at
# the site: never cached by DVC, tracked by git or logged to MLflow.
PATH_FILES = (SERIES_FILES_FILE, REJECTS_FILE)
# Reports: no path, no identifier; logged to MLflow.
REPORT_FILES = ("exam_counts.csv", "combos.csv", "usable_by_site.csv", "unusable_reasons.csv",
                "reject_reasons.csv", "shift_combos.csv", "shift_sites.csv",
                "shift_heatmap.png", "metrics.json")
