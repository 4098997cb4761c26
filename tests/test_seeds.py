"""``fedct seeds``: what it refuses before running any experiment (the runs themselves are in
``tests/test_pipeline.py``)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from fedct import seeds
from fedct.config import Params
from fedct.errors import FedctError


@pytest.mark.parametrize(("federate", "reason"), [
    ({"primary_label_free": "fedavg"}, "primary_label_free 'fedavg': not one of"),
    ({"primary_label_free": "no_such_method"}, "primary_label_free 'no_such_method'"),
    # A label-free method that federate does not run.
    ({"methods": ("one_shot", "fedavg", "tent")}, "uw_select.*\\['tent'\\]"),
    # Nothing to judge it against.
    ({"methods": ("fedprox", "tent", "uw_select"), "select_from": ("fedprox",)},
     "against FedAvg"),
])
def test_the_label_free_question_must_be_answerable(federate: dict, reason: str,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not a repository: nothing could run anyway
    params = Params()
    params = dataclasses.replace(params, federate=dataclasses.replace(params.federate,
                                                                      **federate))
    with pytest.raises(FedctError, match=reason):
        seeds.run(params, tmp_path / "out")


def test_experiments_of_the_commit_are_not_reused_for_edited_params(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Experiment names hold only the seeds: with params.yaml edited after the commit, the
    # commit's experiments ran with other params and must not be summarised as these.
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("train: {steps: 400}\n")
    subprocess.run([*git, "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "p"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    params = Params()
    names = {f"report-{s}-{c}" for s, c in zip(params.synth.report_seeds,
                                               params.cohort.report_seeds, strict=True)}
    monkeypatch.setattr(seeds, "existing_experiments", lambda repo: names)
    read: list[str] = []

    def fake_read(repo: Path, name: str) -> dict:
        read.append(name)
        raise FedctError("read")

    monkeypatch.setattr(seeds, "read_experiment", fake_read)
    with pytest.raises(FedctError, match="read"):  # unedited: the experiments are read
        seeds.run(params, tmp_path / "out", run_missing=False)
    assert read
    (tmp_path / "params.yaml").write_text("train: {steps: 800}\n")
    with pytest.raises(FedctError, match="params.yaml differs from the commit"):
        seeds.run(params, tmp_path / "out", run_missing=False)
    # Nor are new ones run with the edit (they would later pass for the commit's).
    ran: list = []
    monkeypatch.setattr(seeds, "existing_experiments", lambda repo: set())
    monkeypatch.setattr(seeds, "run_experiment", lambda *a, **k: ran.append(a))
    for force in (False, True):
        with pytest.raises(FedctError, match="params.yaml differs from the commit"):
            seeds.run(params, tmp_path / "out", force=force)
    assert ran == []


def test_another_params_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from fedct.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.yaml").write_text("{}")
    result = CliRunner().invoke(main, ["seeds", "--params", "other.yaml", "--no-run"])
    assert result.exit_code == 1
    assert "--params other.yaml: the experiments run with the repository's params.yaml" \
        in result.output
