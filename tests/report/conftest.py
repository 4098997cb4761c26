from __future__ import annotations

from pathlib import Path

import pytest

from tests.report.fakes import write_outputs


@pytest.fixture(scope="session")
def full_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every input of the report (read only: copy it before changing a file)."""
    return write_outputs(tmp_path_factory.mktemp("outputs"))
