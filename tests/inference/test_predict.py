"""``fedct predict`` end to end: outputs on the input's grid, the report, the SEG, the flag,
the registry path (``models:/name@alias``) and the CLI's one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from fedct import tracking
from fedct.cli import main
from fedct.inference import predict
from tests.dicom.writers import FAKE_PATIENTS
from tests.inference.conftest import make_model
from tests.phi import assert_no_identifiers


@pytest.fixture(scope="module")
def dicom_run(dicom_series: Path, model_dir: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out_dicom")
    return out, predict.run(str(model_dir), dicom_series, out)


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(a, get)(), getattr(b, get)(), atol=1e-5)


def _check_outputs(out: Path, report: dict, reference: sitk.Image) -> np.ndarray:
    seg = sitk.ReadImage(str(out / predict.SEGMENTATION))
    unc = sitk.ReadImage(str(out / predict.UNCERTAINTY))
    _same_grid(seg, reference)
    _same_grid(unc, reference)
    arr = sitk.GetArrayFromImage(seg)
    u = sitk.GetArrayFromImage(unc)
    assert u.dtype == np.float32 and (u >= 0).all() and u.max() > 0
    # The mask tells "not analysed" (outside the network's grid) from "certain".
    mask = sitk.ReadImage(str(out / predict.ANALYSED))
    _same_grid(mask, reference)
    analysed = sitk.GetArrayFromImage(mask).astype(bool)
    assert float(analysed.mean()) == report["preprocessing"]["roi_coverage"] < 1
    assert (arr[~analysed] == 0).all() and (u[~analysed] == 0).all()
    assert report["outputs"]["analysed"] == predict.ANALYSED
    hu = sitk.GetArrayFromImage(reference)
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000
    assert json.loads((out / predict.REPORT).read_text()) == report
    for s in report["structures"]:
        mask = arr == s["label"]
        assert s["voxels"] == int(mask.sum())
        assert s["volume_ml"] == pytest.approx(mask.sum() * voxel_ml)
        if mask.any():
            assert s["mean_hu"] == pytest.approx(float(hu[mask].mean()), rel=1e-5)
            assert s["mean_uncertainty"] == pytest.approx(float(u[mask].mean()), rel=1e-4)
    assert report["input"]["size"] == list(reference.GetSize())
    return arr


def test_dicom_input(dicom_run, dicom_series: Path) -> None:
    out, report = dicom_run
    # The input's grid as SimpleITK's own DICOM series reader sees it.
    series = sitk.ImageSeriesReader()
    series.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(dicom_series)))
    reference = series.Execute()
    arr = _check_outputs(out, report, reference)
    predicted = {s["name"] for s in report["structures"] if s["predicted"]}
    assert predicted  # the untrained tiny model predicts something
    seg = hd.seg.segread(out / predict.SEG_DICOM)
    names = {d.SegmentLabel for d in seg.SegmentSequence}
    assert names == predicted == {report["model"]["labels"][str(k)]
                                  for k in np.unique(arr) if k > 0}
    assert report["failure"]["flag"] is None
    assert report["mc_samples"] == 10 and report["outputs"]["dicom_seg"] == predict.SEG_DICOM


def test_report_holds_no_patient_identifier(dicom_run) -> None:
    out, _ = dicom_run
    text = (out / predict.REPORT).read_text()
    for value in FAKE_PATIENTS[0].values():
        assert value not in text
    assert "1.2." not in text  # no UID either


def test_nifti_input(nifti_volume: Path, model_dir: Path, tmp_path: Path) -> None:
    report = predict.run(str(model_dir), nifti_volume, tmp_path, mc_samples=3,
                         uncertainty="variance")
    _check_outputs(tmp_path, report, sitk.ReadImage(str(nifti_volume)))
    assert report["mc_samples"] == 3 and report["uncertainty_map"]["kind"] == "variance"
    assert "dicom_seg" not in report["outputs"] and not (tmp_path / "segmentation.dcm").exists()


@pytest.mark.parametrize("threshold, flag", [(0.0, True), (1e9, False)])
def test_flag_follows_the_card_threshold(nifti_volume: Path, tmp_path: Path,
                                         threshold: float, flag: bool) -> None:
    model = make_model(tmp_path / "m", failure={"signal": "max_softmax_deficit",
                                                "threshold": threshold,
                                                "aggregation": "mean", "mc_samples": 3})
    report = predict.run(str(model), nifti_volume, tmp_path / "out", mc_samples=3)
    assert report["failure"]["flag"] is flag and report["failure"]["threshold"] == threshold
    assert "note" not in report["failure"]
    # At another T the score's scale differs from the calibration's: reported, not flagged.
    other = predict.run(str(model), nifti_volume, tmp_path / "out4", mc_samples=4)
    assert other["failure"]["flag"] is None and other["failure"]["score"] is not None
    assert "calibrated with 3 MC samples, scored with 4" in other["failure"]["reason"]


def test_an_infinite_threshold_flags_only_missed_structures_in_strict_json(
        nifti_volume: Path, tmp_path: Path) -> None:
    # An unbounded signal whose calibration pairs missed a structure calibrates at +inf;
    # threshold.json writes it "inf", and report.json must stay strict JSON.
    model = make_model(tmp_path / "m", failure={"signal": "volume_deviation",
                                                "threshold": "inf", "aggregation": "mean",
                                                "mc_samples": 3})
    report = predict.run(str(model), nifti_volume, tmp_path / "out", mc_samples=3)
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["failure"]["threshold"] == "inf" == report["failure"]["threshold"]
    assert written["failure"]["flag"] is (written["failure"]["score"] == "inf")


def test_cli_predicts_from_the_registry_alias(dicom_series: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # the SQLite store puts artifacts under ./mlruns
    model = make_model(tmp_path / "A", failure={"signal": "sample_disagreement",
                                                "threshold": 0.0, "mc_samples": 4})
    with tracking.start_run("promote") as run:
        logged = tracking.log_fedct_model(run, model, registered_name="fedct-seg")
    MlflowClient().set_registered_model_alias("fedct-seg", "champion", logged.version)
    result = CliRunner().invoke(main, ["predict", "models:/fedct-seg@champion",
                                       str(dicom_series), "-o", str(tmp_path / "out"),
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "failure flag: True" in result.output
    assert "Downloading artifacts" not in result.output  # one result line, no bar
    assert json.loads((tmp_path / "out" / predict.REPORT).read_text())["mc_samples"] == 4
    other_t = CliRunner().invoke(main, ["predict", "models:/fedct-seg@champion",
                                        str(dicom_series), "-o", str(tmp_path / "out"),
                                        "--mc-samples", "2", "--device", "cpu"])
    assert other_t.exit_code == 0, other_t.output
    assert "failure flag: none (not flagged: threshold calibrated with 4 MC samples, " \
           "scored with 2" in other_t.output
    result = CliRunner().invoke(main, ["predict", "models:/fedct-seg@champion",
                                       str(dicom_series), "-o", str(tmp_path / "out"),
                                       "--device", "cpu"])
    report = json.loads((tmp_path / "out" / predict.REPORT).read_text())
    assert report["model"]["uri"] == "models:/fedct-seg@champion"
    assert report["failure"]["flag"] is True
    assert (tmp_path / "out" / predict.SEG_DICOM).is_file()


def test_a_reused_output_folder_keeps_no_file_of_the_earlier_input(
        dicom_series: Path, nifti_volume: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    predict.run(str(model_dir), dicom_series, out, mc_samples=2)
    assert (out / predict.SEG_DICOM).is_file()
    (out / "notes.txt").write_text("the user's own file")
    report = predict.run(str(model_dir), nifti_volume, out, mc_samples=2)
    # No DICOM SEG of the earlier series (another patient's data) beside this result.
    assert not (out / predict.SEG_DICOM).exists() and "dicom_seg" not in report["outputs"]
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_cli_errors_are_one_line(dicom_series: Path, model_dir: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    missing = runner.invoke(main, ["predict", "models:/nope@champion", str(dicom_series),
                                   "-o", str(tmp_path / "out")])
    assert missing.exit_code == 1
    # MLflow's own INFO lines (a fresh store) may precede it; the error is one line.
    errors = [line for line in missing.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in missing.output
    assert errors[0].startswith("Error: models:/nope@champion: no such model")
    assert not (tmp_path / "out").exists()
    short = tmp_path / "short"
    short.mkdir()
    bad = runner.invoke(main, ["predict", str(model_dir), str(short), "-o", str(tmp_path / "o")])
    assert bad.exit_code == 1 and "short: no DICOM image files" in bad.output


def test_orientation_of_the_input_does_not_change_the_segmentation(
        dicom_series: Path, model_dir: Path, dicom_run, tmp_path: Path) -> None:
    """The same physical volume stored RAS (as NIfTI from dcm2niix often is) gives the
    same segmentation as the LPS DICOM series: the network always sees LPS."""
    from fedct.inference.inputs import read_input

    ras = sitk.DICOMOrient(read_input(dicom_series).image, "RAS")
    sitk.WriteImage(ras, str(tmp_path / "ras.nii.gz"))
    report = predict.run(str(model_dir), tmp_path / "ras.nii.gz", tmp_path / "out")
    seg = sitk.ReadImage(str(tmp_path / "out" / predict.SEGMENTATION))
    np.testing.assert_allclose(seg.GetDirection(), ras.GetDirection())
    lps = sitk.DICOMOrient(seg, "LPS")
    out, dicom_report = dicom_run
    expected = sitk.ReadImage(str(out / predict.SEGMENTATION))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lps), sitk.GetArrayFromImage(expected))
    assert report["failure"]["score"] == pytest.approx(dicom_report["failure"]["score"])


@pytest.mark.slow
def test_series_of_the_synthetic_archive(tiny_archive, model_dir: Path, tmp_path: Path) -> None:
    """A usable RLE-compressed series of the synthetic archive is segmented; its thick
    series and dose report are refused; no identifier of phi.csv reaches the report."""
    import pandas as pd

    from fedct.errors import FedctError

    series = pd.read_csv(tiny_archive["truth"] / "series.csv")
    rle = series[series["usable"] & (series["compressed"] == True)].iloc[0]  # noqa: E712
    report = predict.run(str(model_dir), tiny_archive["archive"] / rle["path"], tmp_path)
    assert report["input"]["size"][2] == rle["n_slices"]
    seg = hd.seg.segread(tmp_path / predict.SEG_DICOM)
    assert {d.SegmentLabel for d in seg.SegmentSequence} == {
        s["name"] for s in report["structures"] if s["predicted"]}
    phi = pd.read_csv(tiny_archive["truth"] / "phi.csv", dtype=str)
    assert_no_identifiers([tmp_path / predict.REPORT],
                          phi[["name", "patient_id", "birth_date", "accession"]].to_numpy().ravel())
    for kind, message in (("thick", "fewer than 32"), ("dose_sr", "Modality SR")):
        path = series[series["kind"] == kind].iloc[0]["path"]
        with pytest.raises(FedctError, match=message):
            predict.run(str(model_dir), tiny_archive["archive"] / path, tmp_path / kind)


def _seg_says(out: Path) -> tuple[str, str, str]:
    seg = hd.seg.segread(out / predict.SEG_DICOM)
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    return seg.SeriesDescription, seg.ContentDescription, algorithm.AlgorithmVersion


def test_a_version_that_is_not_the_champion_is_named_and_warned_of(
        dicom_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    failure = {"signal": "sample_disagreement", "threshold": 0.0, "mc_samples": 2}
    versions = []
    for seed in (1, 2):
        model = make_model(tmp_path / f"m{seed}", failure=failure, seed=seed)
        with tracking.start_run("promote") as run:
            versions.append(tracking.log_fedct_model(run, model,
                                                     registered_name="fedct-seg").version)
    tracking.record_refusal("fedct-seg", versions[0], ["no better than local"])

    def cli(uri: str, out: str):
        result = CliRunner().invoke(main, ["predict", uri, str(dicom_series), "-o",
                                           str(tmp_path / out), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        return result.output, json.loads((tmp_path / out / predict.REPORT).read_text())

    # No champion yet: version 2 is used, with one warning line that says so.
    output, report = cli(f"models:/fedct-seg/{versions[1]}", "none")
    assert [line for line in output.splitlines() if line.startswith("warning:")] == [
        f"warning: models:/fedct-seg/{versions[1]} is fedct-seg version {versions[1]}: not "
        "the champion (no version is the champion)"]
    assert report["model"]["registry"] == {"name": "fedct-seg", "version": versions[1],
                                           "champion": None, "decision": None}
    tracking.set_champion("fedct-seg", versions[1])
    # The refused version: warned of in the output, report.json and the SEG itself.
    output, report = cli(f"models:/fedct-seg/{versions[0]}", "refused")
    assert output.count("warning:") == 1 and "promotion refused" in output
    assert report["warnings"] == [
        f"models:/fedct-seg/{versions[0]} is fedct-seg version {versions[0]}, promotion "
        f"refused: not the champion (the champion is version {versions[1]})"]
    assert report["failure"]["flag"] is True
    series, content, version = _seg_says(tmp_path / "refused")
    assert series == f"fedct-seg v{versions[0]} seg [FAILURE FLAGGED, NOT CHAMPION]"
    assert content.startswith("failure FLAGGED: score ") and version == versions[0]
    # The champion, by alias or by number: no warning; the SEG names its version.
    for uri in ("models:/fedct-seg@champion", f"models:/fedct-seg/{versions[1]}"):
        output, report = cli(uri, "champion")
        assert "warning" not in output and report["warnings"] == []
        assert report["model"]["registry"]["decision"] == "promoted"
        series, _, version = _seg_says(tmp_path / "champion")
        assert series == f"fedct-seg v{versions[1]} seg [FAILURE FLAGGED]"
        assert version == versions[1]


def test_a_model_folder_is_used_with_a_warning(dicom_series: Path, model_dir: Path,
                                               tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["predict", str(model_dir), str(dicom_series), "-o",
                                       str(tmp_path), "--device", "cpu", "--mc-samples", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / predict.REPORT).read_text())
    assert report["model"]["registry"] is None and len(report["warnings"]) == 1
    assert "is not a registry version" in report["warnings"][0]
    assert result.output.count("warning:") == 1
    series, _, version = _seg_says(tmp_path)
    assert series == "fedct-A unregistered seg [NOT CHAMPION]" and version == "unregistered"


# --- the attack of issue 24: a pickle payload reaching `fedct predict` through the registry


def _champion(tmp_path: Path, folder: Path) -> None:
    from mlflow import MlflowClient

    with tracking.start_run("promote") as run:
        logged = tracking.log_fedct_model(run, folder, registered_name="fedct-seg")
    MlflowClient().set_registered_model_alias("fedct-seg", "champion", logged.version)


def _predict_champion(dicom_series: Path, tmp_path: Path):
    return CliRunner().invoke(main, ["predict", "models:/fedct-seg@champion",
                                     str(dicom_series), "-o", str(tmp_path / "out"),
                                     "--device", "cpu"])


def test_a_payload_written_over_the_stored_artifact_is_refused_not_run(
        dicom_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.model.payload import planted

    monkeypatch.chdir(tmp_path)
    _champion(tmp_path, make_model(tmp_path / "A"))
    marker = tmp_path / "pwned"
    stored = list((tmp_path / "mlruns").rglob(tracking.MODEL_FILE))
    assert stored
    for path in stored:
        planted(path, marker)
    result = _predict_champion(dicom_series, tmp_path)
    assert not marker.exists(), "fedct predict ran the code planted in the registry"
    assert result.exit_code == 1
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: models:/fedct-seg@champion: ") and "altered" in error
    assert not (tmp_path / "out" / predict.REPORT).exists()


def test_a_payload_registered_with_matching_digests_is_refused_not_run(
        dicom_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The registry has no login: an attacker registers a "model" whose weights file is a
    # pickle payload, with a card and registry tags whose digests match it.
    import hashlib

    from tests.model.payload import planted

    monkeypatch.chdir(tmp_path)
    folder = make_model(tmp_path / "evil")
    marker = planted(folder / tracking.MODEL_FILE, tmp_path / "pwned")
    card = json.loads((folder / tracking.MODEL_CARD_FILE).read_text())
    card["weights_sha256"] = hashlib.sha256(
        (folder / tracking.MODEL_FILE).read_bytes()).hexdigest()
    (folder / tracking.MODEL_CARD_FILE).write_text(json.dumps(card))
    _champion(tmp_path, folder)
    result = _predict_champion(dicom_series, tmp_path)
    assert not marker.exists(), "fedct predict ran the code inside a registered model"
    assert result.exit_code == 1
    assert "pickled model" in result.output and "never unpickles" in result.output
