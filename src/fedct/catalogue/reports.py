"""Reports: tables of the series table, the shift heatmap, and the output writers."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fedct import dicom
from fedct.catalogue import (  # noqa: F401 - the output files, by name, for the stage
    PATH_FILES,
    REJECTS_FILE,
    REPORT_FILES,
    SERIES_FILE,
    SERIES_FILES_FILE,
    TABLE_FILES,
)
from fedct.catalogue.conditions import (
    adjusted_residuals,
    condition_table,
    shift_combos,
    shift_sites,
)
from fedct.catalogue.pseudonym import PseudonymKey, pseudonym
from fedct.catalogue.series import site_order

HEATMAP_ROWS = 20
STUDY_VENDORS = ("CANON", "GE", "PHILIPS", "SIEMENS")


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
    t = t.reindex(index=_vendor_order(t.index), columns=site_order(t.columns), fill_value=0)
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
    t = t.reindex(columns=site_order(t.columns), fill_value=0)
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
    out = out.reindex(site_order(out.index))
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
    t = t.reindex(columns=site_order(t.columns), fill_value=0)
    t["total"] = t.sum(axis=1)
    t.index.name = "reason"
    t.columns.name = None
    return t.sort_values("total", ascending=False).reset_index()



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


# Columns of rejects.parquet in OUT_DIR and in the paths folder (the file names are in
# fedct.catalogue, which the stage reads without importing pandas).
REJECT_COLUMNS = ["file_key", "reason"]
LOCAL_REJECT_COLUMNS = ["file_key", "path", "reason", "detail"]


def write_parquet(df: pd.DataFrame, path: Path, metadata: dict[str, str]) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           **{k.encode(): v.encode() for k, v in
                                              metadata.items()}})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def parquet_sink(path: Path, schema: pa.Schema, metadata: dict[str, str]
                 ) -> Iterator[Callable[[pd.DataFrame], None]]:
    """A function that appends DataFrames (columns of ``schema``) to one Parquet file.

    Streams row groups, so the whole table is never in memory; the file appears at
    ``path`` only when the block completes.
    """
    tmp = path.with_name(path.name + ".tmp")
    meta = {k.encode(): v.encode() for k, v in metadata.items()}
    try:
        with pq.ParquetWriter(tmp, schema.with_metadata(meta)) as writer:
            yield lambda df: writer.write_table(
                pa.Table.from_pandas(df, schema=schema, preserve_index=False))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
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


def catalogue_metrics(series: pd.DataFrame, rejects: pd.DataFrame, n_files: int,
                      key: PseudonymKey, head: dict[str, Any],
                      n_paths_with_patient_id: int) -> dict[str, Any]:
    """Counts of the catalogue and the shift headline (deterministic: no timings)."""
    n_usable = int(series["usable"].sum()) if not series.empty else 0
    return {
        "n_files": n_files,
        "n_catalogued_files": int(series["n_files"].sum()) if not series.empty else 0,
        "n_rejects": len(rejects),
        "n_duplicates": int((rejects["reason"] == dicom.DUPLICATE).sum()),
        "n_implausible": int((rejects["reason"] == dicom.IMPLAUSIBLE).sum()),
        # SeriesInstanceUIDs found under several (site, patient, study), and the series
        # made of them: each kept apart by its own key (catalogue.series.split_shared_uids).
        "n_shared_series_uids": _n_shared_uids(series),
        "n_series_of_shared_uids": (int(series["uid_shared"].astype(bool).sum())
                                    if "uid_shared" in series and not series.empty else 0),
        "n_series": len(series),
        "n_usable": n_usable,
        "usable_fraction": round(n_usable / len(series), 4) if len(series) else 0.0,
        "n_studies": int(series["study_key"].nunique()) if not series.empty else 0,
        "n_sites": int(series["site"].nunique()) if not series.empty else 0,
        "demo_key": key.demo,
        "key_id": key.key_id,
        "n_paths_with_patient_id": n_paths_with_patient_id,
        **head,
    }


def _n_shared_uids(series: pd.DataFrame) -> int:
    if series.empty or "uid_shared" not in series:
        return 0
    return int(series.loc[series["uid_shared"].astype(bool), "uid_key"].nunique())


def parquet_metadata(key: PseudonymKey) -> dict[str, str]:
    """What every table records about its pseudonyms (key id, demo key or not)."""
    return {"fedct.key_id": key.key_id, "fedct.demo_key": str(key.demo).lower()}


def file_keys(paths: Iterable[str], key: PseudonymKey) -> list[str]:
    """A keyed hash of each archive path: names a file without spelling its path (the
    site resolves it through the paths folder's rejects.parquet)."""
    return [pseudonym(key.secret, "file", str(p)) for p in paths]


def write_outputs(series: pd.DataFrame, rejects: pd.DataFrame, out: Path, paths_dir: Path,
                  key: PseudonymKey, n_files: int, n_paths_with_patient_id: int
                  ) -> dict[str, Any]:
    """Write series.parquet, the two rejects tables, the reports and metrics.json; the
    metrics.

    ``out/rejects.parquet`` holds ``file_key`` and ``reason`` only; ``paths_dir``'s copy
    adds the archive ``path`` and the ``detail`` (which may quote a path or a header).
    ``n_paths_with_patient_id``: files whose archive path contains their own PatientID
    (the index's ``path_has_patient_id``), reported as a count only.
    """
    meta = parquet_metadata(key)
    write_parquet(series, out / SERIES_FILE, meta)
    rejects = rejects.assign(file_key=file_keys(rejects["path"], key))
    write_parquet(rejects[LOCAL_REJECT_COLUMNS], paths_dir / REJECTS_FILE, meta)
    write_parquet(rejects[REJECT_COLUMNS], out / REJECTS_FILE, meta)
    head = write_reports(series, rejects, out)
    metrics = catalogue_metrics(series, rejects, n_files, key, head, n_paths_with_patient_id)
    write_json(metrics, out / "metrics.json")
    return metrics
