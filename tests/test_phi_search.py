"""The identifier search the PHI tests rely on: finds leaks, ignores chance digit runs."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.phi import assert_no_identifiers, identifier_pattern

IDS = ["DOE^JANE", "SYNA1234567", "ACCA76543210", "19650312"]


@pytest.mark.parametrize("text", [
    b"name=DOE^JANE;", b'{"pid": "SYNA1234567"}', b"ACCA76543210\n",
    b"born 19650312", b"born,1965-03-12,", b"\x0019650312\x00"])
def test_a_whole_identifier_is_found(text: bytes) -> None:
    assert identifier_pattern(IDS).search(text)


@pytest.mark.parametrize("text", [
    b"mtime_ns=1796503121234567890",  # the date's digits inside a longer number
    b"hash -4119650312000", b"XSYNA12345678", b"1965-03-13"])
def test_digits_inside_a_longer_token_are_not_an_identifier(text: bytes) -> None:
    assert identifier_pattern(IDS).search(text) is None


def test_parquet_cells_are_searched_decoded(tmp_path: Path) -> None:
    clean = tmp_path / "clean.parquet"
    pd.DataFrame({"mtime_ns": [1796503121234567890], "k": ["ab12"]}).to_parquet(clean)
    assert_no_identifiers([clean], IDS)
    leak = tmp_path / "leak.parquet"
    pd.DataFrame({"who": ["SYNA1234567"] * 50}).to_parquet(leak, compression="zstd")
    with pytest.raises(AssertionError, match="SYNA1234567.*leak.parquet"):
        assert_no_identifiers([leak], IDS)
