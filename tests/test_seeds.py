"""``fedct seeds``: what it refuses before running any experiment (the runs themselves are in
``tests/test_pipeline.py``)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped by its new parent) is not running.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("how, stubborn", [("SIGTERM", False), ("SIGINT", False),
                                           ("SIGINT", True)])
def test_stopping_fedct_seeds_stops_the_experiment_and_its_children(
        tmp_path: Path, how: str, stubborn: bool) -> None:
    # `dvc exp run` starts stages that start workers: a stand-in command starts a child
    # that starts a grandchild, and records their PIDs; then the caller is stopped. A
    # stubborn group ignores SIGTERM: a second Ctrl-C must SIGKILL it at once, not cut the
    # cleanup short (the grace period here is longer than the test waits).
    pids = tmp_path / "pids"
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if stubborn else ""
    stand_in = (f"import os, signal, subprocess, sys, time; {ignore}"
                f"c = subprocess.Popen(['sleep', '300']); "
                f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{c.pid}}'); time.sleep(300)")
    # As from a terminal: Ctrl-C raises KeyboardInterrupt (a test worker may have started
    # this process with SIGINT ignored, which a child inherits).
    caller = (f"import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
              f"from pathlib import Path; from fedct.seeds import run_group; "
              f"run_group([{sys.executable!r}, '-c', {stand_in!r}], Path({str(tmp_path)!r}), "
              f"capture=False, grace_s={120 if stubborn else 5})")
    proc = subprocess.Popen([sys.executable, "-c", caller])
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and len(pids.read_text().split()) == 2):
            assert time.monotonic() < deadline and proc.poll() is None, "no experiment"
            time.sleep(0.1)
        started = [int(p) for p in pids.read_text().split()]
        assert all(_alive(p) for p in started)
        proc.send_signal(getattr(signal, how))
        if stubborn:
            time.sleep(2)
            assert all(_alive(p) for p in started)  # SIGTERM ignored: still there
            proc.send_signal(getattr(signal, how))  # the second Ctrl-C
        assert proc.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in started if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in (pids.read_text().split() if pids.exists() else []):
            try:
                os.kill(int(p), signal.SIGKILL)
            except ProcessLookupError:
                pass


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
