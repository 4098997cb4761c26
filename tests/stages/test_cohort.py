"""Cohort selection, patient-level splits, and the series read from the catalogue."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from fedct.catalogue.pseudonym import KEY_ENV
from fedct.config import CatalogueParams, CohortParams
from fedct.errors import FedctError
from fedct.stages import catalogue as catalogue_stage
from fedct.stages import cohort as cohort_stage
from fedct.stages.cohort import one_site_per_patient, select_series, split_patients
from tests.dicom.writers import FAKE_PATIENTS, write_series


def _catalogue(n_sites: int = 4, n_patients: int = 9, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sites):
        site = "ABCDEFGHIJ"[s]
        for p in range(n_patients):
            for st in range(rng.integers(1, 3)):  # 1-2 studies per patient
                study = f"{site}-p{p}-s{st}"
                for se in range(3):
                    rows.append(dict(site=site, patient_key=f"{site}-p{p}", study_key=study,
                                     series_key=f"{study}-se{se}", usable=se != 2,
                                     n_slices=[80, 120, 20][se],
                                     slice_thickness=[1.0, 2.0, 5.0][se],
                                     series_number=se + 2))
    return pd.DataFrame(rows)


def test_one_series_per_study_by_the_documented_rule() -> None:
    cat = _catalogue()
    chosen = select_series(cat)
    assert chosen["study_key"].is_unique
    assert set(chosen["study_key"]) == set(cat["study_key"])
    assert chosen["usable"].all()
    assert (chosen["n_slices"] == 120).all()  # most slices wins over thinner slices
    tie = cat.assign(n_slices=100)
    assert (select_series(tie)["slice_thickness"] == 1.0).all()  # then thinnest


def test_split_is_by_patient_and_deterministic() -> None:
    params = CohortParams(holdout_sites=("D",), seed=3)
    chosen = select_series(_catalogue())
    a = split_patients(chosen, params)
    b = split_patients(chosen.sample(frac=1.0, random_state=1), params)
    key = ["series_key", "split"]
    pd.testing.assert_frame_equal(a[key].sort_values(key).reset_index(drop=True),
                                  b[key].sort_values(key).reset_index(drop=True))
    # No patient in two splits.
    assert (a.groupby("patient_key")["split"].nunique() == 1).all()
    for site, g in a[a["role"] == "train"].groupby("site"):
        counts = g.drop_duplicates("patient_key")["split"].value_counts()
        assert counts.get("test", 0) >= 1 and counts.get("val", 0) >= 1, site
        assert counts.get("train", 0) >= counts.get("test", 0)
    held = a[a["site"] == "D"]
    assert (held["split"] == "test").all() and (held["role"] == "holdout").all()
    other = split_patients(chosen, dataclasses.replace(params, seed=4))
    assert not other["split"].equals(a["split"])


def test_calibration_patients_are_kept_apart() -> None:
    params = CohortParams(holdout_sites=())
    a = split_patients(select_series(_catalogue(n_sites=2, n_patients=8)), params)
    for _, g in a.groupby("site"):
        per_patient = g.groupby("patient_key")["split"].nunique()
        assert (per_patient == 1).all()  # a patient lies in one split only
        counts = g.drop_duplicates("patient_key")["split"].value_counts().to_dict()
        assert counts == {"train": 4, "test": 2, "val": 1, "calib": 1}
    none = split_patients(select_series(_catalogue(n_sites=1, n_patients=8)),
                          dataclasses.replace(params, calib_fraction=0.0))
    assert "calib" not in set(none["split"])


def test_unlabelled_sites_are_marked() -> None:
    params = CohortParams(holdout_sites=(), unlabelled_sites=("B",))
    a = split_patients(select_series(_catalogue()), params)
    assert not a.loc[a["site"] == "B", "labelled"].any()
    assert a.loc[a["site"] != "B", "labelled"].all()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_small_sites_still_get_a_training_patient(n: int) -> None:
    a = split_patients(select_series(_catalogue(n_sites=1, n_patients=n)), CohortParams())
    assert (a.drop_duplicates("patient_key")["split"] == "train").sum() >= 1


def _catalogued_archive(tmp_path: Path) -> tuple[Path, Path]:
    """Two sites x two patients (four people), one usable 34-slice series each;
    catalogued, and the catalogue's per-file index deleted (the cohort must not need it)."""
    archive = tmp_path / "archive"
    for site in "AB":
        for i, patient in enumerate(FAKE_PATIENTS[:2]):
            # Head first: IM00001 is the top slice, so file names are not in slice order.
            # Each site's own patients: one PatientID at both would be one patient, kept
            # at one site only (test_a_patient_at_several_sites_is_kept_at_one_site_only).
            write_series(archive / site / f"ST{i}" / "SE2", 34, positions=range(33, -1, -1),
                         patient={**patient, "id": f"{patient['id']}-{site}"})
    catalogue = tmp_path / "catalogue"
    catalogue_stage.run(CatalogueParams(workers=1), archive, catalogue,
                        index_dir=tmp_path / "index", track=False, progress=False)
    shutil.rmtree(tmp_path / "index")
    return archive, catalogue


def test_cohort_reads_each_series_from_the_catalogues_series_files(tmp_path: Path,
                                                                   monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's artifact store goes under the working dir
    archive, catalogue = _catalogued_archive(tmp_path)
    files = pd.read_parquet(catalogue / "paths" / "series_files.parquet")
    series = pd.read_parquet(catalogue / "series.parquet")
    assert series["usable"].sum() == 4
    assert (files.groupby("series_key").size() == 34).all()
    read: list[list[str]] = []
    real_read_volume = cohort_stage.read_volume

    def spy(root: Path, relpaths: list[str]):
        read.append(list(relpaths))
        return real_read_volume(root, relpaths)

    monkeypatch.setattr(cohort_stage, "read_volume", spy)
    params = CohortParams(holdout_sites=(), spacing_mm=(1.4, 1.4, 2.0), roi_size=(8, 8, 16))
    out = tmp_path / "cohort"
    cohort = cohort_stage.run(params, CatalogueParams(workers=1), catalogue, archive, None,
                              out)
    assert len(cohort) == 4
    expected = {k: g.sort_values("slice")["relpath"].tolist()
                for k, g in files.groupby("series_key")}
    assert sorted(read) == sorted(expected[k] for k in cohort["series_key"])
    assert all(r[0].endswith("IM00034.dcm") for r in read)  # z = 0 first: slice order
    assert all((out / "cases" / f"{k}.npz").is_file() for k in cohort["series_key"])


def test_cohort_input_errors_are_fedct_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    archive, catalogue = _catalogued_archive(tmp_path)
    with pytest.raises(FedctError, match=r"sites \['Z'\] are not in"):
        cohort_stage.run(CohortParams(holdout_sites=("Z",)), CatalogueParams(), catalogue,
                         archive, None, tmp_path / "cohort")
    keys = pd.read_parquet(catalogue / "series.parquet")["series_key"]
    with pytest.raises(FedctError, match="no files for 1 series"):
        cohort_stage.series_files(catalogue / "paths", [*keys, "0" * 32])
    (catalogue / "paths" / "series_files.parquet").unlink()
    # As in a clone that has the pushed catalogue but not the site's file lists.
    with pytest.raises(FedctError, match=r"series_files.parquet: missing.*rerun `fedct "
                                         r"catalogue`"):
        cohort_stage.run(CohortParams(holdout_sites=()), CatalogueParams(), catalogue,
                         archive, None, tmp_path / "cohort")
    not_dicom = archive / "A" / "ST0" / "SE2" / "IM00001.dcm"
    not_dicom.write_bytes(b"not a DICOM file")
    with pytest.raises(FedctError, match="A/ST0/SE2"):
        cohort_stage.read_volume(archive, ["A/ST0/SE2/IM00001.dcm", "A/ST0/SE2/IM00002.dcm"])


def test_a_catalogue_made_with_another_pseudonym_key_is_refused(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Labels are matched by pseudonymised Series UID: under another key none would match,
    and the cohort would silently have no labels."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    archive, catalogue = _catalogued_archive(tmp_path)  # demo key
    monkeypatch.setenv(KEY_ENV, "a site secret that is not the demo key")
    with pytest.raises(FedctError, match=r"series.parquet: catalogued with pseudonym key"):
        cohort_stage.run(CohortParams(holdout_sites=()), CatalogueParams(), catalogue,
                         archive, None, tmp_path / "cohort")


def _grid_image(size=(8, 6, 4), spacing=(0.8, 0.8, 2.0), origin=(-3.2, -2.4, 10.0),
                direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    img = sitk.Image(list(size), sitk.sitkUInt8)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


@pytest.mark.parametrize(("change", "reason"), [
    ({"size": (8, 6, 5)}, "size"),
    ({"spacing": (0.8, 0.8, 2.5)}, "spacing"),
    ({"direction": (-1, 0, 0, 0, 1, 0, 0, 0, 1), "origin": (2.4, -2.4, 10.0)}, "flipped axes"),
    ({"origin": (-3.2, -2.4, 12.0)}, "origin"),
])
def test_a_label_off_its_series_grid_is_refused_by_name(tmp_path: Path, change: dict,
                                                        reason: str) -> None:
    """Resampled alone, such a label would land mirrored or shifted on the image."""
    image = _grid_image()
    path = tmp_path / "1.2.3.nii.gz"
    sitk.WriteImage(_grid_image(**change), str(path))
    with pytest.raises(FedctError, match=rf"1\.2\.3\.nii\.gz: the label map is not on .*{reason}"):
        cohort_stage.read_label(path, image)


def test_a_label_on_its_series_grid_is_read_and_a_corrupt_one_named(tmp_path: Path) -> None:
    image = _grid_image()
    good = tmp_path / "good.nii.gz"
    # NIfTI keeps the origin in float32: a difference far below a voxel is the same grid.
    sitk.WriteImage(_grid_image(origin=(-3.2 + 1e-5, -2.4, 10.0)), str(good))
    assert cohort_stage.read_label(good, image).GetSize() == image.GetSize()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a NIfTI file")
    with pytest.raises(FedctError, match=r"bad\.nii\.gz: cannot read the label map"):
        cohort_stage.read_label(bad, image)


def test_a_patient_at_several_sites_is_kept_at_one_site_only() -> None:
    # Patients 0-3 of A are also scanned at B (training) or D (held out): the same
    # PatientID at two hospitals (a national patient number) gives the same patient key.
    cat = _catalogue()
    shared = []
    for p, other in ((0, "B"), (1, "B"), (2, "D"), (3, "D")):
        rows = cat[cat["patient_key"] == f"A-p{p}"].copy()
        rows["site"] = other
        rows["study_key"] = rows["study_key"].str.replace("A-", f"{other}-x", regex=False)
        rows["series_key"] = rows["series_key"].str.replace("A-", f"{other}-x", regex=False)
        shared.append(rows)
    cat = pd.concat([cat, *shared], ignore_index=True)
    params = CohortParams(holdout_sites=("D",), seed=3)
    chosen, dropped, n_shared = one_site_per_patient(select_series(cat), params.holdout_sites)
    assert n_shared == 4 and dropped == sum(len(select_series(r)) for r in shared)
    sites = chosen.groupby("patient_key")["site"].agg(set)
    assert (sites.map(len) == 1).all()
    # Held out wins (the held-out test stays whole), else the first site in order.
    assert sites["A-p2"] == sites["A-p3"] == {"D"} and sites["A-p0"] == sites["A-p1"] == {"A"}
    cohort = split_patients(chosen, params)
    assert (cohort.groupby("patient_key")["split"].nunique() == 1).all()
    trained = set(cohort.loc[cohort["role"] == "train", "patient_key"])
    assert not trained & set(cohort.loc[cohort["site"] == "D", "patient_key"])
    # Without such patients nothing changes.
    plain = select_series(_catalogue())
    kept, dropped, n_shared = one_site_per_patient(plain, ("D",))
    assert (dropped, n_shared) == (0, 0) and kept.equals(plain)
    # Between training sites a labelled one wins over an unlabelled one, whatever its name.
    kept, _, _ = one_site_per_patient(select_series(cat), (), unlabelled_sites=("A",))
    assert set(kept.loc[kept["patient_key"] == "A-p0", "site"]) == {"B"}


def _same_ids_everywhere() -> pd.DataFrame:
    """Every site numbers its patients p0, p1, ...: IDs issued per hospital, repeating."""
    cat = _catalogue()
    cat["patient_key"] = cat["patient_key"].str.split("-").str[1]
    return cat


def test_ids_that_repeat_at_every_site_stop_the_cohort_naming_the_setting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keeping each "patient" at one site would empty the training sites: not shared
    # patients but per-hospital IDs. The stage stops and names cohort.shared_patients.
    catalogue = tmp_path / "catalogue"
    catalogue.mkdir()
    _same_ids_everywhere().assign(key_id="k").to_parquet(catalogue / "series.parquet")
    params = CohortParams(holdout_sites=("D",))
    with pytest.raises(FedctError, match=r"series.parquet: 9 patient keys appear at several "
                                         r"sites.*9 of 9 patients from site A.*set "
                                         r"cohort.shared_patients: per_site"):
        cohort_stage.run(params, CatalogueParams(), catalogue, tmp_path, None, tmp_path / "o")
    # per_site: every site splits its own patients, as before.
    per_site = split_patients(select_series(_same_ids_everywhere()), params)
    assert set(per_site["site"]) == set("ABCD")
    assert (per_site[per_site["site"] != "D"].groupby("site")["split"].nunique() == 4).all()


def test_held_out_patients_split_into_disjoint_adapt_and_test_cases() -> None:
    from fedct.analysis.heldout import heldout_test_cases
    from fedct.data.cases import adaptation_cases, evaluation_cases

    chosen = select_series(_catalogue(n_sites=3, n_patients=16))
    params = CohortParams(holdout_sites=("C",), adapt_fraction=0.5, control_sites=("C",))
    a = split_patients(chosen, params).assign(has_label=True)
    held = a[a["site"] == "C"].drop_duplicates("patient_key")["split"].value_counts()
    assert held.to_dict() == {"adapt": 8, "test": 8}
    assert (a.groupby("patient_key")["split"].nunique() == 1).all()
    adapted = set(adaptation_cases(a)["series_key"])
    assert adapted and adapted == set(a.loc[a["split"] == "adapt", "series_key"])
    assert not adapted & set(heldout_test_cases(a)["series_key"])
    assert not adapted & set(evaluation_cases(a)["series_key"])
    # Today's design (adapt_fraction 0): every held-out patient is a test case.
    today = split_patients(chosen, dataclasses.replace(params, adapt_fraction=0.0))
    assert (today.loc[today["site"] == "C", "split"] == "test").all()


def test_min_calib_gives_every_training_site_that_many_calibration_patients() -> None:
    chosen = select_series(_catalogue(n_sites=2, n_patients=16))
    params = CohortParams(holdout_sites=(), min_calib=4)
    a = split_patients(chosen, params)
    for _, g in a.groupby("site"):
        counts = g.drop_duplicates("patient_key")["split"].value_counts().to_dict()
        assert counts == {"train": 6, "test": 4, "val": 2, "calib": 4}
    # A site too small to spare them keeps a train, val and test patient.
    small = split_patients(select_series(_catalogue(n_sites=1, n_patients=5)), params)
    counts = small.drop_duplicates("patient_key")["split"].value_counts().to_dict()
    assert counts["train"] >= 1 and counts["val"] >= 1 and counts["test"] >= 1


def test_control_sites_must_be_held_out() -> None:
    from fedct.config import ConfigError, check

    with pytest.raises(ConfigError, match="cohort.control_sites"):
        check(CohortParams(holdout_sites=("C", "G"), control_sites=("H",)), "cohort")
