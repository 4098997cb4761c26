"""Shared fixtures: a tiny synthetic archive generated once per test session (worker)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The ``tiny`` profile archive: 10 sites x 3 patients, 24x24 pixels (seconds)."""
    from fedct.synth.archive import generate

    root = tmp_path_factory.mktemp("tiny")
    paths = {"archive": root / "archive", "labels": root / "labels", "truth": root / "truth"}
    generate(paths["archive"], paths["labels"], paths["truth"], "tiny", seed=11, workers=2)
    return paths


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own MLflow store, never the user's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "mlartifacts"))
