"""``fedct catalogue``: usable series and reasons, nothing lost, no PHI, incremental,
the same table on Dask, shift ranking, and pydicom's odd test files."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from fedct import dicom
from fedct.config import CatalogueParams
from fedct.stages import catalogue as cat
from tests.test_dicom import (
    CORONAL,
    FAKE_PATIENTS,
    copy_testdata,
    ct_slice,
    truncate_copy,
    write,
    write_dose_sr,
    write_enhanced_ct,
    write_series,
)

PARAMS = CatalogueParams(workers=2, demo_key=True)


def _key(uid: str) -> str:
    return cat.pseudonym(cat.DEMO_KEY, "series", uid)


def build_archive(root: Path) -> dict:
    """``<site>/<study>/<series>/IMxxxxx.dcm`` with every kind of distractor.

    Returns what the catalogue must find: series UID -> (usable, first reason) and
    relative path -> reject reason.
    """
    p0, p1, p2 = FAKE_PATIENTS
    series: dict[str, tuple[bool, str]] = {}
    uid = generate_uid
    # Site A: one study with a usable axial stack and every series-level distractor.
    st = uid()
    a = root / "A" / "ST01"
    s = uid()
    axial = write_series(a / "SE002", 34, study_uid=st, series_uid=s, patient=p0)
    series[s] = (True, "")
    s = uid()
    write_series(a / "SE001", 1, study_uid=st, series_uid=s, patient=p0, iop=CORONAL,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), series_number=1)
    series[s] = (False, "localizer")
    s = uid()
    write_series(a / "SE004", 34, study_uid=st, series_uid=s, patient=p0, iop=CORONAL,
                 ipps=[(-2.8, float(k), 30.0) for k in range(34)],
                 image_type=("DERIVED", "SECONDARY", "REFORMATTED"), series_number=4)
    series[s] = (False, "coronal")
    s = uid()
    write_series(a / "SE003", 12, dz=5.0, thickness=5.0, study_uid=st, series_uid=s,
                 patient=p0, series_number=3)
    series[s] = (False, "too few slices (12 < 32)")
    s = uid()
    write_series(a / "SE005", 34, positions=[k for k in range(35) if k != 17],
                 study_uid=st, series_uid=s, patient=p0, series_number=5)
    series[s] = (False, "irregular slice spacing (1.00-2.00 mm)")
    s = uid()
    for k in range(34):
        n = 6 if k == 10 else 8
        write(ct_slice(study_uid=st, series_uid=s, z=float(k), rows=n, cols=n, patient=p0,
                       series_number=6, instance=k + 1), a / "SE006" / f"IM{k + 1:05d}.dcm")
    series[s] = (False, "inconsistent geometry (matrix differ)")
    rejects = {}
    write_dose_sr(a / "SE099" / "IM00001.dcm", st)
    rejects["A/ST01/SE099/IM00001.dcm"] = dicom.NOT_CT
    for f in axial[:3]:  # re-sent by the modality: the same SOP instances again
        dst = a / "SE002_RESENT" / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
        rejects[f"A/ST01/SE002_RESENT/{f.name}"] = dicom.DUPLICATE
    junk = root / "A" / "INCOMING"
    junk.mkdir(parents=True)
    (junk / "random.dcm").write_bytes(
        np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    (junk / "notes.txt").write_text("transfer log: 3 studies received\n")
    (junk / "empty.dcm").write_bytes(b"")
    truncate_copy(axial[5], junk / "trunc_pixels.dcm", axial[5].stat().st_size - 30)
    truncate_copy(axial[5], junk / "trunc_header.dcm", 200)
    shutil.copyfile(get_testdata_file("DICOMDIR"), root / "A" / "DICOMDIR")
    rejects.update({
        "A/INCOMING/random.dcm": dicom.NOT_DICOM, "A/INCOMING/notes.txt": dicom.NOT_DICOM,
        "A/INCOMING/empty.dcm": dicom.NOT_DICOM, "A/INCOMING/trunc_pixels.dcm":
        dicom.TRUNCATED, "A/INCOMING/trunc_header.dcm": dicom.TRUNCATED,
        "A/DICOMDIR": dicom.DICOMDIR,
    })
    # Site B: the same condition, stored RLE-compressed and as one enhanced multi-frame.
    s = uid()
    write_series(root / "B" / "ST02" / "SE002", 34, compress=True, series_uid=s,
                 manufacturer="CANON_MEC", patient=p1, institution="Hospital B")
    series[s] = (True, "")
    enhanced = write_enhanced_ct(root / "B" / "ST03" / "SE003" / "IM00001.dcm", 34,
                                 patient=p1)
    import pydicom

    series[pydicom.dcmread(enhanced, stop_before_pixels=True).SeriesInstanceUID] = (True, "")
    # Site C: a condition no other site has (Siemens sharp kernel), and a shared one.
    s = uid()
    write_series(root / "C" / "ST04" / "SE002", 34, series_uid=s, manufacturer="SIEMENS",
                 model="SOMATOM Force", kernel=("Br64", "3"), patient=p2,
                 institution="Hospital C")
    series[s] = (True, "")
    s = uid()
    write_series(root / "C" / "ST05" / "SE002", 34, series_uid=s, patient=p2,
                 institution="Hospital C")
    series[s] = (True, "")
    n_files = sum(1 for p in root.rglob("*") if p.is_file())
    return {"series": series, "rejects": rejects, "n_files": n_files}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("archive")
    return root, build_archive(root)


@pytest.fixture(scope="module")
def catalogued(archive: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory):
    """One catalogue of the archive on the local process pool (2 workers)."""
    root, _ = archive
    out = tmp_path_factory.mktemp("catalogue")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(cat.KEY_ENV, raising=False)
        result = cat.run(PARAMS, root, out, track=False, progress=False)
    return result, pd.read_parquet(out / "series.parquet"), pd.read_parquet(
        out / "rejects.parquet")


def test_usable_series_and_reasons(archive, catalogued) -> None:
    _, expected = archive
    _, series, _ = catalogued
    by_key = series.set_index("series_key")
    assert len(series) == len(expected["series"])
    for uid, (usable, reason) in expected["series"].items():
        row = by_key.loc[_key(uid)]
        assert bool(row["usable"]) is usable, (reason, row["reason"])
        if usable:
            assert row["reason"] == ""
        else:
            assert row["reason"].split("; ")[0] == reason, row["reason"]
    assert {"site", "vendor", "model", "kernel", "n_slices", "usable", "reason"} <= set(
        series.columns)


def test_series_columns_hold_the_acquisition(archive, catalogued) -> None:
    _, series, _ = catalogued
    usable = series[series["usable"]].set_index("site")
    siemens = series[series["vendor"] == "SIEMENS"].iloc[0]
    assert siemens["kernel"] == "Br64\\3" and siemens["kernel_class"] == "sharp"
    assert siemens["site"] == "C" and siemens["model"] == "SOMATOM Force"
    assert set(usable["vendor"]) == {"CANON", "SIEMENS"}  # TOSHIBA/CANON_MEC normalised
    axial = series[(series["site"] == "A") & series["usable"]].iloc[0]
    assert axial["n_slices"] == 34 and axial["n_files"] == 34
    assert axial["n_duplicates"] == 3  # the re-sent copies count once
    assert axial["slice_spacing"] == pytest.approx(1.0)
    assert axial["pixel_spacing_row"] == pytest.approx(0.7)
    assert (axial["rows"], axial["cols"]) == (8, 8)
    assert axial["orientation"] == "axial" and axial["image_type"] == "original"
    assert axial["study_ym"] == "2019-03" and axial["kvp"] == 120
    assert axial["thickness_class"] == "thin" and axial["z_extent"] == pytest.approx(33)
    rle = series[(series["site"] == "B") & (series["n_files"] == 34)].iloc[0]
    assert rle["compressed"] and rle["transfer_syntax"] == "1.2.840.10008.1.2.5"
    assert rle["usable"]
    enhanced = series[(series["site"] == "B") & (series["n_files"] == 1)].iloc[0]
    assert enhanced["n_slices"] == 34 and enhanced["usable"]
    assert enhanced["sop_class"] == dicom.ENHANCED_CT_IMAGE_STORAGE
    # One patient key per fake patient: B's two studies belong to one patient.
    assert series.groupby("site")["patient_key"].nunique().to_dict() == {"A": 1, "B": 1,
                                                                         "C": 1}
    assert (series["key_id"] == "demo").all()


def test_every_file_is_catalogued_or_rejected(archive, catalogued) -> None:
    _, expected = archive
    result, series, rejects = catalogued
    m = result.metrics
    assert m["n_files"] == expected["n_files"]
    assert m["n_catalogued_files"] + m["n_rejects"] == m["n_files"]
    assert series["n_files"].sum() == m["n_catalogued_files"]
    got = dict(zip(rejects["path"], rejects["reason"], strict=True))
    assert got == expected["rejects"]
    assert rejects["detail"].str.len().gt(0).all()
    dup = rejects[rejects["reason"] == dicom.DUPLICATE].iloc[0]
    assert dup["detail"].startswith("same SOP instance as A/ST01/SE002/")


def test_no_identifier_reaches_any_output(archive, catalogued) -> None:
    root, _ = archive
    result, _, _ = catalogued
    _assert_no_phi(result.out_dir, root)


def _assert_no_phi(out_dir: Path, archive_root: Path) -> None:
    """Scan the bytes of every output file for the fake identifiers and raw UIDs."""
    import pydicom

    needles = set()
    for p in FAKE_PATIENTS:
        needles |= {p["name"], p["id"], p["birth"], p["accession"],
                    p["name"].split("^")[0]}
    for f in list(archive_root.rglob("*.dcm"))[:400]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - distractors
            continue
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if kw in ds:
                needles.add(str(ds[kw].value))
    files = [p for p in Path(out_dir).rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in data, f"{needle!r} found in {path}"


def test_reports(catalogued) -> None:
    result, _, _ = catalogued
    out = result.out_dir
    exams = pd.read_csv(out / "exam_counts.csv", index_col="vendor")
    assert list(exams.columns) == ["A", "B", "C", "total"]
    assert list(exams.index) == ["CANON", "SIEMENS", "total"]
    assert exams.loc["CANON"].tolist() == [1, 2, 1, 4]
    assert exams.loc["SIEMENS"].tolist() == [0, 0, 1, 1]
    assert exams.loc["total"].tolist() == [1, 2, 2, 5]
    combos = pd.read_csv(out / "combos.csv")
    assert {"vendor", "model", "kernel", "A", "B", "C", "total", "usable"} <= set(combos)
    usable = pd.read_csv(out / "usable_by_site.csv").set_index("site")
    assert usable.loc["A", "usable_fraction"] == pytest.approx(1 / 6, abs=1e-4)
    assert usable.loc["B", "usable_fraction"] == 1.0
    reasons = pd.read_csv(out / "unusable_reasons.csv")
    assert set(reasons["reason"]) == {"localizer", "coronal", "too few slices",
                                      "irregular slice spacing", "inconsistent geometry"}
    assert (out / "shift_heatmap.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_usable"] == 5 and metrics["n_series"] == 10
    assert metrics["demo_key"] is True and metrics["n_duplicates"] == 3


def test_shift_ranking_puts_the_unique_condition_site_first(catalogued) -> None:
    result, _, _ = catalogued
    sites = pd.read_csv(result.out_dir / "shift_sites.csv")
    combos = pd.read_csv(result.out_dir / "shift_combos.csv")
    assert sites.iloc[0]["site"] == "C"
    assert combos.iloc[0]["site"] == "C"
    assert combos.iloc[0]["condition"] == "SIEMENS | SOMATOM Force | Br64\\3 | thin"
    assert result.metrics["top_shift_site"] == "C"


def test_shift_scores_on_count_tables() -> None:
    assert cat.jensen_shannon(np.array([1, 2, 3]), np.array([2, 4, 6])) == pytest.approx(0)
    assert cat.jensen_shannon(np.array([1, 0]), np.array([0, 5])) == pytest.approx(1)
    table = pd.DataFrame([[50, 50, 0], [40, 60, 0], [45, 35, 20]],
                         index=["A", "B", "C"], columns=["soft", "std", "sharp"])
    sites = cat.shift_sites(table)
    assert sites.iloc[0]["site"] == "C" and sites.iloc[0]["top_condition"] == "sharp"
    combos = cat.shift_combos(table)
    assert tuple(combos.iloc[0][["site", "condition"]]) == ("C", "sharp")
    pmi = cat.pmi(table)
    assert pmi.loc["C", "sharp"] == pytest.approx(np.log2(300 / 100))
    assert np.isnan(pmi.loc["A", "sharp"])
    res = cat.adjusted_residuals(table)
    assert res.loc["C", "sharp"] > 5 and res.loc["A", "sharp"] < 0


def test_dask_cluster_gives_the_same_catalogue(archive, catalogued, tmp_path: Path) -> None:
    from distributed import LocalCluster

    root, _ = archive
    _, series, rejects = catalogued
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        params = dataclasses.replace(PARAMS, scheduler=cluster.scheduler_address)
        result = cat.run(params, root, tmp_path / "out", track=False, progress=False)
    assert result.scan.n_parsed == result.metrics["n_files"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "series.parquet"), series)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "rejects.parquet"),
                                  rejects)


def test_bounded_memory_paths_give_the_same_catalogue(archive, catalogued, tmp_path: Path,
                                                      monkeypatch) -> None:
    """Tiny limits force what a huge archive does: many parts, compaction, and series
    aggregated bucket by bucket; the tables must not change."""
    root, _ = archive
    _, series, rejects = catalogued
    monkeypatch.setattr(cat, "BUCKET_ROWS", 40)
    monkeypatch.setattr(cat, "PART_ROWS", 30)
    monkeypatch.setattr(cat, "MAX_PARTS", 3)
    monkeypatch.setattr(cat, "TASK_FILES", 16)
    params = dataclasses.replace(PARAMS, workers=1, chunk_size=8)
    result = cat.run(params, root, tmp_path / "out", track=False, progress=False)
    manifest = json.loads((tmp_path / "out" / "index" / "manifest.json").read_text())
    assert len(manifest["parts"]) > 1  # parts rolled over
    assert sum(manifest["parts"].values()) == result.metrics["n_files"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "series.parquet"), series)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "rejects.parquet"),
                                  rejects)
    # Small incremental rescans add small parts; beyond MAX_PARTS they are merged.
    extra = tmp_path / "extra"
    shutil.copytree(root, extra)  # same relative paths, sizes and mtimes: nothing to read
    for i in range(2):  # two small parts: the second commit merges them
        write_series(extra / "C" / f"ST9{i}" / "SE1", 1, patient=FAKE_PATIENTS[2])
        again = cat.run(params, extra, tmp_path / "out", track=False, progress=False)
        assert again.scan.n_parsed == 1
    manifest = json.loads((tmp_path / "out" / "index" / "manifest.json").read_text())
    assert sum(n < cat.PART_ROWS // 2 for n in manifest["parts"].values()) <= 1
    assert sum(manifest["parts"].values()) == again.metrics["n_files"]
    assert len(list((tmp_path / "out" / "index").glob("part-*"))) == len(manifest["parts"])


def _small_archive(root: Path) -> None:
    for i, site in enumerate("AB"):
        write_series(root / site / "ST1" / "SE1", 5, patient=FAKE_PATIENTS[i])
    (root / "A" / "junk.bin").write_bytes(b"\x00" * 100)


def test_incremental_rescan_reads_only_changed_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(cat.KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's artifact store goes under the working dir
    root, out = tmp_path / "archive", tmp_path / "out"
    _small_archive(root)
    params = dataclasses.replace(PARAMS, workers=1, min_slices=4)
    first = cat.run(params, root, out, track=True, progress=False)
    assert first.scan.n_parsed == first.metrics["n_files"] == 11
    assert first.metrics["n_usable"] == 2
    second = cat.run(params, root, out, track=False, progress=False)
    assert second.scan.n_parsed == 0 and second.up_to_date
    assert second.metrics == first.metrics
    # Change one file, add one, delete one.
    changed = root / "A" / "ST1" / "SE1" / "IM00002.dcm"
    changed.write_bytes(changed.read_bytes()[:-10])  # now truncated
    (root / "B" / "ST1" / "SE1" / "IM00005.dcm").unlink()
    write_series(root / "B" / "ST2" / "SE1", 1, patient=FAKE_PATIENTS[1])
    third = cat.run(params, root, out, track=False, progress=False)
    assert third.scan.n_parsed == 2 and third.scan.n_dropped == 2
    assert third.metrics["n_files"] == 11
    # A lost a middle slice (irregular spacing now); B lost its last one (4 left).
    assert third.metrics["n_usable"] == 1
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert dict(zip(rejects["path"], rejects["reason"], strict=True))[
        "A/ST1/SE1/IM00002.dcm"] == dicom.TRUNCATED
    # New parameters, same files: nothing is re-read, the tables are rebuilt.
    fourth = cat.run(dataclasses.replace(params, min_slices=5), root, out, track=False,
                     progress=False)
    assert fourth.scan.n_parsed == 0 and not fourth.up_to_date
    assert fourth.metrics["n_usable"] == 0
    # The tracked run logged the reports, and no identifier went to MLflow either.
    assert any(p.name == "metrics.json" for p in tmp_path.rglob("mlruns/**/*"))
    _assert_no_phi(tmp_path / "mlruns", root)
    _assert_no_phi(out, root)


def test_pseudonym_key_sources(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(cat.KEY_ENV, raising=False)
    no_demo = CatalogueParams(demo_key=False)
    with pytest.raises(cat.PseudonymKeyError, match="FEDCT_PSEUDONYM_KEY"):
        cat.load_key(no_demo)
    missing = dataclasses.replace(no_demo, key_file=str(tmp_path / "nope.key"))
    with pytest.raises(cat.PseudonymKeyError, match="nope.key"):
        cat.load_key(missing)
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    with pytest.raises(cat.PseudonymKeyError, match="at least"):
        cat.load_key(dataclasses.replace(no_demo, key_file=str(short)))
    good = tmp_path / "site.key"
    good.write_text("a-secret-the-site-keeps-0123456789\n")
    key = cat.load_key(dataclasses.replace(no_demo, key_file=str(good)))
    assert not key.demo and key.source == "file" and key.key_id != "demo"
    assert "secret" not in repr(key)
    monkeypatch.setenv(cat.KEY_ENV, "another-secret-from-the-environment")
    env_key = cat.load_key(dataclasses.replace(no_demo, key_file=str(good)))
    assert env_key.source == "env" and env_key.key_id != key.key_id
    assert cat.load_key(CatalogueParams()).source == "env"  # the variable wins over demo


def test_site_key_changes_pseudonyms_and_rebuilds_index(tmp_path: Path, monkeypatch) -> None:
    root, out = tmp_path / "archive", tmp_path / "out"
    _small_archive(root)
    params = dataclasses.replace(PARAMS, workers=1, min_slices=4)
    monkeypatch.delenv(cat.KEY_ENV, raising=False)
    demo = cat.run(params, root, out, track=False, progress=False)
    monkeypatch.setenv(cat.KEY_ENV, "a-secret-the-site-keeps-0123456789")
    site = cat.run(params, root, out, track=False, progress=False)
    assert site.scan.n_parsed == 11  # another key: the old index cannot be reused
    assert site.metrics["demo_key"] is False and demo.metrics["demo_key"] is True
    series = pd.read_parquet(out / "series.parquet")
    assert (series["key_id"] == site.metrics["key_id"]).all()
    import pyarrow.parquet as pq

    assert pq.read_schema(out / "series.parquet").metadata[b"fedct.demo_key"] == b"false"


def test_site_rules(tmp_path: Path) -> None:
    files = pd.DataFrame({"relpath": ["A/s/x.dcm", "B/s/y.dcm", "z.dcm", "B/s/w.dcm"],
                          "institution": ["Hospital A", "Hôpital B", None, " Hospital A "]})
    assert cat.site_of(files, "folder").tolist() == ["A", "B", "UNKNOWN", "B"]
    assert cat.site_of(files, "folder", level=1).tolist() == ["s", "s", "UNKNOWN", "s"]
    assert cat.site_of(files, "institution").tolist() == [
        "Hospital A", "Hôpital B", "UNKNOWN", "Hospital A"]
    mapping_csv = tmp_path / "sites.csv"
    mapping_csv.write_text("key,site\nHospital A,SITE1\nB,SITE2\n")
    mapping = cat.load_site_mapping(mapping_csv)
    assert cat.site_of(files, "mapping", mapping=mapping).tolist() == [
        "SITE1", "SITE2", "UNKNOWN", "SITE1"]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,where\n")
    with pytest.raises(ValueError, match="key,site"):
        cat.load_site_mapping(bad)
    with pytest.raises(ValueError, match="site_mapping"):
        cat.run(CatalogueParams(site_rule="mapping"), tmp_path, tmp_path / "o", track=False)


def test_pydicom_test_files_are_all_accounted_for(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(cat.KEY_ENV, raising=False)
    root = tmp_path / "odd"
    copied = copy_testdata(root)
    result = cat.run(dataclasses.replace(PARAMS, workers=1), root, tmp_path / "out",
                     track=False, progress=False)
    m = result.metrics
    assert m["n_files"] == len(copied)
    assert m["n_catalogued_files"] + m["n_rejects"] == m["n_files"]
    rejects = pd.read_parquet(tmp_path / "out" / "rejects.parquet")
    assert rejects["reason"].isin(dicom.REJECT_REASONS).all()
    assert "CT_small.dcm" not in set(rejects["path"])  # a CT image: catalogued
    assert m["n_series"] >= 1


def test_archive_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        cat.run(PARAMS, tmp_path / "missing", tmp_path / "out", track=False)


def test_a_second_scan_of_one_index_is_refused(tmp_path: Path) -> None:
    with cat.FileIndex(tmp_path / "idx", "demo"):
        with pytest.raises(RuntimeError, match="in use"):
            cat.FileIndex(tmp_path / "idx", "demo")


def test_walk_is_lazy_sorted_and_skips_outputs(tmp_path: Path) -> None:
    for rel in ("b/2.dcm", "b/1.dcm", "a/x/3.dcm", "out/skip.dcm", "top.dcm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # must not be followed
    walked = cat.walk_archive(tmp_path, exclude=[tmp_path / "out"])
    assert not isinstance(walked, list)
    # Depth first, names sorted, a directory's files before its subdirectories.
    assert [rel for rel, _, _ in walked] == ["top.dcm", "a/x/3.dcm", "b/1.dcm", "b/2.dcm"]
