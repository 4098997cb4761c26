"""The archive walk and the incremental per-file index."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fedct import dicom
from fedct.catalogue import index as idx
from fedct.catalogue import scan as scan_mod
from fedct.catalogue import series as series_mod
from fedct.catalogue.pathids import path_holds_id
from fedct.catalogue.pseudonym import KEY_ENV
from fedct.catalogue.reports import REPORT_FILES
from fedct.errors import FedctError
from fedct.stages import catalogue as stage
from tests.catalogue.archive import PARAMS, assert_no_phi, small_archive
from tests.dicom.writers import FAKE_PATIENTS, write_series
from tests.phi import assert_no_identifiers


def _series_files(out: Path) -> pd.DataFrame:
    files = pd.read_parquet(out / "paths" / "series_files.parquet")
    return files.sort_values(["series_key", "slice"]).reset_index(drop=True)


def test_bounded_memory_paths_give_the_same_catalogue(archive, catalogued, tmp_path: Path,
                                                      monkeypatch) -> None:
    """Tiny limits force what a huge archive does: many parts, compaction, and series
    aggregated bucket by bucket; the tables must not change."""
    root, _ = archive
    result, series, rejects = catalogued
    monkeypatch.setattr(series_mod, "BUCKET_ROWS", 40)
    monkeypatch.setattr(idx, "PART_ROWS", 30)
    monkeypatch.setattr(idx, "MAX_PARTS", 3)
    monkeypatch.setattr(scan_mod, "TASK_FILES", 16)
    params = dataclasses.replace(PARAMS, workers=1, chunk_size=8)
    result2 = stage.run(params, root, tmp_path / "out", track=False, progress=False)
    manifest = json.loads((tmp_path / "out" / "index" / "manifest.json").read_text())
    assert len(manifest["parts"]) > 1  # parts rolled over
    assert sum(manifest["parts"].values()) == result2.metrics["n_files"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "series.parquet"), series)
    pd.testing.assert_frame_equal(pd.read_parquet(result2.rejects_path),
                                  pd.read_parquet(result.rejects_path))
    pd.testing.assert_frame_equal(pd.read_parquet(result2.local_rejects_path), rejects)
    pd.testing.assert_frame_equal(_series_files(tmp_path / "out"),
                                  _series_files(result.out_dir))
    # Small incremental rescans add small parts; beyond MAX_PARTS they are merged.
    extra = tmp_path / "extra"
    shutil.copytree(root, extra)  # same relative paths, sizes and mtimes: nothing to read
    for i in range(2):  # two small parts: the second commit merges them
        write_series(extra / "C" / f"ST9{i}" / "SE1", 1, patient=FAKE_PATIENTS[2])
        again = stage.run(params, extra, tmp_path / "out", track=False, progress=False)
        assert again.scan.n_parsed == 1
    manifest = json.loads((tmp_path / "out" / "index" / "manifest.json").read_text())
    assert sum(n < idx.PART_ROWS // 2 for n in manifest["parts"].values()) <= 1
    assert sum(manifest["parts"].values()) == again.metrics["n_files"]
    assert len(list((tmp_path / "out" / "index").glob("part-*"))) == len(manifest["parts"])


def test_incremental_rescan_reads_only_changed_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's artifact store goes under the working dir
    root, out = tmp_path / "archive", tmp_path / "out"
    small_archive(root)
    params = dataclasses.replace(PARAMS, workers=1, min_slices=4)
    first = stage.run(params, root, out, track=True, progress=False)
    assert first.scan.n_parsed == first.metrics["n_files"] == 11
    assert first.metrics["n_usable"] == 2
    second = stage.run(params, root, out, track=False, progress=False)
    assert second.scan.n_parsed == 0 and second.up_to_date
    assert second.metrics == first.metrics
    # Change one file, add one, delete one.
    changed = root / "A" / "ST1" / "SE1" / "IM00002.dcm"
    changed.write_bytes(changed.read_bytes()[:-10])  # now truncated
    (root / "B" / "ST1" / "SE1" / "IM00005.dcm").unlink()
    write_series(root / "B" / "ST2" / "SE1", 1, patient=FAKE_PATIENTS[1])
    third = stage.run(params, root, out, track=False, progress=False)
    assert third.scan.n_parsed == 2 and third.scan.n_dropped == 2
    assert third.metrics["n_files"] == 11
    # A lost a middle slice (irregular spacing now); B lost its last one (4 left).
    assert third.metrics["n_usable"] == 1
    rejects = pd.read_parquet(third.local_rejects_path)
    assert dict(zip(rejects["path"], rejects["reason"], strict=True))[
        "A/ST1/SE1/IM00002.dcm"] == dicom.TRUNCATED
    files = pd.read_parquet(third.series_files_path)
    assert "A/ST1/SE1/IM00002.dcm" not in set(files["relpath"])
    assert "B/ST1/SE1/IM00005.dcm" not in set(files["relpath"])
    # New parameters, same files: nothing is re-read, the tables are rebuilt.
    fourth = stage.run(dataclasses.replace(params, min_slices=5), root, out, track=False,
                       progress=False)
    assert fourth.scan.n_parsed == 0 and not fourth.up_to_date
    assert fourth.metrics["n_usable"] == 0
    # The tracked run logged the reports, and no identifier went to MLflow either.
    assert any(p.name == "metrics.json" for p in tmp_path.rglob("mlruns/**/*"))
    assert not any(p.name.endswith(".parquet") for p in tmp_path.rglob("mlruns/**/*"))
    assert_no_phi(tmp_path / "mlruns", root)
    assert_no_phi(out, root)


def test_a_second_scan_of_one_index_is_refused(tmp_path: Path) -> None:
    with idx.FileIndex(tmp_path / "idx", "demo"):
        with pytest.raises(FedctError, match="in use"):
            idx.FileIndex(tmp_path / "idx", "demo")


def test_walk_is_lazy_sorted_and_skips_outputs(tmp_path: Path) -> None:
    for rel in ("b/2.dcm", "b/1.dcm", "a/x/3.dcm", "out/skip.dcm", "top.dcm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # must not be followed
    walked = idx.walk_archive(tmp_path, exclude=[tmp_path / "out"])
    assert not isinstance(walked, list)
    # Depth first, names sorted, a directory's files before its subdirectories.
    assert [rel for rel, _, _ in walked] == ["top.dcm", "a/x/3.dcm", "b/1.dcm", "b/2.dcm"]


def test_paths_named_after_patients_are_counted_and_warned_about(tmp_path: Path) -> None:
    """An export laid out as <PatientID>/<study>/: the catalogue works as before, counts
    the files whose path holds their PatientID, warns at every run (rebuilt or not), and
    keeps the ID out of the reports and metrics (only the path tables hold it)."""
    root = tmp_path / "archive"
    p0, p1, p2 = FAKE_PATIENTS[:3]
    write_series(root / "A" / p0["id"] / "SE1", 5, patient=p0)
    write_series(root / "A" / "ST2" / "SE1", 5, patient=p1)  # a UID-style path
    # Named by the patient's name and birth date ("Thirdfake^Human", 19030405).
    family, given = p2["name"].split("^")
    write_series(root / "A" / f"{family}_{given}_{p2['birth']}" / "SE1", 5, patient=p2)
    # A name with letters beyond ASCII (decoded by the file's character set, ISO_IR 100),
    # and a de-identified "ANONYMOUS" in an "anonymous" folder: no person named there.
    umlaut = {**p1, "name": "Müller^Jörg", "id": "FAKEID-55555"}
    write_series(root / "B" / "mueller" / "müller" / "SE1", 5, patient=umlaut)
    anon = {**p1, "name": "ANONYMOUS", "id": "FAKEID-66666"}
    write_series(root / "B" / "anonymous" / "SE1", 5, patient=anon)
    params = dataclasses.replace(PARAMS, min_slices=5)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="paths of 15 files contain their own PatientID, a "
                                         "part of the PatientName or the PatientBirthDate"):
        first = stage.run(params, root, out, track=False, progress=False)
    assert first.metrics["n_paths_with_patient_id"] == 15 and first.metrics["n_usable"] == 5
    with pytest.warns(UserWarning, match="paths of 15 files"):
        again = stage.run(params, root, out, track=False, progress=False)
    assert again.up_to_date
    files = pd.read_parquet(again.series_files_path)
    assert files["relpath"].str.contains(p0["id"]).sum() == 5  # still readable by cohort
    # The name and birth date were compared, never stored: only the path tables hold them.
    assert_no_identifiers([out / name for name in REPORT_FILES],
                          [p["id"] for p in (p0, p1, p2)] + [p2["name"], p2["birth"]])
    series = pd.read_parquet(out / "series.parquet")
    assert not series.astype(str).apply(
        lambda c: c.str.contains(family, case=False) | c.str.contains(p2["birth"])).any().any()


def test_an_id_is_a_path_match_only_as_a_whole_token_of_4_or_more_characters() -> None:
    assert path_holds_id("site/fakeid-90210/SE1/IM1.dcm", "FAKEID-90210")
    assert path_holds_id("site/FAKEID-90210_CT/IM1.dcm", "FAKEID-90210")
    assert path_holds_id("site/x/FAKEID-90210", "FAKEID-90210")
    assert not path_holds_id("site/ST1/123456789/IM1.dcm", "45678")  # inside a number
    assert not path_holds_id("site/ST12/SE12/IM12.dcm", "12")  # under 4 characters
    assert not path_holds_id("site/FAKEID-31337/IM1.dcm", "FAKEID-90210")
    assert not path_holds_id("site/ST1/IM1.dcm", None)


def test_a_name_part_or_birth_date_is_a_path_match_only_as_a_whole_token() -> None:
    name, birth = "Doe^John Paul", "19650312"
    assert path_holds_id("site/DOE^JOHN/IM1.dcm", "X1", name)
    assert path_holds_id("site/Doe_John_19650312/IM1.dcm", "X1", name, birth)
    assert path_holds_id("site/paul/IM1.dcm", "X1", name)
    assert path_holds_id("site/x/19650312/IM1.dcm", "X1", None, birth)
    assert path_holds_id("site/1965-03-12_CT/IM1.dcm", "X1", None, birth)
    assert not path_holds_id("site/Doeville/IM1.dcm", "X1", name)  # inside another word
    assert not path_holds_id("site/Li/IM1.dcm", "X1", "Li^Al")  # too short to compare
    assert not path_holds_id("site/ST1/2019650312/IM1.dcm", "X1", None, birth)  # in a number
    assert not path_holds_id("site/ST1/IM1.dcm", "X1", name, birth)
    # PN groups and values; placeholders and parts that are not words are not names.
    assert path_holds_id("site/yamada/IM1.dcm", "X1", "Yamada^Tarou=山田^太郎")
    assert path_holds_id("site/smith/IM1.dcm", "X1", "Doe\\Smith")
    assert not path_holds_id("site/anonymous/IM1.dcm", "X1", "ANONYMOUS")
    assert not path_holds_id("site/patient_001/IM1.dcm", "X1", "PATIENT^001")
