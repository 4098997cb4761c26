"""Every command turns bad input into one line naming the file or key, and exit status 1."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fedct.cli import main

REPO_PARAMS = Path(__file__).parents[1] / "params.yaml"


def _invoke(args: list[str]):
    result = CliRunner().invoke(main, args)
    return result, result.output.strip().splitlines()


@pytest.mark.parametrize("command", ["synth", "catalogue", "cohort", "train", "uncertainty"])
def test_broken_params_file_is_one_line_for_every_command(tmp_path: Path, command: str) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text(REPO_PARAMS.read_text().replace("  seed:", "  seeed:", 1))
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    args = {"synth": [str(tmp_path / "a"), "--truth", str(tmp_path / "t")],
            "catalogue": [str(tmp_path / "a"), str(tmp_path / "b")],
            "cohort": [str(tmp_path / "a"), str(tmp_path / "b"), "--archive", str(tmp_path / "c")],
            "train": [str(tmp_path / "a"), str(tmp_path / "b"), "--site", "A"],
            "uncertainty": [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")]}
    result, lines = _invoke([command, *args[command], "--params", str(bad)])
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and "seeed" in lines[0] and str(bad) in lines[0], lines
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_stage_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "cohort").mkdir()
    result, lines = _invoke(["train", str(tmp_path / "cohort"), str(tmp_path / "m"),
                             "--site", "A", "--params", str(REPO_PARAMS)])
    assert result.exit_code == 1
    assert len(lines) == 1 and "cohort.csv: not found" in lines[0], lines
    (tmp_path / "models").mkdir()
    result, lines = _invoke(["uncertainty", str(tmp_path / "cohort"), str(tmp_path / "models"),
                             str(tmp_path / "u"), "--params", str(REPO_PARAMS)])
    assert result.exit_code == 1 and len(lines) == 1 and "cohort.csv" in lines[0], lines
