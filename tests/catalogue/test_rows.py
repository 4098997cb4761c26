"""Per-file rows: every file of pydicom's odd test set is catalogued or rejected."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from fedct import dicom
from fedct.catalogue.pseudonym import KEY_ENV
from fedct.stages import catalogue as stage
from tests.catalogue.archive import PARAMS
from tests.dicom.writers import copy_testdata


def test_pydicom_test_files_are_all_accounted_for(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    root = tmp_path / "odd"
    copied = copy_testdata(root)
    result = stage.run(dataclasses.replace(PARAMS, workers=1), root, tmp_path / "out",
                       track=False, progress=False)
    m = result.metrics
    assert m["n_files"] == len(set(copied))  # pydicom may list a downloaded file twice
    assert m["n_catalogued_files"] + m["n_rejects"] == m["n_files"]
    rejects = pd.read_parquet(result.local_rejects_path)
    assert rejects["reason"].isin(dicom.REJECT_REASONS).all()
    assert "CT_small.dcm" not in set(rejects["path"])  # a CT image: catalogued
    assert m["n_series"] >= 1
