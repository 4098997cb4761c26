"""``fedct study`` (``make study``): the study of issue 23 on a profile overlay, resumably.

The overlay (``profiles/study.yaml``, checked like params.yaml by
``fedct.overlay.load_overlay``) names the params that differ from ``params.yaml``, the report
seed pairs (its ``synth.report_seeds`` with ``cohort.report_seeds``) and the training seeds
(``study.train_seeds``). Each (report seed pair, training seed) is one run: one
``dvc exp run --temp -n study-<synth>-<cohort>-t<seed>`` of the pipeline up to ``promote``
with every overlay key, ``synth.seed``, ``cohort.seed``, ``train.seed`` and
``federate.seed`` set by ``-S``, in its own process group (``fedct.procs.run_group``: a
Ctrl-C or a scheduler's SIGTERM stops the whole pipeline). Nothing in the workspace changes.

As each run finishes, its outputs are read back at the experiment's revision, one row is
appended to ``OUT_DIR/runs.csv`` (``fedct.analysis.study_tables.RUN_COLUMNS``) and
``OUT_DIR/pooled.json`` is rewritten (``fedct.analysis.study_tables.pool``), and its label-free
methods' rows go to ``OUT_DIR/label_free.csv`` (``method_rows``). A rerun skips the
runs already in ``runs.csv``; a run whose experiment exists but whose row does not (cut
off in between) is read back, not rerun, and its ``runtime_min`` stays empty. So a cut-off
loses at most the run in progress. Commit ``OUT_DIR`` after each session.

The report seeds must be new: none may be a development seed or a report seed of
``params.yaml`` (those were run before the protocol was fixed).
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import time
from pathlib import Path

import pandas as pd

from fedct.analysis.seed_tables import report_pairs
from fedct.analysis.study_tables import (
    METHOD_COLUMNS,
    RUN_COLUMNS,
    experiment_name,
    method_rows,
    pool,
    run_row,
)
from fedct.config import Params, load_params
from fedct.errors import FedctError
from fedct.federation import LABEL_FREE
from fedct.overlay import load_overlay
from fedct.seeds import existing_experiments, params_edited, run_dvc, tracking_env

TARGET = "promote"
#: What each run must have written (tables as DataFrames, JSON as dicts); optional ones
#: may be missing (an older pipeline): their columns stay empty.
FILES = {"evaluate": "outputs/evaluate/metrics.json",
         "uncertainty": "outputs/uncertainty/metrics.json",
         "ranking": "outputs/uncertainty/site_ranking.csv",
         "cases": "outputs/uncertainty/cases.csv",
         "decision": "outputs/promote/decision.json",
         "card": "outputs/models/pooled/model_card.json"}
OPTIONAL = {"convergence": "outputs/models/convergence.json",
            "federated": "outputs/federated/metrics.json"}
RUNS_FILE, POOLED_FILE = "runs.csv", "pooled.json"
METHODS_FILE = "label_free.csv"  # every label-free method of every run (issue 27)


def override(key: str, value: object) -> str:
    """``key=value`` in the override syntax of ``dvc exp run -S`` (lists in brackets)."""
    def one(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if v is None:
            return "null"
        return str(v)

    shown = ("[" + ",".join(one(v) for v in value) + "]"
             if isinstance(value, (list, tuple)) else one(value))
    return f"{key}={shown}"


def plan(params: Params, base: Params, train_seeds: tuple[int, ...]
         ) -> list[tuple[int, int, int]]:
    """(synth seed, cohort seed, training seed) of every run, in order."""
    pairs = report_pairs(params.synth.report_seeds, params.cohort.report_seeds,
                         (*base.synth.dev_seeds, *base.synth.report_seeds),
                         (*base.cohort.dev_seeds, *base.cohort.report_seeds))
    return [(s, c, t) for s, c in pairs for t in train_seeds]


def run_command(flat: dict, synth_seed: int, cohort_seed: int, train_seed: int,
                queue: bool = False) -> list[str]:
    """The ``dvc exp run`` arguments of one run (``queue``: into DVC's experiment queue)."""
    sets = {**flat, "synth.seed": synth_seed, "cohort.seed": cohort_seed,
            "train.seed": train_seed, "federate.seed": train_seed}
    args = ["exp", "run", "--queue" if queue else "--temp", "-n",
            experiment_name(synth_seed, cohort_seed, train_seed)]
    for key, value in sets.items():
        args += ["-S", override(key, value)]
    return [*args, TARGET]


def read_run(repo: Path, name: str) -> dict:
    """The files of ``FILES`` (and those of ``OPTIONAL`` that exist) at experiment ``name``."""
    import dvc.api

    out: dict = {}
    for key, path in {**FILES, **OPTIONAL}.items():
        try:
            text = dvc.api.read(path, repo=str(repo), rev=name)
        except Exception as exc:  # dvc raises many types for a missing rev or output
            if key in OPTIONAL:
                out[key] = None
                continue
            raise FedctError(f"experiment {name}: cannot read {path} ({exc})") from exc
        out[key] = json.loads(text) if path.endswith(".json") else pd.read_csv(
            io.StringIO(text))
    return out


def head_commit(repo: Path) -> str:
    """The commit checked out in ``repo`` (12 hex digits; empty outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo,
                             capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def device_of(card: dict) -> str:
    """The ``device`` column: where the pooled model trained (its card's runtime)."""
    where = card.get("runtime") or {}
    name = where.get("gpu") or where.get("cpu") or where.get("device") or ""
    threads = f", {where['threads']} threads" if "threads" in where else ""
    return f"{name}{threads}"


def read_runs(out_dir: Path) -> pd.DataFrame:
    """The rows of ``runs.csv`` so far (an empty table when there is none)."""
    path = Path(out_dir) / RUNS_FILE
    if not path.is_file():
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    try:
        return pd.read_csv(path, dtype={"report_seed": str})
    except (ValueError, pd.errors.ParserError) as exc:
        raise FedctError(f"{path}: not a readable table ({exc}); fix or remove it") from exc


def append_run(out_dir: Path, row: dict, n_boot: int, seed: int,
               methods: list[dict] | None = None) -> pd.DataFrame:
    """Append one row to ``runs.csv`` and rewrite ``pooled.json`` from every row; first
    its label-free methods' rows (``methods``) to ``label_free.csv``, replacing any of the
    same run (a run read back after a cut-off)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if methods:
        path = out_dir / METHODS_FILE
        old = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=METHOD_COLUMNS)
        same = ((old["report_seed"].astype(str) == str(row["report_seed"]))
                & (old["train_seed"].astype(int) == int(row["train_seed"])))
        new = pd.concat([old[~same], pd.DataFrame(methods, columns=list(METHOD_COLUMNS))],
                        ignore_index=True)
        new.to_csv(out_dir / f".{METHODS_FILE}.tmp", index=False)
        (out_dir / f".{METHODS_FILE}.tmp").replace(path)
    runs = pd.concat([read_runs(out_dir), pd.DataFrame([row], columns=list(RUN_COLUMNS))],
                     ignore_index=True)
    tmp = out_dir / f".{RUNS_FILE}.tmp"
    runs.to_csv(tmp, index=False)
    tmp.replace(out_dir / RUNS_FILE)  # a cut-off never leaves half a table
    pooled = pool(runs, n_boot=n_boot, seed=seed)
    (out_dir / POOLED_FILE).write_text(json.dumps(pooled, indent=1, allow_nan=False,
                                                  default=str))
    return runs


def run(overlay: Path, out_dir: Path, params_file: Path = Path("params.yaml"),
        queue: bool = False) -> pd.DataFrame:
    """Every run of the overlay that ``runs.csv`` lacks (module docstring); the table.

    ``queue``: put those runs into DVC's experiment queue instead (``dvc queue start -j
    N`` runs them, one per worker); a later call without it reads them back."""
    repo, out_dir = Path.cwd(), Path(out_dir)
    params, runs_cfg, flat = load_overlay(overlay, params_file)
    base = load_params(params_file)
    todo = plan(params, base, runs_cfg.train_seeds)
    for path in (str(params_file), str(overlay)):
        if params_edited(repo, path):
            raise FedctError(f"{path} differs from the commit: commit it first (a study run "
                             "is named per commit and seeds only)")
    done = read_runs(out_dir)
    have = {(str(r), int(t)) for r, t in zip(done["report_seed"], done["train_seed"],
                                             strict=True)}
    experiments = existing_experiments(repo)
    commit = head_commit(repo)  # `dvc exp list` names the experiments of this commit
    env = None
    for s, c, t in todo:
        name = experiment_name(s, c, t)
        if (f"{s}-{c}", t) in have:
            print(f"study: {name} is in {out_dir / RUNS_FILE}; skipped", flush=True)
            continue
        runtime = math.nan
        if queue:
            if name not in experiments:
                out = run_dvc(run_command(flat, s, c, t, queue=True), repo, env=env)
                if out.returncode != 0:
                    raise FedctError(f"cannot queue {name}: {out.stderr.strip()[-400:]}")
                print(f"study: queued {name}", flush=True)
            continue
        if name not in experiments:
            env = env or tracking_env()
            print(f"study: running {name} (dvc exp run --temp ... {TARGET})", flush=True)
            t0 = time.monotonic()
            out = run_dvc(run_command(flat, s, c, t), repo, env=env, capture=False)
            if out.returncode != 0:
                raise FedctError(f"study run {name} failed (exit {out.returncode}); see the "
                                 "output above, then `make study` again (finished runs are "
                                 "kept)")
            runtime = (time.monotonic() - t0) / 60.0
        got = read_run(repo, name)
        row = run_row(s, c, t, got["evaluate"], got["uncertainty"],
                      list(got["ranking"]["site"].astype(str)), got["cases"],
                      got["convergence"], got["decision"], params.cohort.holdout_sites,
                      params.cohort.control_sites, runtime, device_of(got["card"]),
                      got["federated"], commit=commit,
                      primary=params.federate.primary_label_free)
        methods = method_rows(s, c, t, got["evaluate"], got["uncertainty"],
                              [m for m in params.federate.methods if m in LABEL_FREE],
                              params.cohort.holdout_sites, params.cohort.control_sites)
        done = append_run(out_dir, row, params.evaluate.n_boot, params.evaluate.seed,
                          methods)
        print(f"study: {name} done; {len(done)} run(s) in {out_dir / RUNS_FILE}", flush=True)
    return done
