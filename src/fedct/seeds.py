"""``fedct seeds``: the study over report seeds, one DVC experiment per seed pair.

Each report seed pair (``synth.report_seeds[i]``, ``cohort.report_seeds[i]``) is one
``dvc exp run --temp`` named ``report-<synth>-<cohort>`` of the pipeline up to
``evaluate`` with those two seeds set: a new archive, a new patient split, every model
retrained, every stage logged to the same MLflow store as the workspace's. Nothing in the
workspace changes; the pair equal to the workspace's params is restored from DVC's run
cache when ``dvc repro`` already ran it. An experiment of the current commit that already
exists is reused (``--force`` reruns it).

Each experiment's outputs are read back through ``dvc.api`` at the experiment's revision
(``outputs/evaluate``, ``outputs/uncertainty``, ``data/truth/summary.json``) and summarised
by :mod:`fedct.analysis.seed_tables`. Outputs (``OUT_DIR``, default ``outputs/seeds``):

- ``per_seed.csv``: one row of headline numbers per seed;
- ``across_seeds.csv``: mean, sd, min and max of each over the seeds;
- ``summary.csv`` / ``paired.csv``: the held-out comparison with every seed's cases
  together (``fedct.analysis.heldout``; clusters: held-out sites, then cases);
- ``seeds.json``: the experiments, their revisions and the headline means.

MLflow: one run ``seeds`` with the tables as artifacts and the means as metrics.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from fedct import procs
from fedct.analysis import heldout
from fedct.analysis.seed_tables import (
    across_seeds,
    experiment_name,
    pooled_cases,
    report_pairs,
    seed_row,
)
from fedct.config import Params
from fedct.errors import FedctError
from fedct.federation import LABEL_FREE

#: What each experiment must have written, read back at its revision.
FILES = {"cases": "outputs/evaluate/cases.csv", "evaluate": "outputs/evaluate/metrics.json",
         "uncertainty": "outputs/uncertainty/metrics.json",
         "signals": "outputs/uncertainty/signals.csv",
         "ranking": "outputs/uncertainty/site_ranking.csv",
         "truth": "data/truth/summary.json"}
TARGET = "evaluate"


def run_dvc(args: list[str], repo: Path, env: dict | None = None, capture: bool = True
            ) -> subprocess.CompletedProcess:
    """``dvc ARGS`` in ``repo``, in its own process group (``fedct.procs.run_group``)."""
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc) if dvc.exists() else "dvc", *args]
    return procs.run_group(cmd, repo, env=env, capture=capture)


def existing_experiments(repo: Path) -> set[str]:
    """Names of the DVC experiments of the current commit."""
    out = run_dvc(["exp", "list", "--name-only"], repo)
    if out.returncode != 0:
        raise FedctError(f"{repo}: `dvc exp list` failed: {out.stderr.strip()[-400:]}")
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def params_edited(repo: Path, path: str = "params.yaml") -> bool:
    """Whether ``path`` differs from the commit (``git diff``; False outside git)."""
    try:
        out = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path],
                             cwd=repo, capture_output=True, check=False)
    except OSError:
        return False
    return out.returncode == 1


def tracking_env() -> dict:
    """The environment of an experiment: the workspace's MLflow store by absolute path
    (``--temp`` runs in another folder, where the relative default would be lost); the
    experiment is created here first, so its artifacts stay beside the workspace's store."""
    from fedct import tracking

    return {**os.environ, "MLFLOW_TRACKING_URI": tracking.configure()}


def run_experiment(repo: Path, synth_seed: int, cohort_seed: int, env: dict,
                   force: bool = False) -> None:
    """``dvc exp run --temp`` of the pipeline up to ``evaluate`` with these seeds."""
    name = experiment_name(synth_seed, cohort_seed)
    print(f"seeds: running experiment {name} (dvc exp run --temp ... {TARGET})", flush=True)
    args = ["exp", "run", "--temp", "-n", name, "-S", f"synth.seed={synth_seed}",
            "-S", f"cohort.seed={cohort_seed}", *(["--force"] if force else []), TARGET]
    out = run_dvc(args, repo, env=env, capture=False)
    if out.returncode != 0:
        raise FedctError(f"experiment {name} failed (exit {out.returncode}); see the output "
                         "above, then `fedct seeds` again (finished experiments are kept)")


def read_experiment(repo: Path, name: str) -> dict:
    """The files of ``FILES`` at experiment ``name`` (tables as DataFrames, JSON as dicts)."""
    import dvc.api

    out: dict = {}
    for key, path in FILES.items():
        try:
            text = dvc.api.read(path, repo=str(repo), rev=name)
        except Exception as exc:  # dvc raises many types for a missing rev or output
            raise FedctError(f"experiment {name}: cannot read {path} ({exc})") from exc
        out[key] = (json.loads(text) if path.endswith(".json")
                    else pd.read_csv(io.StringIO(text)))
    return out


def run(params: Params, out_dir: Path, run_missing: bool = True, force: bool = False
        ) -> dict:
    """Run the missing report-seed experiments of the repository in the working directory,
    then summarise them all (module docstring)."""
    from fedct import tracking

    repo, out_dir = Path.cwd(), Path(out_dir)
    primary = params.federate.primary_label_free
    if primary not in LABEL_FREE or primary not in params.federate.methods:
        raise FedctError(f"federate.primary_label_free {primary!r}: not one of the label-free "
                         f"methods that federate.methods runs "
                         f"({[m for m in params.federate.methods if m in LABEL_FREE]})")
    if "fedavg" not in params.federate.methods:
        raise FedctError(f"federate.primary_label_free {primary!r} is judged against FedAvg, "
                         "which federate.methods does not run")
    pairs = report_pairs(params.synth.report_seeds, params.cohort.report_seeds,
                         params.synth.dev_seeds, params.cohort.dev_seeds)
    names = [experiment_name(s, c) for s, c in pairs]
    have = existing_experiments(repo)
    todo = [(p, n) for p, n in zip(pairs, names, strict=True) if force or n not in have]
    if params_edited(repo):
        # An experiment's name holds its seeds only and belongs to the commit: one run with
        # uncommitted params would later pass for the commit's, and one of the commit was
        # not run with the edit.
        raise FedctError("params.yaml differs from the commit: commit the change first (the "
                         "report-seed experiments are named per commit and seed pair only)")
    if todo and not run_missing:
        raise FedctError(f"experiments {[n for _, n in todo]} do not exist for this commit; "
                         "run `fedct seeds` without --no-run")
    if todo:
        env = tracking_env()
        for (s, c), _ in todo:
            run_experiment(repo, s, c, env, force=force)
    rows, cases = [], {}
    for (s, c), name in zip(pairs, names, strict=True):
        got = read_experiment(repo, name)
        rows.append(seed_row(s, c, got["evaluate"], got["uncertainty"], got["signals"],
                             got["ranking"], list(got["truth"].get("shift_sites") or []),
                             params.uncertainty.signal, LABEL_FREE, primary))
        cases[name] = got["cases"]
    per_seed = pd.DataFrame(rows)
    over = across_seeds(per_seed)
    pooled = pooled_cases(cases)
    summary = heldout.summary_table(pooled, params.evaluate.n_boot, params.evaluate.seed)
    paired = heldout.paired_table(pooled, params.evaluate.n_boot, params.evaluate.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_seed.to_csv(out_dir / "per_seed.csv", index=False)
    over.to_csv(out_dir / "across_seeds.csv", index=False)
    summary.to_csv(out_dir / "summary.csv", index=False)
    paired.to_csv(out_dir / "paired.csv", index=False)
    means = dict(zip(over["metric"], over["mean"], strict=True))
    result = {"experiments": names, "pairs": [list(p) for p in pairs],
              "heldout": heldout.metrics_json(summary, paired),
              "means": {k: (None if v != v else v) for k, v in means.items()}}
    (out_dir / "seeds.json").write_text(json.dumps(result, indent=1))
    with tracking.start_run("seeds") as run_:
        run_.log_params({"experiments": names, "signal": params.uncertainty.signal,
                         "n_seeds": len(pairs)})
        run_.log_metrics({f"seeds_{k}": v for k, v in means.items()})
        for f in ("per_seed.csv", "across_seeds.csv", "summary.csv", "paired.csv",
                  "seeds.json"):
            run_.log_artifact(out_dir / f)
    return result
