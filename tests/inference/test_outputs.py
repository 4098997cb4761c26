"""The DICOM SEG: one segment per predicted structure, named and coded from the card, each
frame on its source slice, saying which model made it and what its failure flag was; it
reads back with highdicom and passes dciodvfy (dicom3tools) where that is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from fedct.data.labels import DEFAULT_CODE, LabelSet
from fedct.errors import FedctError
from fedct.inference.inputs import read_input
from fedct.inference.outputs import SegProvenance, write_seg

# muscle has no code of its own: it gets the default.
LABELS = LabelSet(("background", "muscle", "femur", "pelvis"),
                  (("femur", ("SCT", "71341001", "Femur")),
                   ("pelvis", ("SCT", "118645006", "Pelvis"))))
FLAGGED = {"flag": True, "score": 0.4321, "threshold": 0.25}
CHAMPION = SegProvenance("fedct-seg", "7", True, {"flag": False, "score": 0.1,
                                                 "threshold": 0.25})


def _label_image(inp, arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(inp.image)
    return img


def test_seg_has_one_segment_per_predicted_structure_on_its_slice(
        dicom_series: Path, tmp_path: Path) -> None:
    inp = read_input(dicom_series)
    arr = np.zeros((40, 16, 16), dtype=np.uint8)
    arr[5:12, 4:8, 4:8] = 3   # pelvis low in z, muscle (1) absent
    arr[20:30, 8:12, 8:12] = 2
    path = write_seg(_label_image(inp, arr), inp.datasets, LABELS, tmp_path / "s.dcm", CHAMPION)
    seg = hd.seg.segread(path)
    labels = {int(d.SegmentNumber): d.SegmentLabel for d in seg.SegmentSequence}
    assert labels == {1: "femur", 2: "pelvis"}
    assert seg.SeriesInstanceUID != inp.datasets[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == inp.datasets[0].StudyInstanceUID
    refs = {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence}
    assert refs == {inp.datasets[0].SeriesInstanceUID}
    uids = [ds.SOPInstanceUID for ds in inp.datasets]
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    # Segment numbers 1, 2 stand for labels 2, 3, slice by slice in the series' order.
    expected = np.select([arr == 2, arr == 3], [1, 2], 0)
    np.testing.assert_array_equal(back, expected)


def test_empty_prediction_writes_no_seg(dicom_series: Path, tmp_path: Path) -> None:
    inp = read_input(dicom_series)
    img = _label_image(inp, np.zeros((40, 16, 16), dtype=np.uint8))
    assert write_seg(img, inp.datasets, LABELS, tmp_path / "s.dcm", CHAMPION) is None
    assert not (tmp_path / "s.dcm").exists()


def test_source_without_frame_of_reference_is_refused(dicom_series: Path,
                                                      tmp_path: Path) -> None:
    inp = read_input(dicom_series)
    datasets = list(inp.datasets)
    first = datasets[0].copy()
    del first.FrameOfReferenceUID
    arr = np.zeros((40, 16, 16), dtype=np.uint8)
    arr[10] = 1
    with pytest.raises(FedctError, match="no FrameOfReferenceUID"):
        write_seg(_label_image(inp, arr), [first, *datasets[1:]], LABELS, tmp_path / "s.dcm",
                  CHAMPION)


def _two_structures(inp) -> sitk.Image:
    arr = np.zeros((40, 16, 16), dtype=np.uint8)
    arr[5:12, 4:8, 4:8] = 1
    arr[20:30, 8:12, 8:12] = 2
    return _label_image(inp, arr)


def test_seg_types_segments_with_their_codes_and_names_the_model(dicom_series: Path,
                                                                 tmp_path: Path) -> None:
    inp = read_input(dicom_series)
    path = write_seg(_two_structures(inp), inp.datasets, LABELS, tmp_path / "s.dcm", CHAMPION)
    seg = hd.seg.segread(path)
    types = {d.SegmentLabel: (d.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
                              d.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                              d.SegmentedPropertyTypeCodeSequence[0].CodeMeaning)
             for d in seg.SegmentSequence}
    assert types == {"muscle": DEFAULT_CODE, "femur": ("SCT", "71341001", "Femur")}
    for d in seg.SegmentSequence:
        algorithm = d.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("fedct-seg", "7")
        category = d.SegmentedPropertyCategoryCodeSequence[0]
        assert category.CodeMeaning == "Anatomical Structure"
    assert seg.SeriesDescription == "fedct-seg v7 seg"  # the champion: no warning
    assert seg.ContentDescription == "failure not flagged: score 0.1 < threshold 0.25"


@pytest.mark.parametrize("provenance, series, content", [
    (SegProvenance("fedct-seg", "1", False, FLAGGED),
     "fedct-seg v1 seg [FAILURE FLAGGED, NOT CHAMPION]",
     "failure FLAGGED: score 0.4321 >= threshold 0.25"),
    (SegProvenance("fedct-A", None, False, {"flag": None, "score": "inf", "threshold": None}),
     "fedct-A unregistered seg [NOT CHAMPION]", "failure unflagged: score inf vs threshold none"),
    (SegProvenance("x" * 80, "12", True, FLAGGED), "x" * 38 + " v12 seg [FAILURE FLAGGED]",
     "failure FLAGGED: score 0.4321 >= threshold 0.25"),
])
def test_seg_warns_of_flag_and_of_a_model_that_is_not_the_champion(
        dicom_series: Path, tmp_path: Path, provenance: SegProvenance, series: str,
        content: str) -> None:
    inp = read_input(dicom_series)
    path = write_seg(_two_structures(inp), inp.datasets, LABELS, tmp_path / "s.dcm", provenance)
    seg = hd.seg.segread(path)
    assert seg.SeriesDescription == series and len(series) <= 64
    assert seg.ContentDescription == content
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == provenance.algorithm_version


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian dicom3tools) is not installed")
def test_seg_passes_dciodvfy(dicom_series: Path, tmp_path: Path) -> None:
    inp = read_input(dicom_series)
    path = write_seg(_two_structures(inp), inp.datasets, LABELS, tmp_path / "s.dcm",
                     SegProvenance("fedct-seg", "1", False, FLAGGED))
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60,
                         check=False)
    report = out.stdout + out.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == [], report
