"""The catalogue: sort every CT series of an archive by site and acquisition condition.

One module per job, in the order a catalogue run uses them:

- :mod:`~fedct.catalogue.pseudonym`: the site's HMAC key and keyed pseudonyms;
- :mod:`~fedct.catalogue.rows`: one PHI-free row per file from its DICOM header;
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
