"""Tiny archives for the catalogue tests, and the check that no identifier leaks.

The DICOM writers (8x8 CT slices with fake patients, enhanced CT, dose SR, cut files)
come from tests/dicom/writers.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from fedct import dicom
from fedct.catalogue.pseudonym import DEMO_KEY, pseudonym
from fedct.config import CatalogueParams
from tests.dicom.writers import (
    CORONAL,
    FAKE_PATIENTS,
    ct_slice,
    truncate_copy,
    write,
    write_dose_sr,
    write_enhanced_ct,
    write_series,
)
from tests.phi import assert_no_identifiers

PARAMS = CatalogueParams(workers=2, demo_key=True)


def series_key(uid: str) -> str:
    """The catalogue's key of SeriesInstanceUID ``uid`` under the demo key."""
    return pseudonym(DEMO_KEY, "series", uid)


def build_archive(root: Path) -> dict:
    """``<site>/<study>/<series>/IMxxxxx.dcm`` with every kind of distractor.

    Returns what the catalogue must find: series UID -> (usable, first reason) and
    relative path -> reject reason.
    """
    p0, p1, p2 = FAKE_PATIENTS
    series: dict[str, tuple[bool, str]] = {}
    uid = generate_uid
    # Site A: one study with a usable axial stack and every series-level distractor.
    st = uid()
    a = root / "A" / "ST01"
    s = uid()
    axial = write_series(a / "SE002", 34, study_uid=st, series_uid=s, patient=p0)
    series[s] = (True, "")
    s = uid()
    write_series(a / "SE001", 1, study_uid=st, series_uid=s, patient=p0, iop=CORONAL,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), series_number=1)
    series[s] = (False, "localizer")
    s = uid()
    write_series(a / "SE004", 34, study_uid=st, series_uid=s, patient=p0, iop=CORONAL,
                 ipps=[(-2.8, float(k), 30.0) for k in range(34)],
                 image_type=("DERIVED", "SECONDARY", "REFORMATTED"), series_number=4)
    series[s] = (False, "coronal")
    s = uid()
    write_series(a / "SE003", 12, dz=5.0, thickness=5.0, study_uid=st, series_uid=s,
                 patient=p0, series_number=3)
    series[s] = (False, "too few slices (12 < 32)")
    s = uid()
    write_series(a / "SE005", 34, positions=[k for k in range(35) if k != 17],
                 study_uid=st, series_uid=s, patient=p0, series_number=5)
    series[s] = (False, "irregular slice spacing (1.00-2.00 mm)")
    s = uid()
    for k in range(34):
        n = 6 if k == 10 else 8
        write(ct_slice(study_uid=st, series_uid=s, z=float(k), rows=n, cols=n, patient=p0,
                       series_number=6, instance=k + 1), a / "SE006" / f"IM{k + 1:05d}.dcm")
    series[s] = (False, "inconsistent geometry (matrix differ)")
    rejects = {}
    write_dose_sr(a / "SE099" / "IM00001.dcm", st)
    rejects["A/ST01/SE099/IM00001.dcm"] = dicom.NOT_CT
    for f in axial[:3]:  # re-sent by the modality: the same SOP instances again
        dst = a / "SE002_RESENT" / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
        rejects[f"A/ST01/SE002_RESENT/{f.name}"] = dicom.DUPLICATE
    junk = root / "A" / "INCOMING"
    junk.mkdir(parents=True)
    (junk / "random.dcm").write_bytes(
        np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    (junk / "notes.txt").write_text("transfer log: 3 studies received\n")
    (junk / "empty.dcm").write_bytes(b"")
    truncate_copy(axial[5], junk / "trunc_pixels.dcm", axial[5].stat().st_size - 30)
    truncate_copy(axial[5], junk / "trunc_header.dcm", 200)
    shutil.copyfile(get_testdata_file("DICOMDIR"), root / "A" / "DICOMDIR")
    rejects.update({
        "A/INCOMING/random.dcm": dicom.NOT_DICOM, "A/INCOMING/notes.txt": dicom.NOT_DICOM,
        "A/INCOMING/empty.dcm": dicom.NOT_DICOM, "A/INCOMING/trunc_pixels.dcm":
        dicom.TRUNCATED, "A/INCOMING/trunc_header.dcm": dicom.TRUNCATED,
        "A/DICOMDIR": dicom.DICOMDIR,
    })
    # Site B: the same condition, stored RLE-compressed and as one enhanced multi-frame.
    s = uid()
    write_series(root / "B" / "ST02" / "SE002", 34, compress=True, series_uid=s,
                 manufacturer="CANON_MEC", patient=p1, institution="Hospital B")
    series[s] = (True, "")
    enhanced = write_enhanced_ct(root / "B" / "ST03" / "SE003" / "IM00001.dcm", 34,
                                 patient=p1)
    import pydicom

    series[pydicom.dcmread(enhanced, stop_before_pixels=True).SeriesInstanceUID] = (True, "")
    # Site C: a condition no other site has (Siemens sharp kernel), and a shared one.
    s = uid()
    write_series(root / "C" / "ST04" / "SE002", 34, series_uid=s, manufacturer="SIEMENS",
                 model="SOMATOM Force", kernel=("Br64", "3"), patient=p2,
                 institution="Hospital C")
    series[s] = (True, "")
    s = uid()
    write_series(root / "C" / "ST05" / "SE002", 34, series_uid=s, patient=p2,
                 institution="Hospital C")
    series[s] = (True, "")
    n_files = sum(1 for p in root.rglob("*") if p.is_file())
    return {"series": series, "rejects": rejects, "n_files": n_files}


def small_archive(root: Path) -> None:
    for i, site in enumerate("AB"):
        write_series(root / site / "ST1" / "SE1", 5, patient=FAKE_PATIENTS[i])
    (root / "A" / "junk.bin").write_bytes(b"\x00" * 100)


def assert_no_phi(out_dir: Path, archive_root: Path) -> None:
    """Scan the bytes of every output file for the fake identifiers and raw UIDs."""
    import pydicom

    needles = set()
    for p in FAKE_PATIENTS:
        needles |= {p["name"], p["id"], p["birth"], p["accession"],
                    p["name"].split("^")[0]}
    for f in list(archive_root.rglob("*.dcm"))[:400]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - distractors
            continue
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if kw in ds:
                needles.add(str(ds[kw].value))
    files = [p for p in Path(out_dir).rglob("*") if p.is_file()]
    assert files
    assert_no_identifiers(files, needles)
