"""The synthetic archive: real, readable DICOM with labels, distractors and known shift."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from fedct.catalogue.series import spacing_regular
from fedct.data.labels import read_labels
from fedct.errors import FedctError
from fedct.synth.anatomy import STRUCTURES
from fedct.synth.archive import generate


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    assert len(ids) == 1, f"{folder}: expected one series, got {ids}"
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), ids[0]))
    return reader.Execute()


@pytest.mark.slow
def test_generation_is_byte_identical(tiny_archive: dict[str, Path], tmp_path: Path) -> None:
    again = {k: tmp_path / k for k in ("archive", "labels", "truth")}
    generate(again["archive"], again["labels"], again["truth"], "tiny", seed=11, workers=1)
    for key in ("archive", "labels"):
        a = sorted(p.relative_to(tiny_archive[key]) for p in tiny_archive[key].rglob("*")
                   if p.is_file())
        b = sorted(p.relative_to(again[key]) for p in again[key].rglob("*") if p.is_file())
        assert a == b
        _, mismatch, errors = filecmp.cmpfiles(tiny_archive[key], again[key],
                                               [str(p) for p in a], shallow=False)
        assert not mismatch and not errors
    series = pd.read_csv(tiny_archive["truth"] / "series.csv")
    assert series.equals(pd.read_csv(again["truth"] / "series.csv"))


@pytest.mark.slow
def test_other_seed_gives_other_archive(tiny_archive: dict[str, Path], tmp_path: Path) -> None:
    generate(tmp_path / "a", tmp_path / "l", tmp_path / "t", "tiny", seed=12, workers=1)
    ours = pd.read_csv(tiny_archive["truth"] / "series.csv")["series_uid"]
    theirs = pd.read_csv(tmp_path / "t" / "series.csv")["series_uid"]
    assert not set(ours) & set(theirs)


def test_usable_series_read_as_3d_volumes_with_labels(tiny_archive: dict[str, Path]) -> None:
    truth = pd.read_csv(tiny_archive["truth"] / "series.csv")
    usable = truth[truth["usable"]]
    assert len(usable) == 30 and set(usable["site"]) == set("ABCDEFGHIJ")
    femur_minus_muscle = []
    for _, row in usable.iterrows():
        img = _read_series(tiny_archive["archive"] / row["path"])
        assert img.GetSize()[2] == row["n_slices"] >= 32
        assert img.GetSpacing()[2] == pytest.approx(row["slice_thickness_mm"], abs=1e-3)
        assert img.GetSpacing()[0] == pytest.approx(row["pixel_spacing_mm"], abs=1e-4)
        lab_img = sitk.ReadImage(str(tiny_archive["labels"] / row["label"]))
        assert lab_img.GetSize() == img.GetSize()
        assert np.allclose(lab_img.GetOrigin(), img.GetOrigin(), atol=1e-3)
        hu = sitk.GetArrayFromImage(img).astype(float)
        lab = sitk.GetArrayFromImage(lab_img)
        assert set(np.unique(lab)) <= set(range(len(STRUCTURES) + 1))
        assert (lab == 2).any() and (lab == 7).any()
        assert hu.min() >= -1024 and hu.max() <= 3071  # HU after rescale
        muscle = hu[np.isin(lab, [7, 8, 9])].mean()
        femur_minus_muscle.append(hu[lab == 2].mean() - muscle)
        if not row["unilateral"]:
            assert hu[:, :2, :2].mean() < -800  # corners are air
    # Labels overlay the anatomy: bone is far denser than muscle on every series.
    assert min(femur_minus_muscle) > 150


def test_distractors_are_present(tiny_archive: dict[str, Path]) -> None:
    truth = pd.read_csv(tiny_archive["truth"] / "series.csv")
    kinds = set(truth["kind"])
    assert {"localizer", "coronal", "sagittal", "thick", "dose_sr", "axial"} <= kinds
    assert not truth.loc[truth["kind"] != "axial", "usable"].any()
    assert (truth.loc[truth["kind"] == "thick", "n_slices"] < 32).all()
    assert (truth.loc[truth["kind"] == "coronal", "n_slices"] >= 8).all()
    # A reformat's planes are evenly spaced, as a scanner's MPR writes them: the catalogue
    # rejects it for its orientation alone, not also for irregular spacing.
    for rel in truth.loc[truth["kind"].isin(["coronal", "sagittal"]), "path"]:
        planes = [pydicom.dcmread(f, stop_before_pixels=True)
                  for f in (tiny_archive["archive"] / rel).iterdir()]
        normal = np.cross(*np.reshape(np.asarray(planes[0].ImageOrientationPatient,
                                                 dtype=float), (2, 3)))
        gaps = np.diff(sorted(float(np.dot(ds.ImagePositionPatient, normal)) for ds in planes))
        assert spacing_regular(gaps.min(), gaps.max(), np.median(gaps)), (rel, gaps)
    files = pd.read_csv(tiny_archive["truth"] / "files.csv")
    assert {"corrupt", "truncated_pixels", "truncated_header", "duplicate", "not_dicom"} <= set(
        files["kind"])
    for rel in files.loc[files["kind"] == "corrupt", "path"]:
        with pytest.raises(pydicom.errors.InvalidDicomError):
            pydicom.dcmread(tiny_archive["archive"] / rel)
    compressed = truth[truth.get("compressed", False) == True]  # noqa: E712
    assert len(compressed) >= 1
    first = next((tiny_archive["archive"] / compressed.iloc[0]["path"]).iterdir())
    assert pydicom.dcmread(first).file_meta.TransferSyntaxUID.is_compressed


def test_headers_carry_fake_phi_and_vendor_spellings(tiny_archive: dict[str, Path]) -> None:
    phi = pd.read_csv(tiny_archive["truth"] / "phi.csv", dtype=str)
    truth = pd.read_csv(tiny_archive["truth"] / "series.csv")
    row = truth[truth["usable"]].iloc[0]
    ds = pydicom.dcmread(next((tiny_archive["archive"] / row["path"]).iterdir()))
    assert ds.PatientID in set(phi["patient_id"])
    assert ds.AccessionNumber in set(phi["accession"])
    manufacturers = set(truth["manufacturer"])
    assert {"TOSHIBA", "GE MEDICAL SYSTEMS", "Philips", "SIEMENS"} <= manufacturers
    # The ground truth itself holds no identifier.
    text = (tiny_archive["truth"] / "series.csv").read_text()
    for col in ("name", "patient_id", "accession"):
        assert not any(v in text for v in phi[col])


def test_injected_shift_sites_are_recorded(tiny_archive: dict[str, Path]) -> None:
    truth = pd.read_csv(tiny_archive["truth"] / "series.csv")
    usable = truth[truth["usable"]]
    by_site = usable.groupby("site")
    # G: 80 kVp + arterial contrast, low dose: most low-frequency noise, fewest photons.
    assert by_site["kvp"].mean().idxmin() == "G"
    assert set(usable.loc[usable["site"] == "G", "contrast"]) == {"arterial"}
    assert by_site["noise_sigma_7mm_hu"].mean().idxmax() == "G"
    assert by_site["min_photons"].min().idxmin() in {"C", "G"}
    # C: the orthopaedic OA population, prostheses, unilateral fields of view.
    others = usable.loc[usable["site"] != "C", "infiltration"].mean()
    assert by_site["infiltration"].mean()["C"] > others + 0.15
    assert by_site["oa_severity"].mean().idxmax() == "C"
    assert usable.loc[usable["metal"], "site"].isin(["C"]).all()
    assert by_site["slice_thickness_mm"].mean().idxmax() == "C"
    assert set(usable.loc[usable["shift"].notna() & (usable["shift"] != ""), "site"]) == {"C", "G"}
    summary = json.loads((tiny_archive["truth"] / "summary.json").read_text())
    assert set(summary["shift_sites"]) == {"C", "G"}
    assert "metal_prosthesis" in summary["shift_sites"]["C"]
    assert "low_kvp_contrast" in summary["shift_sites"]["G"]
    factors = pd.read_csv(tiny_archive["truth"] / "factors_by_site.csv", index_col="site")
    assert {"kvp", "mas", "noise_sigma_7mm_hu", "metal_fraction", "unilateral_fraction",
            "contrast", "fov_mm", "truncated_fraction", "infiltration"} <= set(factors.columns)


def test_truth_lists_the_factors_of_every_series(tiny_archive: dict[str, Path]) -> None:
    truth = pd.read_csv(tiny_archive["truth"] / "series.csv")
    usable = truth[truth["usable"]]
    cols = ["kvp", "mas", "kernel_mtf50_lp_cm", "noise_sigma_hu", "noise_sigma_7mm_hu",
            "contrast", "metal", "fov_mm", "truncated_fraction", "scan_top_mm",
            "scan_bottom_mm", "fat_mm", "infiltration", "oa_severity", "wed_mm"]
    assert usable[cols].notna().all().all()
    # The header says what the truth says.
    for _, row in usable.groupby("site").head(1).iterrows():
        ds = pydicom.dcmread(next((tiny_archive["archive"] / row["path"]).iterdir()))
        assert float(ds.KVP) == row["kvp"]
        assert int(ds.Exposure) == round(row["mas"])
        assert ("ContrastBolusAgent" in ds) == (row["contrast"] != "none")


def test_labels_json_matches_the_label_maps(tiny_archive: dict[str, Path]) -> None:
    labels = json.loads((tiny_archive["labels"] / "labels.json").read_text())
    assert labels["0"] == "background"
    codes = labels.pop("codes")
    assert {int(k): v for k, v in labels.items() if k != "0"} == STRUCTURES
    # Every structure has its standard code, and the file reads as a label set with them.
    assert set(codes) == set(STRUCTURES.values())
    label_set = read_labels(tiny_archive["labels"] / "labels.json")
    assert label_set.code(2) == ("SCT", "71341001", "Femur")
    assert 8 <= len(STRUCTURES) <= 12
    truth = pd.read_csv(tiny_archive["truth"] / "series.csv")
    seen: set[int] = set()
    for name in truth.loc[truth["usable"], "label"]:
        seen |= set(np.unique(sitk.GetArrayFromImage(
            sitk.ReadImage(str(tiny_archive["labels"] / name)))).tolist())
    assert seen == {int(k) for k in labels}  # every structure appears somewhere


def test_low_kvp_site_has_brighter_bone(tiny_archive: dict[str, Path]) -> None:
    truth = pd.read_csv(tiny_archive["truth"] / "series.csv")
    usable = truth[truth["usable"]]
    usable = usable[~usable["metal"].astype(bool)]
    bone: dict[str, list[float]] = {}
    for _, row in usable.iterrows():
        hu = sitk.GetArrayFromImage(_read_series(tiny_archive["archive"] / row["path"]))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_archive["labels"] / row["label"])))
        bone.setdefault("G" if row["kvp"] <= 80 else "other", []).append(
            float(np.percentile(hu[lab == 2], 90)))
    assert np.median(bone["G"]) > np.median(bone["other"]) + 150


def test_no_wall_clock_in_files(tiny_archive: dict[str, Path]) -> None:
    """Dates come from the seed: no file carries today's date."""
    today = pd.Timestamp.now().strftime("%Y%m%d").encode()
    for root, _, names in os.walk(tiny_archive["archive"]):
        for name in names[:3]:
            assert today not in (Path(root) / name).read_bytes()


def test_every_profile_keeps_the_usable_rule_meaningful() -> None:
    from fedct.synth.axial import PROFILES
    from fedct.synth.scanners import CONDITIONS, SITES, scan_range

    thickest = max(c.slice_thickness_mm for c in CONDITIONS)
    shortest = min(hi - lo for lo, hi in map(scan_range, SITES))
    for name, p in PROFILES.items():
        assert p.length_mm // p.thick_recon_mm < 32, name  # thick distractor: unusable
        assert p.length_mm * shortest // thickest >= 32, name  # every axial stack: usable


def test_no_site_differs_by_scan_range_alone(tiny_archive: dict[str, Path]) -> None:
    """Every site scans the same extent from the iliac crest: shifts act through the
    image, not through where the anatomy sits in the volume."""
    truth = pd.read_csv(tiny_archive["truth"] / "series.csv")
    axial = truth[truth["usable"]]
    extent = axial["scan_top_mm"] - axial["scan_bottom_mm"]
    assert extent.max() - extent.min() <= 5.0
    top = axial.groupby("site")["scan_top_mm"].mean()
    assert top.max() - top.min() < 15.0


def test_a_folder_it_did_not_write_is_refused_and_left_intact(tmp_path: Path) -> None:
    export = tmp_path / "pacs" / "export"
    export.mkdir(parents=True)
    (export / "IM0001.dcm").write_bytes(b"a real study")
    with pytest.raises(FedctError, match=r"export: exists, is not empty and was not written"):
        generate(tmp_path / "archive", export, tmp_path / "truth", "tiny", seed=11, workers=1)
    assert (export / "IM0001.dcm").read_bytes() == b"a real study"
    assert not (tmp_path / "archive").exists()  # refused before anything was touched


@pytest.mark.slow
def test_its_own_earlier_output_is_replaced(tmp_path: Path) -> None:
    dirs = [tmp_path / "data" / k for k in ("archive", "labels", "truth")]
    generate(*dirs, "tiny", seed=11, workers=1)
    (dirs[0] / "stale.txt").write_text("from an older run")
    summary = generate(*dirs, "tiny", seed=11, workers=1)
    assert not (dirs[0] / "stale.txt").exists()
    assert summary["n_files"] == sum(1 for p in dirs[0].rglob("*") if p.is_file())
