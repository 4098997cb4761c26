"""The DICOM SEG: one segment per predicted structure, named from the card, each frame on
its source slice; it reads back with highdicom."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from fedct.data.labels import LabelSet
from fedct.errors import FedctError
from fedct.inference.inputs import read_input
from fedct.inference.outputs import write_seg

LABELS = LabelSet(("background", "muscle", "femur", "pelvis"))


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
    path = write_seg(_label_image(inp, arr), inp.datasets, LABELS, tmp_path / "s.dcm", "m")
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
    assert write_seg(img, inp.datasets, LABELS, tmp_path / "s.dcm", "m") is None
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
                  "m")
