"""The ``fedct catalogue`` stage: its declared outputs and its input errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from fedct.errors import FedctError
from fedct.stages import catalogue as stage
from tests.catalogue.archive import PARAMS


def test_series_files_list_the_files_of_every_series(archive, catalogued) -> None:
    root, _ = archive
    result, series, _ = catalogued
    assert result.series_files_path == result.out_dir / "paths" / "series_files.parquet"
    files = pd.read_parquet(result.series_files_path)
    assert files.columns.tolist() == ["series_key", "slice", "relpath", "relpath_bytes"]
    # One row per catalogued file of each series (duplicates counted once), every
    # usable series among them; slices numbered 0..n-1; paths relative to the archive.
    n_rows = files.groupby("series_key").size()
    assert n_rows.reindex(series["series_key"]).tolist() == series["n_files"].tolist()
    usable = series[series["usable"]]
    assert (n_rows.reindex(usable["series_key"]) == usable["n_files"].to_numpy()).all()
    for _, g in files.groupby("series_key"):
        assert sorted(g["slice"]) == list(range(len(g)))
    assert all((root / p).is_file() for p in files["relpath"])
    assert not files["relpath"].str.contains("RESENT").any()
    # The usable axial stack of site A, in slice order (IM00001 lies at z = 0).
    axial = series[(series["site"] == "A") & series["usable"]]["series_key"].item()
    stack = files[files["series_key"] == axial].sort_values("slice")["relpath"]
    assert stack.tolist() == [f"A/ST01/SE002/IM{k + 1:05d}.dcm" for k in range(34)]
    meta = pq.read_schema(result.series_files_path).metadata
    assert meta[b"fedct.key_id"] == b"demo"


def test_only_the_paths_folder_holds_archive_paths(archive, catalogued) -> None:
    """OUT_DIR (what DVC pushes) names rejects by a keyed hash of the path; the site's
    own copy in the paths folder maps each key back to its path and detail."""
    from fedct.catalogue.pseudonym import DEMO_KEY, pseudonym

    result, _, local = catalogued
    pushed = pd.read_parquet(result.rejects_path)
    assert pushed.columns.tolist() == ["file_key", "reason"]
    assert local.columns.tolist() == ["file_key", "path", "reason", "detail"]
    pd.testing.assert_frame_equal(pushed, local[["file_key", "reason"]])
    assert local["file_key"].tolist() == [pseudonym(DEMO_KEY, "file", p) for p in local["path"]]
    assert local["file_key"].is_unique
    assert sorted(f.name for f in result.paths_dir.iterdir()) == ["rejects.parquet",
                                                                  "series_files.parquet"]
    # No path of the archive, nor of a study or series folder (the first level is the
    # site, a label by design), anywhere in OUT_DIR but the paths and index folders.
    files = pd.read_parquet(result.series_files_path)
    needles = {*files["relpath"], *local["path"]}
    needles |= {str(Path(p).parent) for p in needles if "/" in str(Path(p).parent)}
    outside = [f for f in result.out_dir.rglob("*") if f.is_file()
               and not {"paths", "index"} & set(f.relative_to(result.out_dir).parts)]
    assert {f.name for f in outside} >= {"series.parquet", "rejects.parquet", "metrics.json"}
    for f in outside:
        data = f.read_bytes() + b"\n" + (pd.read_parquet(f).to_csv().encode()
                                         if f.suffix == ".parquet" else b"")
        hits = [n for n in needles if n.encode() in data]
        assert not hits, (f, hits[:3])


def test_archive_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FedctError, match="not a directory"):
        stage.run(PARAMS, tmp_path / "missing", tmp_path / "out", track=False)


def test_an_edited_site_mapping_rebuilds_the_sites(tmp_path: Path) -> None:
    """The mapping's path is the same, its contents are not: no "up to date" shortcut."""
    from tests.catalogue.archive import small_archive

    root = tmp_path / "archive"
    small_archive(root)
    mapping = tmp_path / "sites.csv"
    mapping.write_text("key,site\nA,NORTH\nB,SOUTH\n")
    params = dataclasses.replace(PARAMS, site_rule="mapping", site_mapping=str(mapping),
                                 workers=1)
    out = tmp_path / "out"
    stage.run(params, root, out, track=False, progress=False)
    assert set(pd.read_parquet(out / "series.parquet")["site"]) == {"NORTH", "SOUTH"}
    mapping.write_text("key,site\nA,EAST\nB,SOUTH\n")
    stage.run(params, root, out, track=False, progress=False)
    assert set(pd.read_parquet(out / "series.parquet")["site"]) == {"EAST", "SOUTH"}
