"""One file of every kind the header readers must tell apart, shared by the modules here."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, generate_uid

from tests.dicom.writers import (
    ct_slice,
    truncate_copy,
    write,
    write_dose_sr,
    write_enhanced_ct,
)


@pytest.fixture(scope="package")
def odd_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file per case the reader must tell apart."""
    d = tmp_path_factory.mktemp("odd")
    study = generate_uid()
    files: dict[str, Path] = {}
    files["ct"] = write(ct_slice(study_uid=study, series_uid=generate_uid()), d / "ct.dcm")
    files["rle"] = write(ct_slice(study_uid=study, series_uid=generate_uid()), d / "rle.dcm",
                         compress=True)
    files["implicit"] = write(ct_slice(study_uid=study, series_uid=generate_uid()),
                              d / "implicit.dcm", implicit=True)
    latin = ct_slice(study_uid=study, series_uid=generate_uid(), institution="Hôpital Sud")
    files["latin1"] = write(latin, d / "latin1.dcm")
    with_sq = ct_slice(study_uid=study, series_uid=generate_uid())
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = generate_uid()
    inner = Dataset()
    inner.CodeValue = "1"
    ref.PurposeOfReferenceCodeSequence = DicomSequence([inner])
    with_sq.ReferencedImageSequence = DicomSequence([ref, ref])
    with_sq.ReferencedImageSequence.is_undefined_length = True
    with_sq.add_new((0x0029, 0x0010), "LO", "PRIVATE CREATOR")
    with_sq.add_new((0x0029, 0x1010), "OB", b"\x00" * 3000)  # a long private blob
    files["sequence"] = write(with_sq, d / "sequence.dcm")
    no_series = ct_slice(study_uid=study, series_uid=generate_uid())
    del no_series.SeriesInstanceUID
    files["no_series_uid"] = write(no_series, d / "no_series_uid.dcm")
    files["enhanced"] = write_enhanced_ct(d / "enhanced.dcm", 5, study_uid=study)
    files["sr"] = write_dose_sr(d / "sr.dcm", study)
    files["random"] = d / "random.dcm"
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 2048,
                                                                  dtype=np.uint8).tobytes())
    files["empty"] = d / "empty.dcm"
    files["empty"].write_bytes(b"")
    files["text"] = d / "notes.txt"
    files["text"].write_text("transfer log\n")
    size = files["ct"].stat().st_size
    files["trunc_pixels"] = truncate_copy(files["ct"], d / "trunc_pixels.dcm", size - 30)
    files["trunc_header"] = truncate_copy(files["ct"], d / "trunc_header.dcm", 200)
    files["trunc_rle"] = truncate_copy(files["rle"], d / "trunc_rle.dcm",
                                       files["rle"].stat().st_size - 5)
    files["dicomdir"] = d / "DICOMDIR"
    shutil.copyfile(get_testdata_file("DICOMDIR"), files["dicomdir"])
    return files
