"""``fedct catalogue`` then ``fedct cohort`` over hostile series beside good ones (security
issue #24): the run completes, each hostile series is rejected with its reason, every good
series is prepared, and two patients sharing a SeriesInstanceUID stay two cases."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from fedct.catalogue import PATHS_DIRNAME
from fedct.catalogue.pseudonym import KEY_ENV
from fedct.config import CatalogueParams, CohortParams
from fedct.data.cases import case_path, load_case
from fedct.stages import catalogue as catalogue_stage
from fedct.stages import cohort as cohort_stage
from tests.dicom.writers import FAKE_PATIENTS, write_deflate_bomb, write_series

PARAMS = CohortParams(holdout_sites=(), spacing_mm=(1.4, 1.4, 2.0), roi_size=(8, 8, 16))


def _patient(i: int) -> dict:
    p = FAKE_PATIENTS[i % 3]
    return {**p, "id": f"{p['id']}-{i}"}


def _edit(paths: list[Path], **changes: object) -> None:
    for f in paths:
        ds = pydicom.dcmread(f)
        for kw, value in changes.items():
            setattr(ds, kw, value)
        ds.save_as(f)


def _archive(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Site A: patients 0-3 each with one good 34-slice study; per attack one more
    patient whose only series is hostile. Returns the good and the hostile series'
    SeriesInstanceUIDs by name."""
    good, hostile = {}, {}
    for i in range(4):
        uid = generate_uid()
        paths = write_series(root / "A" / f"P{i}" / "SE1", 34, series_uid=uid,
                             patient=_patient(i))
        good[f"P{i}"] = uid
    # One file name of patient 3 is not UTF-8: a good series still.
    os.rename(paths[3], os.fsencode(root) + b"/A/P3/SE1/IM\xe9\xff.dcm")
    attacks = {
        "huge": {"Rows": 65535, "Columns": 65535},
        "nan_thickness": {"SliceThickness": "NaN"},
        "negative_thickness": {"SliceThickness": "-1"},
        "nan_spacing": {"SpacingBetweenSlices": "NaN"},
    }
    for j, (name, changes) in enumerate(attacks.items()):
        uid = generate_uid()
        _edit(write_series(root / "A" / f"H{j}" / name, 34, series_uid=uid,
                           patient=_patient(10 + j)), **changes)
        hostile[name] = uid
    uid = generate_uid()
    write_series(root / "A" / "H9" / "bomb", 33, series_uid=uid, patient=_patient(19))
    write_deflate_bomb(root / "A" / "H9" / "bomb" / "IM00034.dcm", 64 << 20, z=33,
                       series_uid=uid, patient=_patient(19))
    hostile["bomb"] = uid
    return good, hostile


def _run(tmp_path: Path, archive: Path, labels: Path | None = None) -> pd.DataFrame:
    catalogue = tmp_path / "catalogue"
    catalogue_stage.run(CatalogueParams(workers=1), archive, catalogue,
                        index_dir=tmp_path / "index", track=False, progress=False)
    return cohort_stage.run(PARAMS, CatalogueParams(workers=1), catalogue, archive, labels,
                            tmp_path / "cohort")


def test_hostile_series_cost_themselves_and_every_good_series_is_prepared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    archive = tmp_path / "archive"
    good, hostile = _archive(archive)
    cohort = _run(tmp_path, archive)
    # Every good series, the one with a non-UTF-8 file name too, is a prepared case; the
    # bomb cost only itself: its series' 33 other slices are a case too.
    assert cohort["patient_key"].nunique() == len(good) + 1 == len(cohort)
    assert sorted(cohort["n_slices"]) == [33] + [34] * len(good)
    for key in cohort["series_key"]:
        assert load_case(case_path(tmp_path / "cohort", key))["image"].shape == (1, 8, 8, 16)
    assert pd.read_csv(tmp_path / "cohort" / "rejects.csv").empty
    series = pd.read_parquet(tmp_path / "catalogue" / "series.parquet")
    assert series["n_files"].sum() == 4 * 34 + 33
    # The site's own copy names the files (the pushed one keys them by a hash).
    rejects = pd.read_parquet(tmp_path / "catalogue" / PATHS_DIRNAME / "rejects.parquet")
    reasons = rejects.groupby(rejects["path"].str.split("/").str[2])["reason"].agg(set)
    assert reasons.to_dict() == {name: {"implausible value"} for name in hostile}
    assert (rejects["path"].str.startswith("A/H9/bomb/")).sum() == 1  # the bomb alone


def test_a_series_the_cohort_cannot_prepare_is_rejected_and_its_study_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the catalogue cannot see (files changed after it ran, a label off its grid)
    is rejected by the cohort with a reason that holds no path; the study's next
    usable series takes the place of its chosen one."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    archive, labels = tmp_path / "archive", tmp_path / "labels"
    study = generate_uid()
    broken = write_series(archive / "A" / "P0" / "SE1", 40, study_uid=study,
                          patient=_patient(0))  # most slices: chosen first
    stand_in = write_series(archive / "A" / "P0" / "SE2", 34, study_uid=study,
                            patient=_patient(0))
    uid_off_grid = generate_uid()
    write_series(archive / "A" / "P1" / "SE1", 34, series_uid=uid_off_grid,
                 patient=_patient(1))
    write_series(archive / "A" / "P2" / "SE1", 34, patient=_patient(2))
    labels.mkdir()
    (labels / "labels.json").write_text('{"0": "background", "1": "muscle"}')
    off = sitk.Image([9, 9, 34], sitk.sitkUInt8)  # the series is 8 x 8
    sitk.WriteImage(off, str(labels / f"{uid_off_grid}.nii.gz"))
    catalogue = tmp_path / "catalogue"
    catalogue_stage.run(CatalogueParams(workers=1), archive, catalogue,
                        index_dir=tmp_path / "index", track=False, progress=False)
    for f in broken[10:12]:
        f.write_bytes(f.read_bytes()[:300])  # cut after the catalogue ran
    cohort = cohort_stage.run(PARAMS, CatalogueParams(workers=1), catalogue, archive, labels,
                              tmp_path / "cohort")
    assert len(cohort) == 2 and cohort["n_slices"].tolist().count(34) == 2
    rejected = pd.read_csv(tmp_path / "cohort" / "rejects.csv")
    assert len(rejected) == 2
    text = " ".join(rejected["reason"])
    assert "SimpleITK could not read it" in text and "not on its series' voxel grid" in text
    assert str(tmp_path) not in text and "P0" not in text and uid_off_grid not in text
    files = pd.read_parquet(catalogue / PATHS_DIRNAME / "series_files.parquet")
    prepared = files[files["series_key"].isin(cohort["series_key"])]
    assert {Path(p).parent.name for p in prepared["relpath"]} == {"SE2", "SE1"}
    assert f"A/P0/SE2/{stand_in[0].name}" in set(prepared["relpath"])
    assert pd.read_json(tmp_path / "cohort" / "metrics.json", typ="series")[
        "n_series_rejected"] == 2


def test_two_patients_sharing_a_series_uid_are_two_cases_never_one_volume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    archive = tmp_path / "archive"
    uid = generate_uid()
    for i, z0 in ((0, 0.0), (1, 0.5)):  # interleaved positions, the same geometry
        write_series(archive / "A" / f"P{i}" / "SE1", 34, series_uid=uid, z0=z0,
                     patient=_patient(i))
    cohort = _run(tmp_path, archive)
    assert len(cohort) == 2 and cohort["patient_key"].nunique() == 2
    assert (cohort["n_slices"] == 34).all()
    for key in cohort["series_key"]:
        image = load_case(case_path(tmp_path / "cohort", key))["image"]
        assert np.isfinite(image).all()
