"""``fedct uncertainty`` on a hand-made tiny cohort and tiny untrained models: every model
on every evaluation case with MC dropout, the failure protocol's tables, the flag
threshold that ``evaluate`` and ``predict`` read, and the label-free site ranking."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedct.config import UncertaintyParams
from fedct.errors import FedctError
from fedct.model.io import architecture, build_from_arch, save_model
from fedct.stages import uncertainty as stage
from tests.stages.tiny import LABELS, PATIENT, SPEC, tiny_case

PARAMS = UncertaintyParams(mc_samples=3, mc_batch=3, n_boot=50, seed=0, workers=1,
                           device="cpu")
# Training sites A and B (train, val, calib, test), held-out site C (test only).
ROWS = [(site, split, "train") for site in "AB"
        for split in ("train", "val", "calib", "calib", "test", "test")]
ROWS += [("C", "test", "holdout")] * 3


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    (root / "cases").mkdir()
    records = []
    for i, (site, split, role) in enumerate(ROWS):
        key = f"s{i:02d}{site.lower()}"
        contrast = {"A": 0.3, "B": 0.25, "C": 0.1}[site]  # C: a shifted site
        np.savez_compressed(root / "cases" / f"{key}.npz", **tiny_case(rng, contrast, noise=0.05))
        records.append({"series_key": key, "study_key": f"st{i}", "patient_key": PATIENT,
                        "site": site, "split": split, "role": role, "labelled": True,
                        "has_label": True, "vendor": "GE", "model": "X",
                        "kernel": "BONE" if site == "C" else "STANDARD",
                        "thickness_class": "thin"})
    pd.DataFrame(records).to_csv(root / "cohort.csv", index=False)
    (root / "spec.json").write_text(json.dumps(SPEC))
    (root / "labels.json").write_text(json.dumps(LABELS))
    return root


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for seed, site in enumerate(("A", "B", "pooled")):
        torch.manual_seed(seed)
        arch = architecture(len(LABELS), (4, 8), (2,), 0.5, 1)
        (root / site).mkdir()
        save_model(build_from_arch(arch), root / site / "model.safetensors", arch,
                   {"site": site, "labels": LABELS, "preprocessing": SPEC,
                    "reference_ml": [1.0, 0.1], "training": {"amp": False}})
    return root


@pytest.fixture(scope="module")
def result(cohort_dir: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("uncertainty")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(root / "mlartifacts"))
        mp.chdir(root)
        metrics = stage.run(PARAMS, cohort_dir, models_dir, root / "out")
    return root / "out", metrics


def test_every_model_on_every_evaluation_case(result: tuple[Path, dict]) -> None:
    out, metrics = result
    for f in (*stage.ARTIFACTS, "cases.csv", "structures.csv", "metrics.json"):
        assert (out / f).stat().st_size > 0, f
    cases = pd.read_csv(out / "cases.csv")
    evaluated = [r for r in ROWS if r[1] != "train"]  # val, calib and test cases
    assert len(cases) == 3 * len(evaluated)
    assert cases.groupby("model").size().to_dict() == {"A": 13, "B": 13, "pooled": 13}
    assert cases["dice"].between(0, 1).all()
    assert cases["sample_disagreement"].between(0, 1).all()
    assert {"deterministic_max_softmax", "noise_estimate", "header_rule"} <= set(cases.columns)
    structures = pd.read_csv(out / "structures.csv")
    assert len(structures) == 2 * len(cases)  # muscle and femur, never background
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))


def test_failure_definition_and_flag_threshold_come_from_calibration_pairs(
        result: tuple[Path, dict]) -> None:
    out, metrics = result
    cases = pd.read_csv(out / "cases.csv")
    in_domain_calib = cases[(cases["split"] == "calib") & (cases["model"] == cases["site"])]
    assert len(in_domain_calib) == 4
    fail_at = float(np.percentile(in_domain_calib["dice"], PARAMS.failure_percentile))
    assert metrics["failure_dice"] == pytest.approx(fail_at)
    assert metrics["calibration_split"] == "calib"
    assert (cases["failed"] == (cases["dice"] < fail_at)).all()
    test = cases[cases["split"] == "test"]
    assert metrics["n_test_pairs"] == len(test) == 3 * 7
    assert metrics["n_failed_test"] == int(test["failed"].sum())
    assert metrics["in_domain_dice"] == pytest.approx(
        test[test["model"] == test["site"]]["dice"].mean())

    threshold = json.loads((out / "threshold.json").read_text())
    assert threshold["signal"] == PARAMS.signal == metrics["signal"]
    assert threshold["aggregate"] == PARAMS.aggregation
    assert threshold["mc_samples"] == PARAMS.mc_samples
    assert threshold["failure_dice"] == pytest.approx(fail_at)
    assert threshold["calibrated_on"] == "calib split pairs"
    assert math.isfinite(float(threshold["threshold"]))
    assert float(threshold["threshold"]) == pytest.approx(metrics["flag_threshold"])
    flagged = test[PARAMS.signal] >= metrics["flag_threshold"]
    failed = test["failed"]
    assert metrics["flag_sensitivity"] == pytest.approx(
        (flagged & failed).sum() / max(int(failed.sum()), 1))
    assert metrics["flag_specificity"] == pytest.approx(
        (~flagged & ~failed).sum() / max(int((~failed).sum()), 1))


def test_signals_are_judged_beside_the_baselines_with_and_without_the_worst_site(
        result: tuple[Path, dict]) -> None:
    out, metrics = result
    signals = pd.read_csv(out / "signals.csv")
    worst = metrics["most_shifted_site"]
    assert worst in {"A", "B", "C"}
    assert set(signals["subset"]) == {"all", f"without_{worst}"}
    assert set(signals["kind"]) == {"uncertainty", "baseline"}
    assert {"sample_disagreement", "deterministic_max_softmax", "noise_estimate",
            "header_rule"} <= set(signals["signal"])
    case_level = signals[(signals["level"] == "case") & (signals["subset"] == "all")
                         & (signals["signal"] == PARAMS.signal)].iloc[0]
    assert metrics["aurc_all"] == pytest.approx(case_level["aurc"])
    for key in ("auroc_all", "auroc_lo_all", "auroc_hi_all", "aurc_without_worst",
                "aurc_deterministic_max_softmax_all", "aurc_header_rule_without_worst"):
        assert key in metrics, key


def test_label_free_ranking_and_shift_matrices_cover_every_site(
        result: tuple[Path, dict]) -> None:
    out, metrics = result
    ranking = pd.read_csv(out / "site_ranking.csv")
    assert sorted(ranking["site"]) == ["A", "B", "C"]
    assert list(ranking["rank"]) == [1, 2, 3]
    assert list(ranking["median"]) == sorted(ranking["median"], reverse=True)
    assert metrics["site_ranking"] == ",".join(ranking["site"])
    dice = pd.read_csv(out / "shift_dice.csv", index_col=0)
    assert sorted(dice.index) == ["A", "B", "pooled"] and sorted(dice.columns) == ["A", "B", "C"]
    assert dice.stack().between(0, 1).all()


def test_no_patient_key_reaches_an_output(result: tuple[Path, dict]) -> None:
    out, _ = result
    for f in out.iterdir():
        if f.suffix in (".csv", ".json"):
            assert PATIENT not in f.read_text(), f


@pytest.mark.parametrize("key", ["signal", "ranking_signal"])
def test_an_unknown_signal_is_refused_before_any_output(cohort_dir: Path, models_dir: Path,
                                                        tmp_path: Path, key: str) -> None:
    params = dataclasses.replace(PARAMS, **{key: "dice"})
    with pytest.raises(FedctError, match=f"uncertainty.{key}: 'dice'"):
        stage.run(params, cohort_dir, models_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_model_is_an_error_that_names_the_folder(cohort_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with pytest.raises(FedctError, match="no \\*/model.safetensors; run `fedct train` first"):
        stage.run(PARAMS, cohort_dir, tmp_path / "models", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_held_out_flag_baseline_and_out_of_domain_and_control_subsets(
        cohort_dir: Path, models_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # uncertainty.heldout_flag and domain_subsets (issue 23): the "held-out site" flag is
    # judged beside the other baselines, and every signal also among out-of-domain pairs
    # and among the control sites' pairs (here C plays the negative control).
    import dataclasses

    monkeypatch.chdir(tmp_path)
    params = dataclasses.replace(PARAMS, heldout_flag=True, domain_subsets=True)
    metrics = stage.run(params, cohort_dir, models_dir, tmp_path / "out", control_sites=("C",))
    signals = pd.read_csv(tmp_path / "out" / "signals.csv")
    worst = metrics["most_shifted_site"]
    assert set(signals["subset"]) == {"all", f"without_{worst}", "out_of_domain", "controls"}
    flag = signals[(signals["signal"] == "heldout_site") & (signals["level"] == "case")]
    assert set(flag["kind"]) == {"baseline"} and len(flag) == 4
    cases = pd.read_csv(tmp_path / "out" / "cases.csv")
    test = cases[cases["split"] == "test"]
    assert (cases["heldout_site"] == (cases["role"] == "holdout")).all()
    # Out of domain: A on B and C, B on A and C, pooled on C; never a model on its own site.
    ood = test[(test["model"] != test["site"])
               & ~((test["model"] == "pooled") & (test["role"] == "train"))]
    assert metrics["n_pairs_out_of_domain"] == len(ood) == (2 + 3) * 2 + 3
    assert metrics["n_pairs_controls"] == int((test["site"] == "C").sum()) == 3 * 3
    for key in ("auroc_out_of_domain", "aurc_out_of_domain", "aurc_controls",
                "aurc_heldout_site_all", "aurc_heldout_site_out_of_domain",
                "aurc_heldout_site_without_worst"):
        assert key in metrics, key
