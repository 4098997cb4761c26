"""Process control: process groups started and stopped by PID, and SIGTERM as an exception.

Every fedct command that starts other programs (the MLflow server, `dvc exp run`, Flower's
simulation and deployment) starts each in a session of its own (``start_group``), so that
the program's whole process group (the children it starts too) can be stopped through
its leader's PID (``stop_group``: SIGTERM, then SIGKILL after a grace; ``run_group``: run
and wait, and stop the group if this process is stopped). Processes that leave the group
(ray's agents, the SuperLink's SuperExec) carry a marker in their environment instead
(``marked``, ``stop_processes``). Nothing is ever stopped by name.

SIGTERM (a scheduler at its time limit, ``kill``, ``dvc`` stopping a stage) ends a Python
process at once by default, skipping every ``finally``; while ``raising`` is active it
raises an exception in the main thread instead, so that those ``finally`` blocks stop what
the process started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fedct.errors import FedctError

STOP_GRACE_S = 15.0  # SIGTERM -> SIGKILL
KILL_WAIT_S = 10.0  # how long to wait for a SIGKILLed leader to be reaped
POLL_S = 0.1

Handler = Callable[[int, Any], None]


@contextlib.contextmanager
def handling(handler: Handler, signals: Iterable[int] = (signal.SIGTERM,)
             ) -> Iterator[bool]:
    """``handler`` for ``signals`` while inside, the previous handlers restored after.

    Signal handlers live in the main thread: elsewhere nothing is installed, and the
    block sees False (True when the handler is in place).
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield True
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def interrupt(signum: int) -> BaseException:
    """A signal as Ctrl-C: ``KeyboardInterrupt("signal N")``."""
    return KeyboardInterrupt(f"signal {signum}")


def exit_status(signum: int) -> BaseException:
    """A signal as ``SystemExit(128 + N)``, the status a shell reports for it."""
    return SystemExit(128 + signum)


@contextlib.contextmanager
def raising(exception: Callable[[int], BaseException] = interrupt,
            signals: Iterable[int] = (signal.SIGTERM,)) -> Iterator[None]:
    """While inside, ``signals`` raise ``exception(signum)`` in the main thread, so that
    the ``finally`` blocks that stop what this process started run (elsewhere: as is)."""

    def handler(signum: int, frame: Any) -> None:
        raise exception(signum)

    with handling(handler, signals):
        yield


def start_group(argv: Sequence[str], **popen: Any) -> subprocess.Popen:
    """``subprocess.Popen(argv, **popen)`` in a new session: its process group's id is its
    PID, which ``stop_group`` stops."""
    return subprocess.Popen(list(argv), start_new_session=True, **popen)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False when no process is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal: the group is not empty
        pass
    return True


def kill_group(proc: subprocess.Popen, wait_s: float | None = KILL_WAIT_S) -> None:
    """SIGKILL the process group of ``proc`` at once and reap its leader (waiting up to
    ``wait_s`` seconds for it; None: as long as it takes)."""
    _signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=wait_s)


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group of ``proc`` (started by ``start_group``), SIGKILL what is
    left of it after ``grace_s``, and reap the leader.

    The grace ends early when the whole group is gone, and at once on a SIGINT or SIGTERM
    to this process meanwhile (Ctrl-C pressed again while stopping): the group is
    SIGKILLed, and the signal is consumed, so that it cannot cut the caller's cleanup
    short (the caller is stopping already) nor leave the group running.
    """
    caught: list[int] = []

    def hurry(signum: int, frame: Any) -> None:
        caught.append(signum)

    with handling(hurry, (signal.SIGINT, signal.SIGTERM)):
        alive = _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while alive and not caught and time.monotonic() < deadline:
            proc.poll()  # reap the leader, so that only live members keep the group
            alive = _signal_group(proc.pid, 0)
            if alive:
                time.sleep(POLL_S)
        kill_group(proc)


def run_group(cmd: list[str], cwd: Path | str, env: dict | None = None,
              capture: bool = True, grace_s: float = 30.0) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group and wait; stop the whole group if we stop.

    ``dvc exp run`` starts the pipeline's stages, which start training workers and ray: an
    interrupt (Ctrl-C) or SIGTERM (``kill``, a scheduler) of this process would otherwise
    leave them running. Here either one sends SIGTERM to the group (its PID), waits up to
    ``grace_s`` seconds (a second Ctrl-C or SIGTERM: not at all), then SIGKILLs what is
    left, and re-raises.
    """
    with raising():
        try:
            proc = start_group(cmd, cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE if capture else None,
                               stderr=subprocess.PIPE if capture else None)
        except OSError as exc:
            raise FedctError(f"cannot run {' '.join(cmd)} ({exc})") from exc
        try:
            out, err = proc.communicate()
        except BaseException:
            stop_group(proc, grace_s)
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def marked(name: str, value: str) -> list[Any]:
    """This user's live processes (``psutil.Process``, zombies left out) whose environment
    sets ``name`` to ``value``, this process excepted."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if (p.pid != os.getpid() and p.info["status"] != psutil.STATUS_ZOMBIE
                    and p.environ().get(name) == value):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def stop_processes(processes: Sequence[Any], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM ``processes`` (``psutil.Process``), SIGKILL those left after ``grace_s``;
    reap those that are this process's children."""
    import psutil

    signalled = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
            signalled.append(p)
    _, alive = psutil.wait_procs(signalled, timeout=grace_s)
    kill_processes(alive, wait_s=KILL_WAIT_S)


def kill_processes(processes: Sequence[Any], wait_s: float = 5.0) -> None:
    """SIGKILL ``processes`` (``psutil.Process``) and reap those that are our children."""
    import psutil

    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(list(processes), timeout=wait_s)
