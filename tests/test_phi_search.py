"""The identifier search the PHI tests rely on: finds leaks, ignores chance digit runs."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from tests.phi import assert_no_identifiers, find_identifier

IDS = ["SYNTHSATO^REN^A0001", "SYNA1234567", "ACCA76543210", "19650312", float("nan")]


@pytest.mark.parametrize("text", [
    b"name=SYNTHSATO^REN^A0001;", b"Synthsato Ren A0001", b"dir/synthsato/x",
    b'{"pid": "SYNA1234567"}', b"siteSYNA12345670a1b2c3", b"syna1234567_ct",
    b"ACCA76543210\n", b"born 19650312", b"born,1965-03-12,", b"\x0019650312\x00"])
def test_a_leaked_identifier_is_found_in_any_spelling(text: bytes) -> None:
    assert find_identifier(text, IDS)


@pytest.mark.parametrize("text", [
    b"mtime_ns=1796503121234567890",  # the date's digits inside a longer number
    b"hash -4119650312000", b"1965-03-13", b"current rendering", b"nan"])
def test_chance_digits_short_name_parts_and_empty_cells_are_not_identifiers(text: bytes) -> None:
    assert find_identifier(text, IDS) is None


def test_parquet_and_sqlite_cells_are_searched_decoded(tmp_path: Path) -> None:
    clean = tmp_path / "clean.parquet"
    pd.DataFrame({"mtime_ns": [1796503121234567890], "k": ["ab12"]}).to_parquet(clean)
    assert assert_no_identifiers([clean, tmp_path], IDS) == 1
    leak = tmp_path / "leak.parquet"
    pd.DataFrame({"who": ["SYNA1234567"] * 50}).to_parquet(leak, compression="zstd")
    with pytest.raises(AssertionError, match="SYNA1234567.*leak.parquet"):
        assert_no_identifiers([leak], IDS)
    # A date as a value packed between digits of neighbouring cells.
    db = tmp_path / "runs.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE params (k TEXT, v TEXT, run TEXT)")
        con.execute("INSERT INTO params VALUES ('dob', '19650312', '3a9f0c')")
    with pytest.raises(AssertionError, match="19650312.*runs.db"):
        assert_no_identifiers([db], IDS)


def test_files_named_by_hash_are_read_by_their_bytes(tmp_path: Path) -> None:
    """A DVC remote names files by their md5: Parquet, npz and gzip are told by content."""
    import gzip

    import numpy as np

    pq_file = tmp_path / "3f" / "a9c1"
    pq_file.parent.mkdir()
    pd.DataFrame({"p": ["A/SYNA1234567/SE2/IM1.dcm"] * 50}).to_parquet(pq_file,
                                                                     compression="zstd")
    npz = tmp_path / "npz"
    with npz.open("wb") as f:
        np.savez_compressed(f, image=np.zeros(3), who=np.array(["ACCA76543210"]))
    gz = tmp_path / "gz"
    gz.write_bytes(gzip.compress(b"born 19650312" + bytes(range(256)) * 40))
    for path, found in ((pq_file, "SYNA1234567"), (npz, "ACCA76543210"), (gz, "19650312")):
        with pytest.raises(AssertionError, match=found):
            assert_no_identifiers([path], IDS)


def test_a_missing_output_is_an_error_not_a_pass(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="missing"):
        assert_no_identifiers([tmp_path / "mlflow.db"], IDS)
    with pytest.raises(AssertionError, match="no file searched"):
        assert_no_identifiers([tmp_path], IDS)
