"""Is the file whole: cut files are rejected as truncated, whole ones (deflated too) pass."""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import pytest

from fedct import dicom
from tests.dicom.writers import truncate_copy, write_series


def _assert_cuts_rejected(data: bytes, cuts: list[int], folder: Path) -> None:
    """Every prefix ``data[:cut]`` is rejected as cut (never a good image), by every engine."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for cut in cuts:
        p = folder / f"cut_{cut:05d}.dcm"
        p.write_bytes(data[:cut])
        paths.append(str(p))
    for engine in ("auto", "gdcm"):
        headers = dicom.read_headers(paths, engine=engine)
        good = [p for p, h in zip(paths, headers, strict=True) if h.ok]
        assert good == [], (engine, good[:3])
        assert {h.reject for h in headers} <= {dicom.TRUNCATED, dicom.NOT_DICOM,
                                              dicom.MISSING_TAG}
        # The longest cut ends inside the pixel data: exactly "truncated".
        assert headers[-1].reject == dicom.TRUNCATED


def test_every_cut_of_a_file_is_rejected(odd_files: dict[str, Path], tmp_path: Path) -> None:
    """A file cut anywhere is never catalogued as a good image."""
    for src in (odd_files["ct"], odd_files["rle"]):
        data = src.read_bytes()
        cuts = sorted(set(range(0, len(data), 23)) | {len(data) - 1, len(data) - 2, 140})
        _assert_cuts_rejected(data, cuts, tmp_path / src.stem)


# ------------------------------------------------- deflated explicit VR little endian
# In a deflated file pydicom's element offsets count bytes of the inflated data set,
# which is larger than the file on disk: a whole series used to be rejected as cut.

DEFLATED_SLICES = 40
# 32 x 32 slices: large enough that every file is smaller than its inflated data set.
DEFLATED_SIZE = {"rows": 32, "cols": 32}


@pytest.fixture(scope="module")
def deflated_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 40-slice axial CT series written by pydicom in Deflated Explicit VR LE."""
    folder = tmp_path_factory.mktemp("deflated") / "SE001"
    return write_series(folder, DEFLATED_SLICES, deflate=True, **DEFLATED_SIZE)


def _data_set_start(data: bytes) -> int:
    """Offset after the file meta: preamble, DICM, (0002,0000) UL and its value."""
    return 144 + int.from_bytes(data[140:144], "little")


@pytest.mark.parametrize("engine", ["auto", "gdcm", "pydicom"])
def test_whole_deflated_series_is_accepted(deflated_series: list[Path], engine: str) -> None:
    data = deflated_series[0].read_bytes()
    inflated = zlib.decompress(data[_data_set_start(data):], -zlib.MAX_WBITS)
    assert len(data) < len(inflated)  # the case that fooled the offset check
    headers = dicom.read_headers([str(p) for p in deflated_series], engine=engine)
    assert [(h.reject, h.detail) for h in headers] == [(None, "")] * DEFLATED_SLICES
    assert {h.values["TransferSyntaxUID"] for h in headers} == {dicom.DEFLATED_LE}
    assert {h.values["Rows"] for h in headers} == {"32"}
    assert {dicom.orientation_class(h.values["ImageOrientationPatient"])
            for h in headers} == {"axial"}


def test_integrity_accepts_every_whole_deflated_file(deflated_series: list[Path]) -> None:
    assert [dicom.integrity(str(p)) for p in deflated_series] == \
        [(None, "")] * DEFLATED_SLICES


@pytest.mark.parametrize("engine", ["auto", "gdcm", "pydicom"])
def test_deflated_file_cut_in_half_is_rejected(deflated_series: list[Path], tmp_path: Path,
                                               engine: str) -> None:
    src = deflated_series[0]
    half = truncate_copy(src, tmp_path / "IM_half.dcm", src.stat().st_size // 2)
    (h,) = dicom.read_headers([str(half)], engine=engine)
    assert h.reject in (dicom.TRUNCATED, dicom.UNREADABLE), h
    assert h.path == str(half) and h.values == {}
    # The detail says why; the file is named by ``path`` (the rejects table's column),
    # never inside the detail.
    assert "truncated stream" in h.detail and str(half) not in h.detail
    assert dicom.integrity(str(half))[0] == dicom.TRUNCATED


def test_every_cut_of_a_deflated_file_is_rejected(deflated_series: list[Path],
                                                  tmp_path: Path) -> None:
    data = deflated_series[0].read_bytes()
    # The last byte may be the pad after the deflate stream: without it nothing is lost.
    cuts = sorted(set(range(0, len(data) - 2, 23)) | {len(data) // 2, len(data) - 2})
    _assert_cuts_rejected(data, cuts, tmp_path / "dfl")


def test_deflated_data_set_cut_before_deflating_is_truncated(deflated_series: list[Path],
                                                             tmp_path: Path) -> None:
    """A whole deflate stream around a cut data set: judged on the inflated bytes."""
    data = deflated_series[0].read_bytes()
    start = _data_set_start(data)
    inflated = zlib.decompress(data[start:], -zlib.MAX_WBITS)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    cut = tmp_path / "IM_cut_inflated.dcm"
    cut.write_bytes(data[:start] + deflater.compress(inflated[:-30]) + deflater.flush())
    reason, detail = dicom.integrity(str(cut))
    assert reason == dicom.TRUNCATED
    assert f"inflated data set has {len(inflated) - 30}" in detail
    for engine in ("auto", "gdcm", "pydicom"):
        (h,) = dicom.read_headers([str(cut)], engine=engine)
        assert h.reject == dicom.TRUNCATED, (engine, h)


def test_deflated_series_is_catalogued_as_one_usable_series(deflated_series: list[Path],
                                                            tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """End to end through the catalogue stage: 1 usable series, no rejects."""
    import pandas as pd

    from fedct.config import CatalogueParams
    from fedct.stages import catalogue

    archive = tmp_path / "archive"
    series_dir = archive / "A" / "ST01" / "SE001"
    series_dir.mkdir(parents=True)
    for p in deflated_series:
        shutil.copyfile(p, series_dir / p.name)
    monkeypatch.delenv("FEDCT_PSEUDONYM_KEY", raising=False)
    out = tmp_path / "catalogue"
    catalogue.run(CatalogueParams(workers=1, demo_key=True), archive, out, track=False,
                  progress=False)
    series = pd.read_parquet(out / "series.parquet")
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert len(rejects) == 0, rejects.to_dict("records")
    assert len(series) == 1
    row = series.iloc[0]
    assert bool(row["usable"]), row.to_dict()
    assert row["n_files"] == DEFLATED_SLICES
