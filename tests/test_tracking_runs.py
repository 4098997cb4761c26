"""A stage's MLflow run ends with what happened to the stage: FINISHED, FAILED on an
exception, KILLED when the process is stopped (SIGTERM, SIGINT) or interrupted; never
RUNNING for ever. The kill tests stop a real process that holds an open run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedct import tracking

SRC = Path(__file__).resolve().parents[1] / "src"
# A stage that opens its run, says so, and then works for longer than the test waits.
HOLDER = """
import time
from fedct import tracking
with tracking.start_run("train", run_name="held") as run:
    print(run.run_id, flush=True)
    time.sleep(120)
"""


def _status(run_id: str) -> str:
    import mlflow

    tracking.configure()
    return mlflow.MlflowClient().get_run(run_id).info.status


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_killed_stage_ends_its_run_as_killed(sig: int, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.stderr.read()
        assert _status(run_id) == "RUNNING"
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # stopped by its PID whatever happened above
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode != 0
    assert _status(run_id) == "KILLED"


def test_an_exception_ends_the_run_failed_and_propagates() -> None:
    with pytest.raises(ZeroDivisionError):
        with tracking.start_run("evaluate") as run:
            run_id = run.run_id
            1 / 0  # noqa: B018 - the stage's bug
    assert _status(run_id) == "FAILED"


def test_an_interrupt_in_process_ends_the_run_killed_and_a_clean_one_finished() -> None:
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run("train") as run:
            killed = run.run_id
            raise KeyboardInterrupt
    with tracking.start_run("train") as run:
        finished = run.run_id
    assert (_status(killed), _status(finished)) == ("KILLED", "FINISHED")
    # The SIGTERM handler is the caller's again outside the run.
    assert signal.getsignal(signal.SIGTERM) is handler


def test_nested_runs_end_with_their_own_status() -> None:
    with pytest.raises(RuntimeError):
        with tracking.start_run("federate") as parent:
            with tracking.start_run("federate", nested=True) as child:
                child_id = child.run_id
            parent_id = parent.run_id
            raise RuntimeError("after the child finished")
    assert (_status(child_id), _status(parent_id)) == ("FINISHED", "FAILED")
