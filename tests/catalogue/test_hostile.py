"""Hostile files beside good ones (security issue #24): each costs its own series, never
the run, and a SeriesInstanceUID shared by two patients never merges them.

- A deflate bomb (Deflated Explicit VR Little Endian, 512 MiB of pixel data in ~0.5 MB)
  is scanned in a subprocess whose peak memory must stay flat, by every header reader.
- Headers no CT has (65535 x 65535 over tiny pixel data, NaN or non-positive thickness or
  spacing) are rejected by name with the reason "implausible value".
- A file name that is not UTF-8 is catalogued with its exact bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

import fedct
from fedct import dicom
from fedct.catalogue import PATHS_DIRNAME
from fedct.catalogue.pseudonym import KEY_ENV
from fedct.stages import catalogue as stage
from tests.catalogue.archive import PARAMS, series_key
from tests.dicom.writers import FAKE_PATIENTS, write_deflate_bomb, write_series

BOMB_BYTES = 512 << 20
# Peak RSS of the scanning process: the interpreter with pandas, pyarrow, pydicom and gdcm
# takes ~200 MiB; inflating the bomb would add at least its 512 MiB (the original reader
# held it 3 times over).
MAX_RSS_MIB = 400

_SCAN = """
import json, resource, sys
from fedct import dicom
from fedct.config import CatalogueParams
from fedct.stages import catalogue
bomb, archive, out = sys.argv[1:4]
found = {e: [h.reject, h.detail] for e in dicom.ENGINES
         for h in dicom.read_headers([bomb], engine=e)}
result = catalogue.run(CatalogueParams(workers=1, demo_key=True), archive, out, track=False,
                       progress=False)
# Peak RSS of this process: VmHWM (ru_maxrss keeps the forking parent's, pytest's, peak).
try:
    with open("/proc/self/status") as fh:
        peak_kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
except OSError:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"found": found, "metrics": result.metrics, "max_rss_mib": peak_kib / 1024}))
"""


def test_a_deflate_bomb_is_rejected_with_flat_memory(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    good = write_series(archive / "A" / "ST1" / "SE1", 34, patient=FAKE_PATIENTS[0])
    bomb = write_deflate_bomb(archive / "A" / "ST2" / "SE1" / "IM00001.dcm", BOMB_BYTES,
                              patient=FAKE_PATIENTS[1])
    assert bomb.stat().st_size < BOMB_BYTES // 500
    env = {**os.environ, "PYTHONPATH": str(Path(fedct.__file__).parents[1])}
    env.pop(KEY_ENV, None)
    proc = subprocess.run([sys.executable, "-c", _SCAN, str(bomb), str(archive),
                           str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["max_rss_mib"] < MAX_RSS_MIB, got
    for engine, (reason, detail) in got["found"].items():
        assert reason == dicom.IMPLAUSIBLE, (engine, reason, detail)
        assert f"PixelData holds {BOMB_BYTES} bytes" in detail
    rejects = pd.read_parquet(tmp_path / "out" / PATHS_DIRNAME / "rejects.parquet")
    assert rejects.set_index("path")["reason"].to_dict() == {
        "A/ST2/SE1/IM00001.dcm": dicom.IMPLAUSIBLE}
    series = pd.read_parquet(tmp_path / "out" / "series.parquet")
    assert series["usable"].tolist() == [True]
    assert series["n_files"].tolist() == [len(good)]


def _hostile_archive(root: Path) -> dict[str, tuple[str, str]]:
    """A good series per patient, and per attack a series of its own; returns series
    folder -> (reason, words of the detail) of the attacks."""
    attacks = {
        "huge": ({"Rows": 65535, "Columns": 65535}, "Rows 65535 (not within 1-4096)"),
        "nan_thickness": ({"SliceThickness": "NaN"}, "SliceThickness NaN"),
        "negative_thickness": ({"SliceThickness": "-1"}, "SliceThickness -1"),
        "zero_spacing": ({"PixelSpacing": ["0", "0.7"]}, "PixelSpacing 0\\0.7"),
        "nan_between": ({"SpacingBetweenSlices": "NaN"}, "SpacingBetweenSlices NaN"),
    }
    for i, patient in enumerate(FAKE_PATIENTS):
        write_series(root / "A" / f"P{i}" / "good", 34, patient=patient)
    expected = {}
    for name, (changes, words) in attacks.items():
        for f in write_series(root / "A" / "P0" / name, 34, patient=FAKE_PATIENTS[0]):
            ds = pydicom.dcmread(f)
            for kw, value in changes.items():
                setattr(ds, kw, value)
            ds.save_as(f)
        expected[f"A/P0/{name}"] = (dicom.IMPLAUSIBLE, words)
    return expected


def test_implausible_headers_are_rejected_by_name_and_good_series_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    expected = _hostile_archive(tmp_path / "archive")
    result = stage.run(dataclasses.replace(PARAMS, workers=1), tmp_path / "archive",
                       tmp_path / "out", track=False, progress=False)
    rejects = pd.read_parquet(result.local_rejects_path)
    folder = rejects["path"].str.rsplit("/", n=1).str[0]
    for name, (reason, words) in expected.items():
        mine = rejects[folder == name]
        assert len(mine) == 34 and (mine["reason"] == reason).all(), name
        assert mine["detail"].str.contains(words, regex=False).all(), (name, mine["detail"])
    assert set(folder) == set(expected)  # nothing else rejected
    series = pd.read_parquet(result.series_path)
    assert len(series) == 3 and series["usable"].all() and (series["n_files"] == 34).all()
    assert result.metrics["n_implausible"] == 34 * len(expected)


def test_a_file_name_that_is_not_utf8_keeps_its_exact_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    archive = tmp_path / "archive"
    paths = write_series(archive / "A" / "ST1" / "SE1", 34, patient=FAKE_PATIENTS[0])
    raw = os.fsencode(archive) + b"/A/ST1/SE1/IM\xe9\xff.dcm"
    os.rename(paths[0], raw)
    result = stage.run(dataclasses.replace(PARAMS, workers=1), archive, tmp_path / "out",
                       track=False, progress=False)
    assert pd.read_parquet(result.rejects_path).empty
    series = pd.read_parquet(result.series_path)
    assert series["usable"].tolist() == [True] and series["n_files"].tolist() == [34]
    files = pd.read_parquet(result.series_files_path)
    odd = files[files["relpath_bytes"].notna()]
    assert odd["relpath_bytes"].tolist() == [b"A/ST1/SE1/IM\xe9\xff.dcm"]
    assert odd["relpath"].tolist() == ["A/ST1/SE1/IM\\xe9\\xff.dcm"]  # as text, escaped
    exact = dicom.files.exact_path(odd["relpath"].iloc[0], odd["relpath_bytes"].iloc[0])
    assert os.path.isfile(os.path.join(archive, exact))


def _uid_clash_archive(root: Path, same_geometry: bool) -> str:
    """Two patients' series share one SeriesInstanceUID (a broken modality); the second
    patient's files are 1 mm further along, and with ``same_geometry`` False also 16 x 16."""
    uid = generate_uid()
    write_series(root / "A" / "P0" / "SE1", 34, series_uid=uid, patient=FAKE_PATIENTS[0])
    other = {} if same_geometry else {"rows": 16, "cols": 16}
    write_series(root / "A" / "P1" / "SE1", 34, series_uid=uid, z0=0.5,
                 patient=FAKE_PATIENTS[1], **other)
    return uid


@pytest.mark.parametrize("same_geometry", [True, False])
def test_a_series_uid_shared_by_two_patients_gives_two_series(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_geometry: bool) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    uid = _uid_clash_archive(tmp_path / "archive", same_geometry)
    result = stage.run(dataclasses.replace(PARAMS, workers=1), tmp_path / "archive",
                       tmp_path / "out", track=False, progress=False)
    series = pd.read_parquet(result.series_path)
    # Two series of 34 slices, each one patient's, both usable: never one of 68.
    assert len(series) == 2 and series["patient_key"].nunique() == 2
    assert series["n_slices"].tolist() == [34, 34] and series["usable"].all()
    assert series["series_key"].is_unique and (series["series_key"] != series_key(uid)).all()
    assert (series["uid_key"] == series_key(uid)).all() and series["uid_shared"].all()
    files = pd.read_parquet(result.series_files_path)
    for key, group in files.groupby("series_key"):
        assert group["relpath"].str.split("/").str[1].nunique() == 1, key  # one patient
    m = result.metrics
    assert m["n_shared_series_uids"] == 1 and m["n_series_of_shared_uids"] == 2
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())[
        "n_shared_series_uids"] == 1
