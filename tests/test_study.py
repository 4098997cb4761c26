"""`fedct study`: the overlay, the runs it plans, and resuming after a cut-off, with the
DVC experiments replaced by fakes (the real runs are hours; docs/study.md)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from fedct import study
from fedct.config import ConfigError
from fedct.overlay import load_overlay
from tests.analysis.test_study_tables import fake_outputs

REPO = Path(__file__).parents[1]


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "profiles").mkdir()
    shutil.copy(REPO / "profiles" / "study.yaml", tmp_path / "profiles" / "study.yaml")
    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "study"]):
        subprocess.run([*git, *args], cwd=tmp_path, check=True)
    monkeypatch.setattr(study, "params_edited", lambda repo, path: False)
    monkeypatch.setattr(study, "tracking_env", lambda: {})
    return tmp_path


def fake_run(name: str) -> dict:
    evaluate, uncertainty, ranking, cases = fake_outputs()
    return {"evaluate": evaluate, "uncertainty": uncertainty,
            "ranking": pd.DataFrame({"site": ranking}), "cases": cases,
            "decision": {"promote": False}, "convergence": {"cap_hit_fraction": 0.0},
            "federated": {"fedavg_best_round": 3, "fedavg_last_round": 4},
            "card": {"runtime": {"device": "cpu", "cpu": "Some CPU", "threads": 2}}}


def test_the_study_overlay_is_checked_and_plans_new_seeds_only(repo: Path) -> None:
    params, runs, flat = load_overlay("profiles/study.yaml")
    assert params.synth.profile == "study" and params.evaluate.best_local_on == "val"
    assert set(params.cohort.control_sites) < set(params.cohort.holdout_sites)
    assert flat["cohort.holdout_sites"] == ["C", "G", "H", "J"]
    from fedct.config import load_params
    todo = study.plan(params, load_params(), runs.train_seeds)
    assert len(todo) >= 4 and len({(s, c) for s, c, _ in todo}) >= 2
    assert len(runs.train_seeds) >= 2
    args = study.run_command(flat, *todo[0])
    assert args[:5] == ["exp", "run", "--temp", "-n", study.experiment_name(*todo[0])]
    assert "cohort.holdout_sites=[C,G,H,J]" in args and "uncertainty.heldout_flag=true" in args
    assert f"train.seed={todo[0][2]}" in args and f"federate.seed={todo[0][2]}" in args
    assert args[-1] == "promote"
    # A typo and a seed that development already saw are refused by name.
    bad = repo / "profiles" / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_overlay(bad)
    bad.write_text("synth:\n  report_seeds: [5202]\ncohort:\n  report_seeds: [999]\n")
    p, r, _ = load_overlay(bad)
    with pytest.raises(Exception, match="5202"):
        study.plan(p, load_params(), r.train_seeds)


def test_each_finished_run_is_a_row_and_a_rerun_resumes_after_a_cut_off(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []

    class Done:
        returncode = 0

    def fake_dvc(args, repo_, env=None, capture=True):
        name = args[4]
        if len(ran) == 2 and not getattr(fake_dvc, "resumed", False):
            raise KeyboardInterrupt("cut off")  # the third run is stopped
        ran.append(name)
        return Done()

    monkeypatch.setattr(study, "existing_experiments", lambda repo_: set(ran))
    monkeypatch.setattr(study, "run_dvc", fake_dvc)
    monkeypatch.setattr(study, "read_run", lambda repo_, name: fake_run(name))
    out = repo / "results" / "study"
    with pytest.raises(KeyboardInterrupt):
        study.run(Path("profiles/study.yaml"), out)
    first = pd.read_csv(out / study.RUNS_FILE, dtype={"report_seed": str})
    assert len(first) == 2 and list(first.columns) == list(study.RUN_COLUMNS)
    assert (out / study.POOLED_FILE).is_file()
    fake_dvc.resumed = True
    runs = study.run(Path("profiles/study.yaml"), out)
    assert len(ran) == len(runs) == 4  # the two finished runs were not run again
    assert runs[["report_seed", "train_seed"]].drop_duplicates().shape[0] == 4
    assert (runs["device"] == "Some CPU, 2 threads").all()
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo,
                          capture_output=True, text=True).stdout.strip()
    assert len(head) == 12 and (runs["commit"] == head).all()
    # A run whose experiment exists but whose row was lost is read back, not rerun.
    pd.read_csv(out / study.RUNS_FILE).iloc[:3].to_csv(out / study.RUNS_FILE, index=False)
    again = study.run(Path("profiles/study.yaml"), out)
    assert len(ran) == 4 and len(again) == 4 and pd.isna(again["runtime_min"].iloc[-1])
    pooled = __import__("json").loads((out / study.POOLED_FILE).read_text())
    assert pooled["n_runs"] == 4 and len(pooled["report_seeds"]) == 2
    # Every label-free method of every run, once (the run read back replaced its rows).
    methods = pd.read_csv(out / study.METHODS_FILE, dtype={"report_seed": str})
    assert list(methods.columns) == list(study.METHOD_COLUMNS)
    per_run = methods.groupby(["report_seed", "train_seed"])["method"].apply(sorted)
    assert len(per_run) == 4 and all(m == ["steered", "tent"] for m in per_run)
    assert (again["primary_label_free"] == load_overlay(
        "profiles/study.yaml")[0].federate.primary_label_free).all()


def test_queue_puts_the_missing_runs_into_dvcs_queue_and_writes_no_row(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    class Done:
        returncode, stderr = 0, ""

    monkeypatch.setattr(study, "existing_experiments", lambda repo_: {"study-5301-331-t0"})
    monkeypatch.setattr(study, "run_dvc", lambda args, *a, **k: calls.append(args) or Done())
    runs = study.run(Path("profiles/study.yaml"), repo / "out", queue=True)
    assert runs.empty and not (repo / "out" / study.RUNS_FILE).exists()
    assert [c[:3] for c in calls] == [["exp", "run", "--queue"]] * 3  # one already exists
    assert "study-5301-331-t0" not in {c[4] for c in calls}
