"""Process control: groups stopped by PID with a grace, SIGTERM as an exception, marked
processes found and stopped. Real processes, small graces."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from fedct import procs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped by its new parent) is not running.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


def _group(tmp_path: Path, leader_ignores: bool, child_ignores: bool):
    """A leader that starts a child (both in the leader's new group); their PIDs."""
    pids = tmp_path / f"pids-{uuid.uuid4().hex[:6]}"
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    child = f"import signal, time; {ignore if child_ignores else ''}time.sleep(300)"
    leader = (f"import os, signal, subprocess, sys, time; {ignore if leader_ignores else ''}"
              f"c = subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(0.5); "
              f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{c.pid}}'); time.sleep(300)")
    proc = procs.start_group([sys.executable, "-c", leader])
    deadline = time.monotonic() + 30
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline, "the group did not start"
        time.sleep(0.05)
    return proc, [int(p) for p in pids.read_text().split()]


def _cleanup(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_group_that_obeys_sigterm_stops_without_waiting_out_the_grace(tmp_path) -> None:
    proc, pids = _group(tmp_path, leader_ignores=False, child_ignores=False)
    try:
        assert os.getpgid(pids[1]) == proc.pid  # the child is in the leader's group
        t0 = time.monotonic()
        procs.stop_group(proc, grace_s=30)
        assert time.monotonic() - t0 < 10
        assert proc.returncode == -signal.SIGTERM
        time.sleep(0.2)
        assert not [p for p in pids if _alive(p)]
    finally:
        _cleanup(pids)


@pytest.mark.parametrize("leader_ignores", [True, False])
def test_what_ignores_sigterm_is_killed_after_the_grace(tmp_path, leader_ignores) -> None:
    # A member that ignores SIGTERM is killed even when the leader exits at once: the
    # grace is the whole group's, not only the leader's.
    proc, pids = _group(tmp_path, leader_ignores=leader_ignores, child_ignores=True)
    try:
        t0 = time.monotonic()
        procs.stop_group(proc, grace_s=1.5)
        took = time.monotonic() - t0
        assert 1.4 < took < 10
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if _alive(p)]
        assert proc.returncode == (-signal.SIGKILL if leader_ignores else -signal.SIGTERM)
    finally:
        _cleanup(pids)


def test_a_second_signal_while_stopping_kills_at_once_and_is_consumed(tmp_path) -> None:
    proc, pids = _group(tmp_path, leader_ignores=True, child_ignores=True)
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t0 = time.monotonic()
        procs.stop_group(proc, grace_s=60)
        assert time.monotonic() - t0 < 10
        assert proc.returncode == -signal.SIGKILL
        assert seen == []  # consumed: the caller's cleanup goes on
        os.kill(os.getpid(), signal.SIGTERM)  # afterwards the caller's handler is back
        time.sleep(0.1)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
        _cleanup(pids)


def test_stopping_a_group_that_is_gone_reaps_its_leader(tmp_path) -> None:
    proc = procs.start_group([sys.executable, "-c", "pass"])
    proc.wait()
    procs.stop_group(proc, grace_s=30)
    assert proc.returncode == 0


@pytest.mark.parametrize(("exception", "raised"), [
    (procs.interrupt, KeyboardInterrupt), (procs.exit_status, SystemExit)])
def test_sigterm_raises_while_inside_and_the_old_handler_returns(exception, raised) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(raised) as info, procs.raising(exception):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert str(info.value) in (f"signal {signal.SIGTERM}", str(128 + signal.SIGTERM))
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_no_handler_is_installed() -> None:
    before = signal.getsignal(signal.SIGTERM)
    got: list[object] = []

    def other() -> None:
        with procs.handling(lambda s, f: None) as installed:
            got.append(installed)
            got.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert got == [False, before]


def test_marked_processes_are_found_and_stopped_by_pid() -> None:
    marker = uuid.uuid4().hex
    env = {**os.environ, "FEDCT_TEST_MARKER": marker}
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
               "time.sleep(300)"
    polite = procs.start_group([sys.executable, "-c", "import time; time.sleep(300)"], env=env)
    deaf = procs.start_group([sys.executable, "-c", stubborn], env=env)
    other = procs.start_group([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        deadline = time.monotonic() + 30
        while len(found := procs.marked("FEDCT_TEST_MARKER", marker)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert sorted(p.pid for p in found) == sorted([polite.pid, deaf.pid])
        time.sleep(0.5)  # the stubborn one has set its handler
        t0 = time.monotonic()
        procs.stop_processes(found, grace_s=1.0)
        assert 0.9 < time.monotonic() - t0 < 10  # the deaf one waited out the grace
        codes = {p.pid: p.returncode for p in found}  # psutil reaped our children
        assert codes == {polite.pid: -signal.SIGTERM, deaf.pid: -signal.SIGKILL}
        assert procs.marked("FEDCT_TEST_MARKER", marker) == []
        assert other.poll() is None  # unmarked: untouched
    finally:
        for p in (polite, deaf, other):
            procs.kill_group(p)


@pytest.mark.parametrize("how, stubborn", [("SIGTERM", False), ("SIGINT", False),
                                           ("SIGINT", True)])
def test_stopping_run_group_stops_the_command_and_its_children(
        tmp_path: Path, how: str, stubborn: bool) -> None:
    # `fedct seeds` and `fedct study` run `dvc exp run` so, which starts stages that start
    # workers: a stand-in command starts a child that starts a grandchild, and records
    # their PIDs; then the caller is stopped. A
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
              f"from pathlib import Path; from fedct.procs import run_group; "
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
