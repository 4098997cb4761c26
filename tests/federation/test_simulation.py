"""Flower's simulation (ray) end to end: two sites, two rounds, a failing site, a killed run.

Each run starts ray and Flower in a child process (about 35 s on 2 cores, most of it
starting ray and importing torch in its workers) and must leave no process behind. That a
resumed federation ends with the weights of an uninterrupted one is shown, round by round
and without ray, in ``test_server_app.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from fedct.errors import FedctError
from fedct.federation.gateway import is_loopback
from fedct.federation.simulation import LOG_FILE, MARKER, RUN_LINE, Apps, run_federation
from fedct.model.io import load_model
from fedct.model.mc import mc_predict
from tests.federation.conftest import PARAMS, listening


def _leftovers(out: Path) -> list[psutil.Process]:
    """Live processes of the runs logged in ``out``, and live children of this process."""
    kids = [c for c in psutil.Process().children(recursive=True)
            if c.status() != psutil.STATUS_ZOMBIE and c.pid not in _BEFORE]
    return _tagged(out) + kids


def _tagged(out: Path) -> list[psutil.Process]:
    """Live processes tagged with a run that ``out``'s log names."""
    log = out / LOG_FILE
    runs = {line[len(RUN_LINE):].strip() for line in log.read_text(errors="replace")
            .splitlines() if line.startswith(RUN_LINE)} if log.exists() else set()
    found = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.environ().get(MARKER) in runs:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            continue
    return found


# Children this (pytest worker) process already had before any federation of this module:
# e.g. multiprocessing's resource tracker left by an earlier test file in the same worker.
_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before() -> None:
    _BEFORE.clear()
    _BEFORE.update(c.pid for c in psutil.Process().children(recursive=True))


# Fault injection: the test doubles of tests/federation/faults.py, which the simulation's
# child imports by name (Flower's "module:function" form), as it does fedct's own apps.
DIES_AFTER_ROUND_1 = Apps(server="tests.federation.faults:dying_server_app",
                          server_kwargs={"after_round": 1})


def failing(site: str, server_round: int) -> Apps:
    return Apps(client="tests.federation.faults:failing_client_app",
                client_kwargs={"site": site, "server_round": server_round})


def _federate(cohort: Path, out: Path, **kw):
    args = dict(sites=["A", "B"], train_params=PARAMS, rounds=2, local_steps=2, mu=0.0,
                min_clients=1, out_dir=out, seed=1, timeout_s=120.0)
    args.update(kw)
    return run_federation(cohort, **args)


@pytest.mark.slow
def test_a_killed_two_site_federation_resumes_and_merges_the_last_updates(
        fed_cohort: Path, tmp_path: Path) -> None:
    # The simulation process is SIGKILLed right after checkpointing round 1 ...
    with pytest.raises(FedctError, match="exit code -9"):
        _federate(fed_cohort, tmp_path, apps=DIES_AFTER_ROUND_1)
    assert _leftovers(tmp_path) == []  # ray's orphans were found and killed too
    assert not (tmp_path / "model.safetensors").exists()
    # ... and the next run trains round 2 only.
    seen: list[dict] = []
    history, model_path = _federate(fed_cohort, tmp_path, keep_updates=True,
                                    on_round=seen.append)
    assert [(r["round"], r["attempt"]) for r in history] == [(1, 1), (2, 2)]
    assert seen == history
    assert all(r["clients"] == 2 and r["failed"] == [] for r in history)
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in history)
    updates = tmp_path / "checkpoint" / "updates"
    assert sorted(p.name for p in updates.iterdir()) == ["round-2"]
    a, b = torch.load(updates / "round-2" / "A.pt"), torch.load(updates / "round-2" / "B.pt")
    model, card = load_model(model_path)
    # Site A has 2 training cases, B 3: the global model is 2/5 A + 3/5 B.
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.4 * a[k] + 0.6 * b[k], msg=k)
    assert card["federation"]["sites"] == ["A", "B"]
    # Each site's updates ran in a ray actor of one CPU: its card says so.
    clients = card["runtime"]["clients"]
    assert set(clients) == {"A", "B"}
    assert all(c["device"] == "cpu" and c["threads"] == 1 and c["torch"] == torch.__version__
               for c in clients.values())
    # MC dropout survives saving: two samples of the loaded model differ.
    samples = mc_predict(model, torch.rand(1, 1, 16, 16, 8), n_samples=2, batch=2, seed=0)
    assert samples.shape[0] == 2 and not torch.equal(samples[0], samples[1])
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_site_failing_mid_round_is_recorded_and_rejoins(fed_cohort: Path,
                                                         tmp_path: Path) -> None:
    history, _ = _federate(fed_cohort, tmp_path, apps=failing("B", 1))
    r1, r2 = history
    assert r1["clients"] == 1 and list(r1["weights"]) == ["A"]
    assert [f["site"] for f in r1["failed"]] == ["B"]
    assert "fault injection" in r1["failed"][0]["reason"]
    assert r2["clients"] == 2 and r2["failed"] == []
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_ray_listens_on_loopback_only(fed_cohort: Path, tmp_path: Path) -> None:
    # Every process of the run (the simulation's child, ray's GCS, raylet, agents and
    # workers), found by PID through the run's marker, looked at every second while it runs.
    sockets: list[tuple[int, str, str, int]] = []
    nice: dict[str, int] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            procs = _tagged(tmp_path)
            sockets.extend(listening(procs))
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    nice[" ".join(p.cmdline())[:60]] = p.nice()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        history, _ = _federate(fed_cohort, tmp_path, local_steps=1)
    finally:
        done.set()
        watcher.join()
    assert len(history) == 2
    assert {"gcs_server", "raylet"} <= {name for _, name, _, _ in sockets}, sockets
    assert [s for s in sockets if not is_loopback(s[2])] == []
    assert _leftovers(tmp_path) == []
    # The clients train at the caller's priority, as local models do (ray's default
    # renices its workers to 15, and any other job on the machine then starves them).
    actors = {k: v for k, v in nice.items() if "ClientAppActor" in k}
    assert actors and set(actors.values()) == {os.nice(0)}, nice


@pytest.mark.slow
def test_too_few_clients_stop_the_federation_with_a_reason(fed_cohort: Path,
                                                          tmp_path: Path) -> None:
    with pytest.raises(FedctError, match="fewer than the minimum of 2"):
        _federate(fed_cohort, tmp_path, rounds=1, min_clients=2, apps=failing("A", 1))
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_an_interrupted_caller_leaves_no_process(fed_cohort: Path, tmp_path: Path) -> None:
    class Interrupted(Exception):
        pass

    def stop(record: dict) -> None:
        raise Interrupted  # e.g. the stage's MLflow logging fails, or Ctrl-C

    with pytest.raises(Interrupted):
        _federate(fed_cohort, tmp_path, on_round=stop)
    assert _leftovers(tmp_path) == []


def _cmdline(p: psutil.Process) -> list[str]:
    """``p``'s command line, empty when it has just ended (ray's workers come and go)."""
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def _long_federation(cohort: Path, out: Path) -> subprocess.Popen:
    """A caller process running a 50-round federation into ``out``, to be stopped."""
    script = (
        "import sys; from pathlib import Path\n"
        "from fedct.federation.simulation import run_federation\n"
        "from tests.federation.conftest import PARAMS\n"
        "run_federation(Path(sys.argv[1]), ['A', 'B'], PARAMS, rounds=50, local_steps=2,\n"
        "               out_dir=Path(sys.argv[2]), timeout_s=120.0)\n")
    return subprocess.Popen([sys.executable, "-c", script, str(cohort), str(out)],
                            cwd=Path(__file__).parents[2])


@pytest.mark.slow
def test_a_terminated_caller_leaves_no_process(fed_cohort: Path, tmp_path: Path) -> None:
    # SIGTERM (a batch scheduler's time limit, `kill`, DVC stopping a stage) must stop the
    # simulation's own session and ray's agents too, not only the caller.
    caller = _long_federation(fed_cohort, tmp_path)
    try:
        deadline = time.monotonic() + 120
        # Wait until the simulation runs (the log names the run; its child has started).
        while not _tagged(tmp_path) and time.monotonic() < deadline:
            assert caller.poll() is None, "the federation ended before it could be stopped"
            time.sleep(0.5)
        assert _tagged(tmp_path), "the simulation never started"
        caller.send_signal(signal.SIGTERM)
        assert caller.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if caller.poll() is None:
            caller.kill()
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_caller_killed_outright_leaves_no_process(fed_cohort: Path, tmp_path: Path) -> None:
    # SIGKILL (the OOM killer, `kill -9`) runs no cleanup in the caller: the simulation's
    # child notices that its parent is gone and stops the run and ray's agents itself.
    caller = _long_federation(fed_cohort, tmp_path)
    try:
        deadline = time.monotonic() + 120
        # Wait until ray runs beside the child (more than the child carries the marker).
        while len(_tagged(tmp_path)) < 3 and time.monotonic() < deadline:
            assert caller.poll() is None, "the federation ended before it could be killed"
            time.sleep(0.5)
        assert len(_tagged(tmp_path)) >= 3, "ray never started"
        # The child's argument is the job file in the run's scratch folder.
        child = [cmd for cmd in map(_cmdline, _tagged(tmp_path))
                 if "fedct.federation.simulation" in cmd]
        scratch = Path(child[0][-1]).parent
        assert scratch.is_dir()
        caller.kill()
        assert caller.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while _tagged(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        if caller.poll() is None:
            caller.kill()
    left = _tagged(tmp_path)
    for p in left:  # not the code under test: only so that a failure leaves nothing behind
        p.kill()
    assert left == []
    assert not (tmp_path / "history.json").exists()  # the run was stopped, not finished
    assert not scratch.exists()  # ray's temp folder went with it


def test_a_child_whose_parent_died_before_it_watched_ends_its_run_at_once(
        tmp_path: Path) -> None:
    # The parent's PID travels in the job file: a child started after its parent was
    # killed (already re-parented) must not take its new parent for the original.
    run_id, scratch = "test-run-orphan", tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, MARKER: run_id}
    # A process of the run, as ray's agents would be.
    agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path\n"
         "from fedct.federation.simulation import _follow_parent\n"
         "_follow_parent(sys.argv[1], Path(sys.argv[2]), parent_pid=1, poll_s=0.1)\n"
         "time.sleep(120)\n", run_id, str(scratch)],
        env=env, start_new_session=True)
    try:
        assert child.wait(timeout=60) == -signal.SIGKILL  # its own process group, killed
        assert agent.wait(timeout=10) == -signal.SIGKILL
        assert not scratch.exists()
    finally:
        for proc in (agent, child):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_bad_settings_are_refused_before_anything_starts(fed_cohort: Path,
                                                         tmp_path: Path) -> None:
    with pytest.raises(FedctError, match="no labelled training cases for site 'C'"):
        _federate(fed_cohort, tmp_path, sites=["A", "C"])
    with pytest.raises(FedctError, match="initial model not found"):
        _federate(fed_cohort, tmp_path, init_model=tmp_path / "nope.pt")
    with pytest.raises(FedctError, match="min-clients 3"):
        _federate(fed_cohort, tmp_path, min_clients=3)
    assert not (tmp_path / "federation.log").exists()
