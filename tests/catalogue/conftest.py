"""One catalogue of the test archive, shared by the catalogue's test modules."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedct.catalogue.pseudonym import KEY_ENV
from fedct.stages import catalogue as stage
from tests.catalogue.archive import PARAMS, build_archive


@pytest.fixture(scope="package")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("archive")
    return root, build_archive(root)


@pytest.fixture(scope="package")
def catalogued(archive: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory):
    """One catalogue of the archive on the local process pool (2 workers)."""
    root, _ = archive
    out = tmp_path_factory.mktemp("catalogue")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(KEY_ENV, raising=False)
        result = stage.run(PARAMS, root, out, track=False, progress=False)
    # The rejects with their paths: the site's own copy (the pushed one has file keys).
    return result, pd.read_parquet(out / "series.parquet"), pd.read_parquet(
        result.local_rejects_path)
