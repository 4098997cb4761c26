"""The fast header walk: reads the common files itself, declines the rest, agrees with pydicom."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import RLELossless

from fedct import dicom
from fedct.dicom.pydicom_reader import pydicom_values


def test_fast_path_reads_common_files_without_fallback(odd_files: dict[str, Path]) -> None:
    names = ["ct", "rle", "implicit", "latin1", "sequence"]
    headers = dicom.read_headers([str(odd_files[n]) for n in names])
    assert [h.reader for h in headers] == ["walk"] * len(names)
    assert headers[1].values["TransferSyntaxUID"] == RLELossless
    assert headers[3].values["InstitutionName"] == "Hôpital Sud"
    # Values after the undefined-length sequence and the long private blob are read.
    assert headers[4].values["Rows"] == "8"
    assert headers[4].values["PixelSpacing"] == "0.7\\0.7"


def test_walk_declines_what_it_cannot_read_exactly(tmp_path: Path) -> None:
    big = get_testdata_file("ExplVR_BigEnd.dcm")
    no_preamble = get_testdata_file("ExplVR_LitEndNoMeta.dcm")
    deflated = get_testdata_file("image_dfl.dcm")
    for f in (big, no_preamble, deflated):
        with pytest.raises(dicom.WalkDeclined):
            dicom.walk_header(f)
    headers = dicom.read_headers([big, no_preamble, deflated])
    assert all(h.reader != "walk" for h in headers)
    assert all(h.reject == dicom.NOT_CT for h in headers)  # all three are not CT


def test_walk_matches_pydicom_on_pydicom_test_files() -> None:
    """Differential test: wherever the walk reads a file, its values are pydicom's."""
    n_walked = 0
    for f in get_testdata_files():
        if not os.path.isfile(f):
            continue
        try:
            values, _ = dicom.walk_header(f)
        except dicom.WalkDeclined:
            continue
        if dicom.PARTIAL in values:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref, rejected, _ = pydicom_values(f)
        if ref is None:
            continue
        n_walked += 1
        for kw in dicom.SCAN_TAGS:
            a, b = values.get(kw), ref.get(kw)
            if a != b:
                # Numbers may be formatted differently ("1" vs "1.0"), not differ.
                assert a is not None and b is not None, (f, kw, a, b)
                assert [float(x) for x in a.split("\\")] == \
                    [float(x) for x in b.split("\\")], (f, kw, a, b)
    assert n_walked > 100
