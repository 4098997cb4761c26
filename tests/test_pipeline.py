"""End to end: `dvc repro` of the repository's dvc.yaml on the tiny archive.

Runs the real CLI through DVC (synth, catalogue, cohort, train (A, B, pooled), uncertainty,
federate, evaluate, promote, report) with small network settings, then checks that a second
`dvc repro` does nothing, that a regenerated archive keeps `dvc status` clean, that
`fedct seeds` runs a second report seed as a DVC experiment without touching the
workspace, and that outputs hold no patient identifier.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.phi import assert_no_identifiers

REPO = Path(__file__).parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run ``cmd`` in its own process group; on a timeout the whole group (DVC, the stage,
    Flower's and ray's children) is killed by its id, not only DVC."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran over 900 s:\n{stdout[-3000:]}\n{stderr[-5000:]}")
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{stdout[-3000:]}\n{stderr[-5000:]}")
    return stdout


@pytest.mark.slow
def test_dvc_repro_tiny(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copy(REPO / "dvc.yaml", work)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"].update(profile="tiny", seed=11)
    params["cohort"].update(spacing_mm=[12.0, 12.0, 12.0], roi_size=[40, 40, 16])
    params["train"].update(sites=["A", "B", "pooled"], steps=4, channels=[4, 8, 16],
                           strides=[2, 2], patch_size=[32, 32, 16], val_checks=2)
    params["uncertainty"].update(mc_samples=3, mc_batch=3)
    params["federate"].update(sites=["A", "B"], rounds=2, local_steps=2, min_clients=1,
                              mc_samples=3, mc_batch=3, tent_steps=1)
    params["evaluate"].update(mc_samples=3, mc_batch=3, n_boot=100)
    params["promote"].update(n_boot=200)  # the gate refuses fewer resamples
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    env.pop("MLFLOW_ARTIFACTS_DESTINATION", None)
    dvc = [str(Path(bin_dir) / "dvc")]
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@x")
    _run(["git", "init", "-q"], work, env)
    _run(dvc + ["init", "-q"], work, env)
    shutil.copy(REPO / ".dvcignore", work)  # bytecode caches in src/ are not deps
    shutil.copy(REPO / ".gitignore", work)  # data/, outputs/, the MLflow store
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-q", "-m", "study"], work, env)
    # `dvc repro` writes the archive too (the synth stage), from params' profile and seed.
    repro = _run(dvc + ["repro"], work, env)
    assert "Running stage 'synth'" in repro

    series = pd.read_parquet(work / "outputs/catalogue/series.parquet")
    assert series["usable"].sum() == 30
    cases = pd.read_csv(work / "outputs/uncertainty/cases.csv")
    assert set(cases["model"]) == {"A", "B", "pooled"}
    assert set(cases["site"]) == set("ABCDEFGHIJ")
    assert (work / "outputs/uncertainty/shift_dice.png").stat().st_size > 0
    # The flag threshold: strict JSON, with the T it was calibrated with (predict and
    # evaluate score with the same T).
    record = json.loads((work / "outputs/uncertainty/threshold.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"threshold.json holds {c}"))
    assert record["mc_samples"] == params["uncertainty"]["mc_samples"]
    # Federation, held-out comparison, the registry's decision and the report.
    fed = work / "outputs/federated"
    for method in ("one_shot", "fedavg", "fedprox", "self_train"):
        assert (fed / method / "model.safetensors").is_file(), method
    for method in ("uw_merge", "tent", "uw_select"):
        assert {p.parent.name for p in (fed / method).glob("*/model.safetensors")} == {"C", "G"}
    for target in ("C", "G"):
        card = json.loads((fed / "uw_select" / target / "model_card.json").read_text())
        assert card["chosen"] in params["federate"]["select_from"]
        assert set(card["scores"]) == set(params["federate"]["select_from"])
        assert card["scores"][card["chosen"]] == min(card["scores"].values())
    assert len(pd.read_csv(fed / "fedavg" / "history.csv")) == 2
    # Every federated card records where its weights were computed: each Flower client's
    # process (one thread each, ray actors), and this stage's for what it computes itself.
    fedavg = json.loads((fed / "fedavg" / "model_card.json").read_text())["runtime"]
    assert set(fedavg["clients"]) == set(params["federate"]["sites"])
    assert {c["threads"] for c in fedavg["clients"].values()} == {1}
    for card_path in fed.glob("**/model_card.json"):
        assert json.loads(card_path.read_text())["runtime"]["stage"]["device"] == "cpu"
    heldout = json.loads((work / "outputs/evaluate/metrics.json").read_text())["heldout_dice"]
    assert {"fedavg", "pooled", "local", "one_shot", "uw_merge", "tent",
            "uw_select"} <= set(heldout)
    decision = json.loads((work / "outputs/promote/decision.json").read_text())
    assert isinstance(decision["promote"], bool) and decision["reasons"]
    assert decision["version"] == "1"
    assert (work / "outputs/report/report.html").stat().st_size > 10_000

    # Nothing changed: a second repro runs no stage.
    again = _run(dvc + ["repro"], work, env)
    assert "Running stage" not in again
    status = _run(dvc + ["status"], work, env)
    assert "changed" not in status

    # Results travel with git (docs/pipeline.md, "Sharing results"): commit dvc.lock and
    # results/, push; a fresh clone shows the metrics and plots before any pull, then
    # `dvc pull` restores every stage's cached outputs.
    _share_and_clone(work, tmp_path, env, dvc)

    # Regenerating the archive by hand (as on another machine) leaves dvc.lock valid:
    # the same seed gives byte-identical files.
    shutil.rmtree(work / "data")
    _run([str(Path(bin_dir) / "fedct"), "synth", "data/archive", "--truth", "data/truth",
          "--labels", "data/labels"], work, env)
    status = _run(dvc + ["status"], work, env)
    assert "changed" not in status and "modified" not in status, status

    # The study over report seeds: the first pair is the one `dvc repro` ran (restored
    # from the run cache), the second a new archive and split, run as an experiment.
    synth_seeds, cohort_seeds = [11, 12], [params["cohort"]["seed"], params["cohort"]["seed"] + 1]
    params["synth"]["report_seeds"], params["cohort"]["report_seeds"] = synth_seeds, cohort_seeds
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-q", "-m", "report seeds"], work, env)
    lock_before = (work / "dvc.lock").read_text()
    fedct = str(Path(bin_dir) / "fedct")
    _run([fedct, "seeds"], work, env)
    per_seed = pd.read_csv(work / "outputs/seeds/per_seed.csv")
    assert list(per_seed["synth_seed"]) == synth_seeds
    assert list(per_seed["cohort_seed"]) == cohort_seeds
    assert per_seed[["in_domain_dice", "heldout_fedavg", "heldout_pooled", "auroc_all"]
                    ].notna().all().all()
    # Different archives: different results per seed.
    assert per_seed["heldout_pooled"].nunique() == 2
    first = json.loads((work / "outputs/evaluate/metrics.json").read_text())
    assert per_seed.loc[0, "heldout_fedavg"] == pytest.approx(first["heldout_dice"]["fedavg"])
    summary = pd.read_csv(work / "outputs/seeds/summary.csv")
    overall = summary[(summary["site"] == "all") & (summary["model"] == "fedavg")]
    assert int(overall["n_cases"].iloc[0]) > first["n_cases"]  # both seeds' cases
    across = pd.read_csv(work / "outputs/seeds/across_seeds.csv").set_index("metric")
    assert across.loc["heldout_fedavg", "n_seeds"] == 2
    # The pre-specified label-free method against FedAvg at the shifted site, per seed.
    assert (per_seed["primary_label_free"] == "uw_select").all()
    assert per_seed[["primary_minus_fedavg_shifted", "primary_minus_fedavg_shifted_lo",
                     "primary_minus_fedavg_shifted_hi"]].notna().all().all()
    assert across.loc["primary_minus_fedavg_shifted", "n_seeds"] == 2
    # The workspace is untouched: same lock, nothing to reproduce; a second call reuses
    # the experiments.
    assert (work / "dvc.lock").read_text() == lock_before
    assert "changed" not in _run(dvc + ["status"], work, env)
    assert "running experiment" not in _run([fedct, "seeds"], work, env)
    # An edited, uncommitted params.yaml: this commit's experiments ran without the edit,
    # so they are not summarised as if they had.
    committed = (work / "params.yaml").read_text()
    (work / "params.yaml").write_text(committed.replace("tent_steps: 1", "tent_steps: 2"))
    edited = subprocess.run([fedct, "seeds", "--no-run"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert edited.returncode == 1 and "params.yaml differs from the commit" in edited.stderr
    (work / "params.yaml").write_text(committed)

    # No fake identifier of the archive anywhere in the outputs or the tracking store.
    phi = pd.read_csv(work / "data" / "truth" / "phi.csv", dtype=str)
    identifiers = phi[["name", "patient_id", "accession", "birth_date"]].to_numpy().ravel()
    # A logged model carries fedct's own wheel: code, whose synth module holds the fake
    # names' vocabulary. It is searched as code: nothing in it but fedct's source files.
    wheels = [f for f in (work / "mlruns").rglob("fedct-*.whl")]
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
        assert names and all(n.startswith(("fedct/", "fedct-")) for n in names), names
        assert all(n.endswith((".py", ".toml", ".md", ".typed", "METADATA", "WHEEL",
                               "RECORD", "top_level.txt", "entry_points.txt", "LICENSE"))
                   for n in names), names
    assert_no_identifiers([*(work / "outputs").rglob("*"), *(work / "results").rglob("*"),
                           work / "mlflow.db",
                           *(f for f in (work / "mlruns").rglob("*") if f not in wheels)],
                          identifiers)


def _width(table: str) -> int:
    return max((len(line) for line in table.splitlines()), default=0)


def _share_and_clone(work: Path, tmp_path: Path, env: dict[str, str], dvc: list[str]) -> None:
    """The push/pull walk-through of docs/pipeline.md on the repository that ran."""
    # What `make demo` tells the user to commit: dvc.lock and results/ (uncached outputs
    # DVC leaves to git); nothing else is left for git.
    _run(["git", "add", "dvc.lock", "results"], work, env)
    _run(["git", "commit", "-q", "-m", "results"], work, env)
    assert _run(["git", "status", "--porcelain"], work, env).strip() == ""
    _run(dvc + ["remote", "add", "-d", "shared", str(tmp_path / "remote")], work, env)
    _run(["git", "commit", "-q", "-am", "remote"], work, env)
    _run(dvc + ["push"], work, env)
    widths = {"after": _width(_run(dvc + ["metrics", "show"], work, env)),
              "before": _width(_run(dvc + ["metrics", "show", *sorted(
                  str(p.relative_to(work)) for p in (work / "outputs").glob("*/metrics.json"))],
                  work, env))}
    print(f"dvc metrics show, widest line: {widths}")
    assert widths["after"] < 1500 < widths["before"], widths

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(work), str(clone)], tmp_path, env)
    # No pull, and the remote out of reach: metrics and plots come from git.
    (tmp_path / "remote").rename(tmp_path / "away")
    shown = _run(dvc + ["metrics", "show"], clone, env)
    assert "results/metrics.json" in shown and "heldout_dice_fedavg" in shown, shown
    plots = _run(dvc + ["plots", "show", "-o", str(tmp_path / "plots")], clone, env)
    assert "file://" in plots and len(list((tmp_path / "plots").rglob("*.png"))) >= 9
    (tmp_path / "away").rename(tmp_path / "remote")
    _run(dvc + ["pull"], clone, env)
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    for stage, entry in lock.items():
        for out in entry.get("outs", []):
            if not out["path"].startswith(("outputs/catalogue_paths", "outputs/catalogue_index")):
                assert (clone / out["path"]).exists(), (stage, out["path"])
    # As the docs say: only the catalogue's site-only path tables are missing (never
    # pushed); `dvc repro` rebuilds them from the archive (pulled here: the synth stage's)
    # with the same bytes, so nothing downstream reruns and the status is clean.
    status = _run(dvc + ["status"], clone, env)
    assert "outputs/catalogue_paths" in status and "outputs/catalogue_index" in status
    changed = {line.rstrip(":") for line in status.splitlines()
               if line and not line.startswith((" ", "\t"))}
    assert changed == {"catalogue", "cohort"}, status
    rerun = _run(dvc + ["repro"], clone, env)
    assert [line for line in rerun.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'catalogue':"], rerun
    assert "changed" not in _run(dvc + ["status"], clone, env)
