"""The batch walk gives the per-file readers' answer, file for file, and reads the plain
files itself (else the fast path would pass these tests by never being taken)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from fedct import dicom
from fedct.dicom.batch import FIRST_WINDOW, read_batch
from fedct.dicom.walk import WINDOW
from tests.catalogue.archive import build_archive
from tests.dicom.writers import copy_testdata, ct_slice, write, write_series


def _same_answer(paths: list[str]) -> dicom.Columns:
    """read_columns with the batch walk equals it without, field by field."""
    sizes = [os.stat(p).st_size for p in paths]
    fast = dicom.read_columns(paths, sizes, engine="auto")
    slow = dicom.read_columns(paths, sizes, engine="walk")
    for field in ("reader", "reject", "detail", "frame_positions", "frames_consistent"):
        assert getattr(fast, field) == getattr(slow, field), field
    for kw, column in slow.values.items():
        assert fast.values[kw] == column, kw
    return fast


def _edge_cases(d: Path) -> dict[str, Path]:
    """Plain slices and the near misses the batch walk must leave to read_headers."""
    study = generate_uid()
    files = {}

    def slice_(name: str, **kw) -> Path:
        ds = ct_slice(study_uid=study, series_uid=generate_uid())
        for k, v in kw.items():
            setattr(ds, k, v)
        files[name] = write(ds, d / f"{name}.dcm")
        return files[name]

    slice_("plain")
    write(ct_slice(study_uid=study, series_uid=generate_uid()), d / "implicit.dcm",
          implicit=True)
    files["implicit"] = d / "implicit.dcm"
    slice_("padded", Manufacturer="  GE MEDICAL  ", ConvolutionKernel="STANDARD ")
    slice_("separator_byte", InstitutionName="Hospital\x1fA")
    slice_("escape", InstitutionName="\x1b$BHospital")
    slice_("lower_ct", Modality="ct")
    slice_("thick_zero", SliceThickness="0")
    slice_("huge_matrix", Rows=8192)
    slice_("two_frames", NumberOfFrames="2")
    ds = ct_slice(study_uid=study, series_uid=generate_uid())
    ds.add_new((0x0019, 0x0010), "LO", "PRIVATE")
    ds.add_new((0x0019, 0x1001), "OB", b"\x01" * (WINDOW + 100))  # values beyond the window
    files["beyond_window"] = write(ds, d / "beyond_window.dcm")
    # Past the first read (FIRST_WINDOW), within WINDOW: read again, then taken; and a
    # header that ends in the first read with the pixel data's header beyond it.
    ds = ct_slice(study_uid=study, series_uid=generate_uid())
    ds.add_new((0x0019, 0x0010), "LO", "PRIVATE")
    ds.add_new((0x0019, 0x1001), "OB", b"\x01" * FIRST_WINDOW)
    files["past_first_window"] = write(ds, d / "past_first_window.dcm")
    ds = ct_slice(study_uid=study, series_uid=generate_uid())
    ds.add_new((0x0029, 0x0010), "LO", "PRIVATE")
    ds.add_new((0x0029, 0x1001), "OB", b"\x01" * FIRST_WINDOW)
    files["pixels_past_first_window"] = write(ds, d / "pixels_past_first_window.dcm")
    for name in ("past_first_window", "pixels_past_first_window"):
        data = files[name].read_bytes()
        files[f"{name}_cut"] = d / f"{name}_cut.dcm"
        files[f"{name}_cut"].write_bytes(data[:-7])
    for name, cut in (("cut_in_pixels", -7), ("cut_in_header", 600)):
        data = files["plain"].read_bytes()
        files[name] = d / f"{name}.dcm"
        files[name].write_bytes(data[:cut])
    for i, p in enumerate(write_series(d / "series", 40, study_uid=study)):
        files[f"series{i}"] = p
    return files


def test_plain_files_are_read_in_the_batch_and_the_others_left_alone(tmp_path: Path) -> None:
    files = _edge_cases(tmp_path)
    names = list(files)
    fast = _same_answer([str(files[n]) for n in names])
    batch = read_batch([str(files[n]) for n in names], [files[n].stat().st_size for n in names])
    taken = {n for n, ok in zip(names, batch.ok, strict=True) if ok}
    assert {"plain", "implicit", "padded", "past_first_window", "pixels_past_first_window"} \
        | {n for n in names if n.startswith("series")} <= taken
    assert not taken & {"separator_byte", "escape", "lower_ct", "thick_zero", "huge_matrix",
                        "two_frames", "beyond_window", "cut_in_pixels", "cut_in_header",
                        "past_first_window_cut", "pixels_past_first_window_cut"}
    assert fast.values["Manufacturer"][names.index("padded")] == "GE MEDICAL"
    for name in ("cut_in_pixels", "past_first_window_cut", "pixels_past_first_window_cut"):
        assert fast.reject[names.index(name)] == dicom.TRUNCATED, name
    # Read again in parts no larger than the first read's buffer: here one file each.
    again = [str(files[n]) for n in ("past_first_window", "plain", "past_first_window",
                                     "past_first_window_cut", "past_first_window")]
    _same_answer(again)
    assert read_batch(again, [os.stat(p).st_size for p in again]).ok.tolist() == [
        True, True, True, False, True]


def test_every_odd_file_gets_the_per_file_answer(odd_files: dict[str, Path]) -> None:
    names = sorted(odd_files)
    fast = _same_answer([str(odd_files[n]) for n in names])
    assert fast.reject[names.index("ct")] is None
    assert fast.reject[names.index("trunc_pixels")] == dicom.TRUNCATED


def test_pydicom_test_files_get_the_per_file_answer(tmp_path: Path) -> None:
    paths = sorted(str(p) for p in copy_testdata(tmp_path))
    _same_answer(paths)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_the_hostile_archive_gets_the_per_file_answer(tmp_path: Path, chunk: int) -> None:
    build_archive(tmp_path)
    paths = sorted(str(p) for p in tmp_path.rglob("*") if p.is_file())
    for i in range(0, len(paths), chunk):
        _same_answer(paths[i:i + chunk])


def test_unreadable_and_vanished_files_are_left_to_read_headers(tmp_path: Path) -> None:
    plain = write(ct_slice(study_uid=generate_uid(), series_uid=generate_uid()),
                  tmp_path / "a.dcm")
    locked = tmp_path / "b.dcm"
    locked.write_bytes(plain.read_bytes())
    locked.chmod(0)
    gone = str(tmp_path / "gone.dcm")
    batch = read_batch([str(plain), str(locked), gone], [plain.stat().st_size] * 3)
    assert batch.ok[0] and not batch.ok[2]
    assert batch.ok[1] == os.access(locked, os.R_OK)  # root reads it anyway
    assert np.array_equal(np.asarray(batch.values["Modality"], dtype=object) == "CT",
                          batch.ok)
