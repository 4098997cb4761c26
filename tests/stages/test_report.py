"""``fedct report``: writes the page, logs it to MLflow, and fails in one line on bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedct.cli import main
from tests.report.fakes import write_outputs
from tests.report.parse import SECTION_IDS, parse


@pytest.fixture
def outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the SQLite store puts run artifacts under ./mlruns
    return write_outputs(tmp_path / "outputs", skip=("federated",))


def test_the_command_writes_the_report_and_logs_it(outputs: Path, tmp_path: Path) -> None:
    import mlflow

    out = tmp_path / "site" / "report.html"
    result = CliRunner().invoke(main, ["report", str(outputs), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "not available: federated/<method>/history.csv" in result.output
    assert list(parse(out.read_text()).sections) == list(SECTION_IDS)
    runs = mlflow.search_runs(experiment_names=["fedct"], output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["fedct.stage"] == "report"
    assert runs[0].data.metrics["n_missing_inputs"] == 1
    logged = mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id,
                                                 artifact_path="report.html",
                                                 dst_path=str(tmp_path / "dl"))
    assert Path(logged).read_bytes() == out.read_bytes()


def test_a_malformed_input_is_one_line_naming_it(outputs: Path, tmp_path: Path) -> None:
    shutil.rmtree(outputs / "evaluate")
    (outputs / "evaluate").mkdir()
    bad = outputs / "evaluate" / "summary.csv"
    bad.write_text("model,site,dice\nA,C,0.5\n")
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", str(outputs), "-o", str(out)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and str(bad) in lines[0], lines
    assert not out.exists()
