"""Series: site, de-duplication, geometry, usability (pure functions over tables).

:func:`build_catalogue` turns the committed per-file index into the series table, the
rejects, and each series' files in slice order, bucket by bucket.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fedct import dicom
from fedct.catalogue.index import FileIndex, WalkError
from fedct.config import CatalogueParams
from fedct.errors import FedctError

# Catalogued files per aggregation bucket: bounds the memory of the series pass.
BUCKET_ROWS = 500_000
UNKNOWN_SITE = "UNKNOWN"
# Slice positions are regular when every gap lies within this of the median gap.
SPACING_TOL_MM = 0.01
SPACING_TOL_REL = 0.05
# Thickness classes of the acquisition condition (mm, upper bounds inclusive).
THICKNESS_CLASSES = ((1.5, "thin"), (3.0, "medium"), (math.inf, "thick"))
# Each series' files in slice order (a catalogue output; archive-relative paths).
# ``relpath_bytes``: the exact bytes of a path that is not UTF-8 (else null), as in the
# index; ``fedct.dicom.files.exact_path`` gives the path to open.
SERIES_FILES_SCHEMA = pa.schema([("series_key", pa.string()), ("slice", pa.int32()),
                                 ("relpath", pa.string()), ("relpath_bytes", pa.binary())])


def site_order(sites: Iterable[str]) -> list[str]:
    """Sites sorted by name, UNKNOWN_SITE last: the order of every per-site table."""
    return sorted(set(sites), key=lambda s: (s == UNKNOWN_SITE, s))


def load_site_mapping(path: str | Path) -> dict[str, str]:
    """CSV ``key,site``: an InstitutionName or a folder name -> site label."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise FedctError(f"site mapping {path}: cannot read ({exc})") from exc
    if not {"key", "site"} <= set(df.columns):
        raise FedctError(
            f"site mapping {path}: needs columns key,site; has {list(df.columns)}")
    return {k.strip(): s.strip() for k, s in zip(df["key"], df["site"], strict=True)
            if k.strip()}


def site_mapping(params: CatalogueParams) -> dict[str, str] | None:
    """The mapping of ``site_rule: mapping`` (None for the other rules)."""
    if params.site_rule != "mapping":
        return None
    if not params.site_mapping:
        raise FedctError("catalogue.site_rule is 'mapping' but catalogue.site_mapping "
                         "(a CSV with columns key,site) is not set")
    return load_site_mapping(params.site_mapping)


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
            raise FedctError("site_rule 'mapping' needs catalogue.site_mapping (a CSV key,site)")
        site = institution.map(mapping)
        site = site.where(site.notna(), folder.map(mapping))
    else:
        raise FedctError(f"unknown site_rule {rule!r}: folder, institution or mapping")
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
    "uid_key", "uid_shared", "key_id",
)
_AGG_INPUT = ("relpath", "relpath_bytes", "sop_key", "patient_key", "study_key", "series_key",
              "institution",
              "sop_class", "transfer_syntax", "modality", "image_type", "manufacturer",
              "model", "kernel", "body_part", "study_ym", "series_number", "rows", "cols",
              "ps_row", "ps_col", "thickness", "kvp", "exposure", "iop_key", "orientation",
              "pos_n", "n_frames", "frame_pos", "frames_consistent")


# The owner of a series: files of one SeriesInstanceUID under two of these are two series.
SERIES_OWNER = ("site", "patient_key", "study_key")


def split_shared_uids(files: pd.DataFrame) -> pd.DataFrame:
    """``files`` with ``uid_key`` (the pseudonymised SeriesInstanceUID), ``uid_shared`` and
    a ``series_key`` that is unique per (site, patient, study, SeriesInstanceUID).

    A UID is not unique in real archives (broken modalities, anonymisers that make new
    UIDs per export): grouped by the UID alone, two patients' files would merge into one
    volume. Where one UID spans several owners (``SERIES_OWNER``), each owner's files
    get their own key, a hash of the UID's key and the owner's keys (pseudonyms only),
    and ``uid_shared`` is True; elsewhere ``series_key`` stays the UID's key. Within one
    patient's study, files of one UID with different geometry stay one series, which
    ``usability`` marks "inconsistent geometry". Idempotent (a frame that has
    ``uid_key`` is returned as is).
    """
    if "uid_key" in files.columns:
        return files
    files = files.copy()
    files["uid_key"] = files["series_key"]
    files["uid_shared"] = False
    owner_cols = [c for c in SERIES_OWNER if c in files.columns]
    if files.empty or not owner_cols:
        return files
    owners = files[owner_cols].astype(str)
    n_owners = owners.assign(k=files["series_key"]).groupby("k")[owner_cols].nunique().max(
        axis=1)
    shared = files["series_key"].isin(n_owners.index[n_owners > 1])
    if shared.any():
        label = files.loc[shared, "series_key"].astype(str)
        for c in owner_cols:
            label = label + "|" + owners.loc[shared, c]
        files.loc[shared, "series_key"] = [
            hashlib.sha256(f"fedct:shared-uid|{v}".encode()).hexdigest()[:32] for v in label]
        files.loc[shared, "uid_shared"] = True
    return files


def aggregate_series(files: pd.DataFrame, min_slices: int = 32) -> tuple[pd.DataFrame,
                                                                       pd.DataFrame]:
    """One row per series from catalogued file rows (index columns + ``site``).

    Duplicated SOP instances count once: the copy with the first path is kept, the
    others come back as rejects (``path``, ``reason``, ``detail``). Bounded by the
    rows given (one bucket of series), vectorised.
    """
    if files.empty:
        return _empty_series(), _empty_rejects()
    files = split_shared_uids(files)
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
        uid_key=("uid_key", "first"), uid_shared=("uid_shared", "first"),
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
    s["spacing_regular"] = (
        spacing_regular(s["spacing_min"], s["spacing_max"], s["spacing"]) & (s["n_dup_pos"] == 0)
    )
    s["usable"], s["reason"] = usability(s, min_slices)
    return s, duplicates


def spacing_regular(gap_min, gap_max, spacing):
    """Whether slice positions are regular: every gap within ``SPACING_TOL_MM`` or
    ``SPACING_TOL_REL`` of the median gap ``spacing``. Scalars or arrays (one per series);
    NaN gaps (a single slice) count as regular. The one rule of the catalogue and predict."""
    spread = np.nan_to_num(np.asarray(gap_max, dtype=float) - np.asarray(gap_min, dtype=float))
    tol = np.maximum(SPACING_TOL_MM,
                     SPACING_TOL_REL * np.nan_to_num(np.asarray(spacing, dtype=float)))
    return spread <= tol


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


def series_files(files: pd.DataFrame) -> pd.DataFrame:
    """Each series' files in slice order: ``series_key``, ``slice`` (0, 1, ...), ``relpath``
    and ``relpath_bytes`` (the exact bytes of a name that is not UTF-8, else None).

    From catalogued file rows (index columns). Duplicated SOP instances count once (the
    copy with the first path, as in :func:`aggregate_series`); files are ordered along
    the slice normal (``pos_n``, mm), then by path. A multi-frame file is one row.
    """
    if files.empty:
        return pd.DataFrame({"series_key": pd.Series(dtype=object),
                             "slice": pd.Series(dtype="int32"),
                             "relpath": pd.Series(dtype=object),
                             "relpath_bytes": pd.Series(dtype=object)})
    files = split_shared_uids(files)
    if "relpath_bytes" not in files.columns:
        files = files.assign(relpath_bytes=None)
    kept = files.sort_values(["sop_key", "relpath"], kind="stable").drop_duplicates("sop_key")
    kept = kept.sort_values(["series_key", "pos_n", "relpath"], kind="stable")
    out = kept[["series_key", "relpath", "relpath_bytes"]].reset_index(drop=True)
    out.insert(1, "slice", out.groupby("series_key", sort=False).cumcount().astype("int32"))
    return out


def build_catalogue(index: FileIndex, params: CatalogueParams, key_id: str,
                    mapping: dict[str, str] | None, tmp: Path,
                    files_sink: Callable[[pd.DataFrame], None] | None = None,
                    walk_errors: Sequence[WalkError] = (),
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(series table, rejects table) from the committed index.

    ``files_sink``, when given, receives :func:`series_files` of each bucket of series:
    the files of every series pass through it without ever being in memory at once.
    ``walk_errors`` (what the scan could not list or stat) join the rejects.
    """
    series_parts: list[pd.DataFrame] = []
    rejects: list[pd.DataFrame] = []
    for files in _series_buckets(index, tmp):
        files["site"] = site_of(files, params.site_rule, params.site_level, mapping)
        files = split_shared_uids(files)
        series, dups = aggregate_series(files, params.min_slices)
        series_parts.append(series)
        rejects.append(dups)
        if files_sink is not None:
            files_sink(series_files(files))
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
    if walk_errors:
        walk = pd.DataFrame({"path": [e.relpath for e in walk_errors],
                             "reason": dicom.UNREADABLE,
                             "detail": [e.detail for e in walk_errors]})
        rej = pd.concat([rej, walk], ignore_index=True).sort_values(
            ["path", "reason"], kind="stable").reset_index(drop=True)
    return series, rej
