"""Run a federation in Flower's simulation runtime (ray), one SuperNode per training site.

``run_federation`` starts ``python -m fedct.federation.simulation`` in a process group of its
own. That child runs ``flwr.simulation.run_simulation`` with the ServerApp and ClientApp
(:mod:`fedct.federation.server_app`, :mod:`fedct.federation.client_app`, or those that
``apps`` names), ray sized for a small machine (one CPU per client, two
for ray) and listening on 127.0.0.1 only, ray's ``_temp_dir`` and ``FLWR_HOME`` in a
scratch folder of ours, Flower's and ray's telemetry off, and nothing installed at run
time. The parent follows the rounds in the server's ``history.json`` and calls
``on_round`` for each (so MLflow logging stays in the stage's process). However the run
ends (done, failed, or the parent interrupted), the child's process group and every
process that carries this run's marker in its environment (ray's raylet, GCS, agents and
workers) are killed by PID, and the scratch folder is removed.

Why a child process: ``run_simulation`` ignores SIGTERM and SIGINT while it waits on its
message timeouts, and ray's agents outlive a killed driver (``/work/shared/FEDERATION.md``).
A parent killed outright (SIGKILL) runs no ``finally``; the child notices that it was
re-parented and ends the run itself, by the same marker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedct import procs
from fedct.config import TrainParams
from fedct.data.cases import adaptation_cases, read_cohort, training_cases
from fedct.errors import FedctError

MARKER = "FEDCT_FEDERATION_RUN"  # environment variable that tags every process of a run
RUN_LINE = "fedct federation run "  # the log's line naming a run's marker value
ERROR_FILE = "error.txt"
LOG_FILE = "federation.log"
SHUTDOWN_GRACE_S = 3.0  # how long a finished simulation may take to stop ray
LOOPBACK = "127.0.0.1"
# Ray (2.55) on Linux takes the machine's outward address for its node even when told
# 127.0.0.1 (``resolve_ip_for_localhost``), and its gRPC servers then listen on every
# interface. Ray's single-machine mode (the default on macOS and Windows) keeps the node on
# 127.0.0.1, and GCS, raylet, agents and workers then listen on loopback only.
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray renices its workers to 15 by default: the clients would then yield to any other job
# on the machine while local models (the stage's own processes) do not. They keep the
# caller's priority instead (0 adds nothing to it; run the stage under `nice` to lower all).
RAY_PRIORITY_ENV = {"RAY_worker_niceness": "0"}


def backend_config(ray_dir: Path, num_cpus: int = 2, client_gpus: float = 0.0) -> dict:
    """Ray settings: one CPU per client, ``num_cpus`` for ray (2 suits a 2-core machine).

    ``client_gpus`` is each client's share of a GPU (0: clients see no GPU, since ray hides
    the devices from an actor that asked for none; 0.5: two clients share one GPU). Ray's
    node is 127.0.0.1 and it starts no dashboard; with :data:`RAY_LOOPBACK_ENV` in the
    environment its GCS, raylet, agents and workers listen on loopback only.
    """
    return {"client_resources": {"num_cpus": 1, "num_gpus": float(client_gpus)},
            "init_args": {"num_cpus": num_cpus, "log_to_driver": False,
                          "_temp_dir": str(ray_dir), "_node_ip_address": LOOPBACK,
                          "include_dashboard": False, "dashboard_host": LOOPBACK}}


def default_client_gpus(n_sites: int, num_cpus: int) -> float:
    """A GPU share that lets every concurrently running client use the one GPU, or 0."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return 1.0 / max(1, min(n_sites, num_cpus))


@dataclasses.dataclass(frozen=True)
class Apps:
    """The ClientApp and ServerApp a simulation runs, named as Flower names an app's
    components (``"module:function"``): each function is called with the run config and
    its keyword arguments (JSON values) and returns the app. fedct's own by default; the
    tests install fault-injecting ones here (``tests/federation/faults.py``), so that no
    fault injection sits in the apps themselves."""

    client: str = "fedct.federation.client_app:make_client_app"
    server: str = "fedct.federation.server_app:make_server_app"
    client_kwargs: Mapping[str, object] = dataclasses.field(default_factory=dict)
    server_kwargs: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def to_job(self) -> dict:
        """The job file's ``apps``: the names and their arguments."""
        return {"client": self.client, "server": self.server,
                "client_kwargs": dict(self.client_kwargs),
                "server_kwargs": dict(self.server_kwargs)}

    def import_paths(self) -> list[str]:
        """The folders from which the child, and ray's workers that unpickle the apps,
        import the named modules that are not fedct's own (fedct is installed)."""
        paths = []
        for ref in (self.client, self.server):
            if ref.split(".")[0] == "fedct":
                continue
            module = importlib.import_module(ref.partition(":")[0])
            root = Path(module.__file__).resolve().parents[module.__name__.count(".")]
            paths.append(str(root.parent if module.__file__.endswith("__init__.py")
                             else root))
        return sorted(set(paths))


def _factory(ref: str) -> Callable:
    """The function that ``"module:function"`` names."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def run_federation(cohort_dir: Path, sites: Sequence[str], train_params: TrainParams,
                   rounds: int, local_steps: int, mu: float = 0.0, min_clients: int = 1,
                   init_model: Path | None = None, out_dir: Path = Path("federation"),
                   checkpoint_dir: Path | None = None,
                   on_round: Callable[[dict], None] | None = None, seed: int = 0, *,
                   site_weights: Mapping[str, float] | None = None,
                   keep_updates: bool = False, patience: int = 0, min_delta: float = 0.0,
                   targets: Sequence[str] = (), steer: str = "",
                   apps: Apps | None = None,
                   timeout_s: float = 3600.0, num_cpus: int = 2,
                   client_gpus: float | None = None) -> tuple[list[dict], Path]:
    """Federate ``sites`` for ``rounds`` rounds; the history and the final model's path.

    Each site trains ``local_steps`` steps per round on its own training split (FedProx
    when ``mu`` > 0); updates are merged weighted by training cases (or ``site_weights``).
    A round succeeds when at least ``min_clients`` sites reply; a failed site is recorded
    and asked again next round. ``checkpoint_dir`` (default ``out_dir/checkpoint``) holds
    the checkpoint of the last finished round: a run with the same settings resumes from it.
    ``on_round(record)`` is called once per round, in order (rounds restored from a
    checkpoint included), with the record described in
    :func:`fedct.federation.server_app.run_server`. ``keep_updates`` keeps each
    round's client updates in ``checkpoint_dir/updates``. ``patience`` > 0 stops after that
    many rounds without a higher mean validation Dice of the clients and keeps the best
    round's model (:mod:`fedct.federation.stopping`); 0 runs every round, keeps the last.
    ``targets`` (held-out sites, one more SuperNode each) steer the merge with ``steer``
    (JSON of :class:`fedct.federation.steering.SteerConfig`): the ``steered`` method.
    ``apps``: the ClientApp and ServerApp to run (:class:`Apps`; fedct's by default).
    ``timeout_s`` bounds the waits for replies and for sites to connect. ``num_cpus`` is
    what ray may use (clients run concurrently up to it); ``client_gpus`` each client's
    GPU share (default: the GPU split among concurrent clients when CUDA is available,
    else 0).

    Output in ``out_dir``: ``model.safetensors`` and ``model_card.json`` (``fedct.model.io``),
    ``history.json`` and ``federation.log`` (Flower's and ray's output).
    """
    from fedct.federation.run_config import FederationConfig, run_config
    from fedct.federation.server_app import HISTORY, MODEL

    apps = apps or Apps()

    out_dir = Path(out_dir).resolve()
    checkpoint_dir = Path(checkpoint_dir).resolve() if checkpoint_dir else out_dir / "checkpoint"
    cfg = FederationConfig(
        sites=tuple(sites), train_params=train_params, rounds=rounds, local_steps=local_steps,
        mu=mu, min_clients=min_clients, seed=seed, cohort_dir=str(Path(cohort_dir).resolve()),
        init_model=str(Path(init_model).resolve()) if init_model else "",
        checkpoint_dir=str(checkpoint_dir), out_dir=str(out_dir),
        site_weights=dict(site_weights) if site_weights else None, timeout=timeout_s,
        keep_updates=keep_updates, patience=patience,
        min_delta=min_delta,
        targets=tuple(targets), steer=steer)
    rc = run_config(cfg)
    # Refuse bad settings and missing data before starting anything.
    FederationConfig.from_run_config(rc).fingerprint()
    cohort = read_cohort(Path(cohort_dir))
    for site in sites:
        training_cases(cohort, site)
    held = adaptation_cases(cohort)
    missing = sorted(set(targets) - set(held["site"].astype(str)))
    if missing:
        raise FedctError(f"federation: target site(s) {missing} have no held-out case")
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / MODEL, out_dir / HISTORY, out_dir / ERROR_FILE,
                  checkpoint_dir / HISTORY):
        stale.unlink(missing_ok=True)
    if not (checkpoint_dir / "federation.pt").exists():
        shutil.rmtree(checkpoint_dir / "updates", ignore_errors=True)
    # Short path: ray's socket paths must stay under the 107 bytes of AF_UNIX.
    scratch = Path(tempfile.mkdtemp(prefix="fedct-fl-"))
    run_id = uuid.uuid4().hex
    job = scratch / "job.json"
    job.write_text(json.dumps({"run_config": rc, "num_supernodes": len(sites) + len(targets),
                               "backend_config": backend_config(
                                   scratch / "ray", num_cpus,
                                   default_client_gpus(len(sites), num_cpus)
                                   if client_gpus is None else client_gpus),
                               "error_file": str(out_dir / ERROR_FILE),
                               "parent_pid": os.getpid(), "apps": apps.to_job()}))
    path = os.pathsep.join(p for p in [*apps.import_paths(), os.environ.get("PYTHONPATH")]
                           if p)
    env = {**os.environ, MARKER: run_id, "FLWR_HOME": str(scratch / "flwr"),
           **({"PYTHONPATH": path} if path else {}),
           "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DEDUP_LOGS": "0", **RAY_LOOPBACK_ENV, **RAY_PRIORITY_ENV,
           # Flower starts some of its helpers by name: the venv's bin comes first.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    seen = 0
    proc = None
    # SIGTERM (SLURM at the time limit, ``kill``, ``dvc`` stopping a stage) raises
    # SystemExit instead of ending this process at once, so that the ``finally`` below
    # stops the simulation's process group (its own session) and ray's agents.
    with procs.raising(procs.exit_status):
        try:
            with open(out_dir / LOG_FILE, "ab") as log:
                # The marker names this run's processes (``run_processes``) for whoever looks.
                log.write(f"{RUN_LINE}{run_id}\n".encode())
                log.flush()
                proc = procs.start_group(
                    [sys.executable, "-m", "fedct.federation.simulation", str(job)], env=env,
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                done_at = None
                while True:
                    finished = proc.poll() is not None
                    seen = _dispatch(checkpoint_dir / HISTORY, seen, on_round)
                    if finished:
                        break
                    # The server writes the final history last; past it only ray's shutdown
                    # remains, which _stop cuts short if it lingers. So does a failed run
                    # past its error file (ray that failed to start under load left the
                    # child waiting at exit on ray's threads).
                    if done_at is None and ((out_dir / HISTORY).exists()
                                            or (out_dir / ERROR_FILE).exists()):
                        done_at = time.monotonic()
                    if done_at is not None and time.monotonic() - done_at > SHUTDOWN_GRACE_S:
                        break
                    time.sleep(0.5)
        finally:
            _stop(proc, run_id)
            shutil.rmtree(scratch, ignore_errors=True)
    err = out_dir / ERROR_FILE
    if err.exists() or not (out_dir / HISTORY).exists():
        reason = err.read_text().strip() if err.exists() else \
            f"exit code {proc.returncode}; see {out_dir / LOG_FILE}"
        raise FedctError(f"federation failed: {reason}")
    history = json.loads((out_dir / HISTORY).read_text())
    _dispatch_list(history, seen, on_round)
    return history, out_dir / MODEL


def _dispatch(path: Path, seen: int, on_round: Callable[[dict], None] | None) -> int:
    """Call ``on_round`` for the records of ``path`` after the first ``seen``."""
    try:
        history = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # not written yet (it is replaced atomically)
        return seen
    return _dispatch_list(history, seen, on_round)


def _dispatch_list(history: list[dict], seen: int,
                   on_round: Callable[[dict], None] | None) -> int:
    for record in history[seen:]:
        if on_round is not None:
            on_round(record)
        seen += 1
    return seen


def run_processes(run_id: str) -> list:
    """This user's live processes tagged with ``run_id`` (the child and all it started)."""
    return procs.marked(MARKER, run_id)


def _kill_run(run_id: str, passes: int = 3) -> list:
    """Kill every process tagged with ``run_id`` (but this one) by PID and reap them, in up
    to ``passes`` passes (ray may start a worker while the last is killed); what is left."""
    for _ in range(passes):
        left = run_processes(run_id)
        if not left:
            return []
        procs.kill_processes(left)
    return run_processes(run_id)


def _stop(proc: subprocess.Popen | None, run_id: str) -> None:
    """Kill the child's process group and every process of the run, by PID; reap them."""
    if proc is not None:
        procs.kill_group(proc, wait_s=None)
    left = _kill_run(run_id)
    if left:
        raise FedctError(f"federation: processes {[p.pid for p in left]} would not stop")


def _follow_parent(run_id: str, scratch: Path, parent_pid: int, poll_s: float = 0.5
                   ) -> threading.Thread:
    """Watch the parent (``parent_pid``) from a daemon thread; when it is gone, end the run.

    The parent's ``finally`` stops the run however it ends, except when the parent itself
    is killed with SIGKILL (the OOM killer, ``kill -9``, a scheduler's hard limit). The
    child, in a session of its own, would then train on with nobody to follow it, and ray's
    agents with it. So the child kills every process tagged with ``run_id`` (its own
    process group included), removes the run's ``scratch`` folder and exits as soon as it is
    re-parented, or at once if that happened before it started watching. The parent's PID
    comes from the parent (the job file): a child that read its parent only after starting
    up would take a new parent for the original.
    """
    import psutil  # noqa: F401 - imported now, not while cleaning up under pressure

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        try:
            _kill_run(run_id)
            shutil.rmtree(scratch, ignore_errors=True)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgrp(), signal.SIGKILL)
            os._exit(128 + signal.SIGKILL)

    thread = threading.Thread(target=watch, name="fedct-follow-parent", daemon=True)
    thread.start()
    return thread


def _child(job_path: str) -> int:
    """The child process: run the simulation; write a one-line reason on failure."""
    job = json.loads(Path(job_path).read_text())
    err = Path(job["error_file"])
    watcher = _follow_parent(os.environ[MARKER], Path(job_path).parent, job["parent_pid"])
    try:
        return _simulate(job, err)
    finally:
        if os.getppid() != job["parent_pid"]:
            # Killing ray may end the simulation first: let the watcher finish the cleanup
            # (it ends this process) instead of exiting past it.
            watcher.join()


def _simulate(job: dict, err: Path) -> int:
    """Run the simulation of ``job``; on failure, write the reason to ``err`` and return 1."""
    try:
        from flwr.simulation import run_simulation

        apps = job["apps"]
        run_simulation(server_app=_factory(apps["server"])(job["run_config"],
                                                           **apps["server_kwargs"]),
                       client_app=_factory(apps["client"])(job["run_config"],
                                                           **apps["client_kwargs"]),
                       num_supernodes=job["num_supernodes"],
                       backend_config=job["backend_config"])
    except Exception as exc:  # noqa: BLE001 - the reason goes to the parent as one line
        cause = exc
        while cause.__cause__ is not None and not isinstance(cause, FedctError):
            cause = cause.__cause__
        err.write_text(f"{type(cause).__name__}: {cause}".replace("\n", " ")[:2000])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
