"""``fedct predict`` answers hostile DICOM with one line (a fedct error), never a traceback.

Each input is a series folder with one attack (security issue #24): a deflate bomb among
good slices, a 65535 x 65535 header over tiny pixel data, NaN or negative SliceThickness,
NaN PixelSpacing, and a file name that is not UTF-8 (bytes-exact: it is segmented).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import fedct
from fedct.cli import main
from tests.dicom.writers import write_deflate_bomb
from tests.inference.conftest import write_series


def _with_header(folder: Path, **changes: object) -> Path:
    import pydicom

    write_series(folder)
    for f in sorted(folder.iterdir())[:3]:
        ds = pydicom.dcmread(f)
        for kw, value in changes.items():
            setattr(ds, kw, value)
        ds.save_as(f)
    return folder


def _bomb(folder: Path) -> Path:
    write_series(folder)
    write_deflate_bomb(folder / "IM99999.dcm", 64 << 20)
    return folder


def _non_utf8_name(folder: Path) -> Path:
    paths = write_series(folder)
    os.rename(paths[5], os.fsencode(folder) + b"/IM\xe9\xff.dcm")
    return folder


HOSTILE = {
    "deflate bomb": (_bomb, "implausible value"),
    "65535 x 65535": (lambda f: _with_header(f, Rows=65535, Columns=65535),
                      "Rows 65535 (not within 1-4096)"),
    "NaN thickness": (lambda f: _with_header(f, SliceThickness="NaN"),
                      "SliceThickness NaN (not a positive number of mm)"),
    "thickness -1": (lambda f: _with_header(f, SliceThickness="-1"),
                     "SliceThickness -1 (not a positive number of mm)"),
    "NaN spacing": (lambda f: _with_header(f, PixelSpacing=["NaN", "1"]),
                    "PixelSpacing NaN\\1 (not two positive numbers of mm)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_predict_refuses_a_hostile_series_in_one_line(case: str, model_dir: Path,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make, reason = HOSTILE[case]
    folder = make(tmp_path / "CT")
    result = CliRunner().invoke(main, ["predict", str(model_dir), str(folder), "-o",
                                       str(tmp_path / "out")])
    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and reason in errors[0], result.output
    assert not (tmp_path / "out" / "segmentation.nii.gz").exists()


def test_predict_segments_a_series_with_a_file_name_that_is_not_utf8(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = _non_utf8_name(tmp_path / "CT")
    result = CliRunner().invoke(main, ["predict", str(model_dir), str(folder), "-o",
                                       str(tmp_path / "out"), "--mc-samples", "2"])
    assert "Traceback" not in result.output and result.exit_code == 0, result.output
    assert (tmp_path / "out" / "segmentation.nii.gz").is_file()


def test_an_error_naming_a_file_that_is_not_utf8_is_one_printable_line(
        model_dir: Path, tmp_path: Path) -> None:
    """Through a real process and its stderr: the name's bytes are printed as \\xNN."""
    folder = _non_utf8_name(tmp_path / "CT")
    with open(os.fsencode(folder) + b"/IM\xe9\xff.dcm", "wb") as fh:
        fh.write(b"\x00" * 200)  # a .dcm that is not DICOM: a corrupt image
    env = {**os.environ, "PYTHONPATH": str(Path(fedct.__file__).parents[1]),
           "PYTHONIOENCODING": "utf-8:strict"}
    proc = subprocess.run([sys.executable, "-c", "from fedct.cli import main; main()",
                           "predict", str(model_dir), os.fsencode(folder), "-o",
                           str(tmp_path / "out")], capture_output=True, env=env,
                          cwd=tmp_path, timeout=300, check=False)
    err = proc.stderr.decode()
    assert "Traceback" not in err and proc.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "IM\\xe9\\xff.dcm: not DICOM" in errors[0], err
