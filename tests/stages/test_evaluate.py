"""``fedct evaluate`` on a hand-made tiny cohort and tiny untrained models."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from fedct.cli import main
from fedct.config import EvaluateParams, UncertaintyParams
from fedct.errors import FedctError
from fedct.model.io import (
    LEGACY_FILE,
    WEIGHTS_FILE,
    architecture,
    build_from_arch,
    save_model,
)
from fedct.stages import evaluate as stage
from fedct.stages import promote
from tests.model.payload import planted
from tests.stages.tiny import LABELS, PATIENT, SPEC, tiny_case

PARAMS = EvaluateParams(mc_samples=3, mc_batch=3, n_boot=100, seed=0, workers=1,
                        device="cpu")
REPO_PARAMS = Path(__file__).parents[2] / "params.yaml"


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training site A (train + test) and held-out sites C (3 labelled test cases and an
    unlabelled one) and G (2 labelled test cases), prepared as the cohort stage does."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    rows = [("A", "train", "train", True), ("A", "test", "train", True),
            ("C", "test", "holdout", True), ("C", "test", "holdout", True),
            ("C", "test", "holdout", True), ("C", "test", "holdout", False),
            ("G", "test", "holdout", True), ("G", "test", "holdout", True)]
    (root / "cases").mkdir()
    records = []
    for i, (site, split, role, labelled) in enumerate(rows):
        key = f"s{i:02d}{site.lower()}"
        case = tiny_case(rng)
        if not labelled:
            case.pop("label")
        np.savez_compressed(root / "cases" / f"{key}.npz", **case)
        records.append({"series_key": key, "study_key": f"st{i}", "patient_key": PATIENT,
                        "site": site, "split": split, "role": role, "labelled": labelled,
                        "has_label": labelled})
    pd.DataFrame(records).to_csv(root / "cohort.csv", index=False)
    (root / "spec.json").write_text(json.dumps(SPEC))
    (root / "labels.json").write_text(json.dumps(LABELS))
    return root


def _model(folder: Path, seed: int, site: str, **card) -> None:
    torch.manual_seed(seed)
    arch = architecture(len(LABELS), (4, 8), (2,), 0.5, 1)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(build_from_arch(arch), folder / WEIGHTS_FILE, arch,
               {"site": site, "labels": LABELS, "preprocessing": SPEC,
                "reference_ml": [1.0, 0.1], **card})


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Local A and pooled in MODELS_DIR; fedavg and a per-target tent in FEDERATED_DIR."""
    root = tmp_path_factory.mktemp("models")
    models, federated = root / "models", root / "federated"
    _model(models / "A", 1, "A")
    _model(models / "pooled", 2, "pooled")
    _model(federated / "fedavg", 3, "fedavg", kind="federated")
    for i, target in enumerate("CG"):
        _model(federated / "tent" / target, 4 + i, "tent", target_site=target)
    return models, federated


def test_evaluate_writes_tables_metrics_plots_and_one_run_per_candidate(
        cohort_dir: Path, model_dirs: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    models, federated = model_dirs
    threshold = tmp_path / "threshold.json"
    threshold.write_text(json.dumps({"signal": "sample_disagreement", "threshold": 0.3,
                                     "aggregate": "mean"}))
    out = tmp_path / "evaluate"
    metrics = stage.run(PARAMS, UncertaintyParams(), cohort_dir, models, federated, out,
                        threshold)
    for f in stage.OUTPUTS:
        assert (out / f).stat().st_size > 0, f

    cases = pd.read_csv(out / "cases.csv")
    labelled_holdout = {"s02c", "s03c", "s04c", "s06g", "s07g"}
    assert set(cases["case"]) == labelled_holdout  # not A's, not the unlabelled one
    assert cases.groupby("model").size().to_dict() == {"A": 5, "pooled": 5, "fedavg": 5,
                                                       "tent": 5}
    assert dict(zip(cases["model"], cases["kind"], strict=False)) == {
        "A": "local", "pooled": "pooled", "fedavg": "federated", "tent": "federated"}
    assert cases["dice"].between(0, 1).all()
    assert {"dice_muscle", "dice_femur", "hd95_muscle", "hd95_femur"} <= set(cases.columns)
    assert (cases["threshold"] == 0.3).all()
    assert (cases["flagged"] == (cases["score"] >= 0.3)).all()

    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["site"]) == {"all", "C", "G"}
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired["reference"]) == {"best_local", "pooled", "fedavg"}
    assert (paired["reference_model"][paired["reference"] == "best_local"] == "A").all()

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["best_local"] == "A" and on_disk["sites"] == ["C", "G"]
    assert set(on_disk["heldout_dice"]) == {"local", "local_A", "pooled", "fedavg", "tent"}
    for key in ("heldout_dice_lo", "heldout_dice_hi", "heldout_hd95", "heldout_dice_C",
                "heldout_dice_G", "paired_vs_best_local", "paired_vs_pooled",
                "paired_vs_fedavg_C", "paired_vs_fedavg_C_lo", "paired_vs_fedavg_G_hi"):
        assert key in on_disk, key
    assert on_disk["paired_vs_best_local"]["local_A"] == 0.0
    # TENT against FedAvg at each held-out site: the label-free question.
    tent_c = paired[(paired["model"] == "tent") & (paired["reference"] == "fedavg")
                    & (paired["site"] == "C")].iloc[0]
    assert on_disk["paired_vs_fedavg_C"]["tent"] == pytest.approx(tent_c["difference"])
    assert on_disk["paired_vs_fedavg_C"]["fedavg"] == 0.0
    plot = pd.read_csv(out / "dice_by_site.csv")
    assert len(plot) == 4 * 3

    # The record promote verifies: the table's digest and each model's as loaded.
    scored = json.loads((out / "scored.json").read_text())
    assert scored["cases_sha256"] == _sha(out / "cases.csv")
    assert {n: m["kind"] for n, m in scored["models"].items()} == {
        "A": "local", "pooled": "pooled", "fedavg": "federated", "tent": "federated"}
    assert scored["models"]["fedavg"]["weights"] == [
        {"site": None, "file": str(federated / "fedavg" / WEIGHTS_FILE),
         "sha256": _sha(federated / "fedavg" / WEIGHTS_FILE)}]
    assert [(w["site"], w["sha256"]) for w in scored["models"]["tent"]["weights"]] == [
        (t, _sha(federated / "tent" / t / WEIGHTS_FILE)) for t in ("C", "G")]

    # No patient identifier in any output.
    for f in out.iterdir():
        if f.suffix in (".csv", ".json"):
            assert PATIENT not in f.read_text(), f

    # MLflow: a parent run and one child per candidate, all with the same metric names.
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("fedct").experiment_id],
                              "tags.`fedct.stage` = 'evaluate'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.tags["fedct.candidate"] for r in children} == {"local_A", "pooled",
                                                                  "fedavg", "tent"}
    names = {frozenset(r.data.metrics) for r in children}
    assert len(names) == 1
    assert {"heldout_dice", "heldout_dice_lo", "heldout_dice_hi", "heldout_hd95",
            "heldout_dice_C", "heldout_dice_G", "paired_vs_best_local",
            "paired_vs_pooled"} <= next(iter(names))
    fed = next(r for r in children if r.data.tags["fedct.candidate"] == "fedavg")
    assert fed.data.metrics["heldout_dice"] == pytest.approx(on_disk["heldout_dice"]["fedavg"])
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert set(stage.OUTPUTS) <= artifacts


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_promote_accepts_evaluate_s_record_and_refuses_what_changed_after_it(
        cohort_dir: Path, model_dirs: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedct import tracking
    from fedct.config import PromoteParams

    monkeypatch.chdir(tmp_path)
    models, federated = (shutil.copytree(p, tmp_path / p.name) for p in model_dirs)
    (tmp_path / "unc").mkdir()
    (tmp_path / "unc" / "threshold.json").write_text(json.dumps(
        {"signal": "sample_disagreement", "threshold": 0.3, "aggregate": "mean"}))
    out = tmp_path / "evaluate"
    stage.run(PARAMS, UncertaintyParams(), cohort_dir, models, federated, out,
              tmp_path / "unc" / "threshold.json")
    params = PromoteParams(n_boot=200, site_tolerance=0.2)

    def run() -> dict:
        return promote.run(params, out, models, federated, tmp_path / "unc", tmp_path / "p")

    first = run()  # untouched: a decision either way, with evidence from the files
    assert first["evidence"]["weights_sha256"] == _sha(federated / "fedavg" / WEIGHTS_FILE)
    assert first["evidence"]["best_local"] == "A"
    # Local model A's weights and card put in place of the candidate: refused by name.
    backup = tmp_path / "fedavg-backup"
    shutil.copytree(federated / "fedavg", backup)
    for f in (WEIGHTS_FILE, "model_card.json"):
        shutil.copy(models / "A" / f, federated / "fedavg" / f)
    with pytest.raises(FedctError, match=f"^{federated / 'fedavg' / WEIGHTS_FILE}: SHA-256"):
        run()
    shutil.rmtree(federated / "fedavg")
    shutil.copytree(backup, federated / "fedavg")
    # The table edited so that the candidate wins: refused by name.
    table = pd.read_csv(out / "cases.csv")
    table.loc[table["model"] == "fedavg", "dice"] = 1.0
    table.to_csv(out / "cases.csv", index=False)
    with pytest.raises(FedctError, match=f"^{out / 'cases.csv'}: SHA-256 .* changed after"):
        run()
    assert tracking.list_versions("fedct-seg") == [first["version"]]


def test_evaluate_refuses_pickled_and_swapped_models_without_running_them(
        cohort_dir: Path, model_dirs: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    models, federated = (shutil.copytree(p, tmp_path / p.name) for p in model_dirs)
    # A pickle payload as a federated candidate's model.
    marker = planted(federated / "evil" / LEGACY_FILE, tmp_path / "pwned")
    with pytest.raises(FedctError, match="evil/model.pt: a pickled model"):
        stage.run(PARAMS, UncertaintyParams(), cohort_dir, models, federated, tmp_path / "o")
    assert not marker.exists()
    shutil.rmtree(federated / "evil")
    # Another model's weights under pooled's card: the card's digest refuses them.
    shutil.copy(models / "A" / WEIGHTS_FILE, models / "pooled" / WEIGHTS_FILE)
    with pytest.raises(FedctError, match=f"pooled/{WEIGHTS_FILE}: SHA-256 .* its card"):
        stage.run(PARAMS, UncertaintyParams(), cohort_dir, models, federated, tmp_path / "o")


def test_missing_federated_dir_evaluates_local_and_pooled(
        cohort_dir: Path, model_dirs: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    models, _ = model_dirs
    with pytest.warns(UserWarning, match="local and pooled models only"):
        metrics = stage.run(dataclasses.replace(PARAMS, n_boot=20), UncertaintyParams(),
                            cohort_dir, models, tmp_path / "no-federated", tmp_path / "out")
    assert set(metrics["heldout_dice"]) == {"local", "local_A", "pooled"}
    assert pd.read_csv(tmp_path / "out" / "cases.csv")["flagged"].isna().all()


def test_bad_inputs_are_errors_naming_the_file(
        cohort_dir: Path, model_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    models, federated = model_dirs
    # A per-target method must cover every held-out site.
    partial = tmp_path / "federated"
    _model(partial / "uw_merge" / "C", 9, "uw_merge", target_site="C")
    with pytest.raises(FedctError, match=r"uw_merge: per-target models for sites \['C'\], "
                                         r"but not for the held-out site\(s\) \['G'\]"):
        stage.find_candidates(models, partial, ["C", "G"])
    # A model on another grid.
    other = tmp_path / "other"
    _model(other / "B", 9, "B")
    card = json.loads((other / "B" / "model_card.json").read_text())
    card["preprocessing"] = {**SPEC, "spacing_mm": [3.0, 3.0, 3.0]}
    (other / "B" / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(FedctError, match=r"B/model_card.json: preprocessing"):
        stage.run(PARAMS, UncertaintyParams(), cohort_dir, other, federated, tmp_path / "o")
    # A threshold of another signal.
    stale = tmp_path / "threshold.json"
    stale.write_text(json.dumps({"signal": "entropy", "threshold": 1.0, "aggregate": "mean"}))
    with pytest.raises(FedctError, match="threshold.json: threshold of signal 'entropy'"):
        stage.read_threshold(stale, "sample_disagreement", "mean")
    # A threshold calibrated with another T (the signal's scale depends on it).
    other_t = tmp_path / "threshold_t.json"
    other_t.write_text(json.dumps({"signal": "entropy", "threshold": 1.0, "aggregate": "mean",
                                   "mc_samples": 20}))
    with pytest.raises(FedctError, match="calibrated with 20 MC samples, but evaluate"):
        stage.read_threshold(other_t, "entropy", "mean", 10)
    assert stage.read_threshold(other_t, "entropy", "mean", 20) == 1.0


def test_cli_errors_are_one_line(tmp_path: Path, model_dirs: tuple[Path, Path]) -> None:
    models, federated = model_dirs
    (tmp_path / "cohort").mkdir()
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "cohort"), str(models),
                                       str(federated), str(tmp_path / "out"),
                                       "--params", str(REPO_PARAMS)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "cohort.csv" in lines[0], lines


def test_best_local_on_val_scores_local_models_on_training_val_cases_only_and_promote_checks_it(
        cohort_dir: Path, model_dirs: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedct.config import PromoteParams

    monkeypatch.chdir(tmp_path)
    # Site A gets a labelled validation case; a second local model B joins A.
    cohort = shutil.copytree(cohort_dir, tmp_path / "cohort")
    table = pd.read_csv(cohort / "cohort.csv")
    val = table.iloc[[0]].assign(series_key="s99a", split="val")
    shutil.copy(cohort / "cases" / "s00a.npz", cohort / "cases" / "s99a.npz")
    pd.concat([table, val]).to_csv(cohort / "cohort.csv", index=False)
    models, federated = (shutil.copytree(p, tmp_path / p.name) for p in model_dirs)
    _model(models / "B", 7, "B")
    (tmp_path / "unc").mkdir()
    threshold = tmp_path / "unc" / "threshold.json"
    threshold.write_text(json.dumps({"signal": "sample_disagreement", "threshold": 0.3,
                                     "aggregate": "mean"}))
    out = tmp_path / "evaluate"
    params = dataclasses.replace(PARAMS, best_local_on="val")
    metrics = stage.run(params, UncertaintyParams(), cohort, models, federated, out, threshold)
    selection = pd.read_csv(out / stage.SELECTION_FILE)
    # Only the local models, only the training site's validation case.
    assert sorted(selection["model"]) == ["A", "B"] and set(selection["case"]) == {"s99a"}
    cases = pd.read_csv(out / "cases.csv")
    assert "s99a" not in set(cases["case"])  # never among the held-out comparison
    best = selection.sort_values(["dice", "model"], ascending=[False, True])["model"].iloc[0]
    assert metrics["best_local"] == best and metrics["best_local_on"] == "val"
    record = json.loads((out / "scored.json").read_text())
    assert record["selection_sha256"] == _sha(out / stage.SELECTION_FILE)
    run = promote.run(PromoteParams(n_boot=200, site_tolerance=0.2), out, models, federated,
                      tmp_path / "unc", tmp_path / "p")
    assert run["evidence"]["best_local"] == best
    assert run["numbers"]["selected_on"] == "val"
    # The validation table edited so that the other local model becomes the bar: refused.
    other = "A" if best == "B" else "B"
    selection.loc[selection["model"] == other, "dice"] = 1.0
    selection.to_csv(out / stage.SELECTION_FILE, index=False)
    with pytest.raises(FedctError, match=r"selection\.csv: SHA-256 .* changed after"):
        promote.run(PromoteParams(n_boot=200, site_tolerance=0.2), out, models, federated,
                    tmp_path / "unc", tmp_path / "p")
