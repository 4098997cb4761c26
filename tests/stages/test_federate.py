"""``fedct federate`` on a hand-made tiny cohort and tiny untrained local models.

The methods that need no Flower run (one-shot averaging, uncertainty-weighted merging and
``uw_select`` over them) run in seconds; FedAvg, FedProx, TENT and self-training run Flower's
simulation and are covered end to end by the slow tests (tests/federation, test_pipeline).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedct.config import FederateParams, TrainParams
from fedct.errors import FedctError
from fedct.model.io import architecture, build_from_arch, load_model, save_model
from fedct.stages import federate as stage
from tests.stages.tiny import LABELS, PATIENT, SPEC, tiny_case

N_TRAIN = {"A": 3, "B": 1}
REFERENCE_ML = {"A": [1.0, 0.2], "B": [3.0, 0.6]}
PARAMS = FederateParams(sites=("A", "B"), methods=("one_shot", "uw_merge", "uw_select"),
                        select_from=("one_shot", "uw_merge"), mc_samples=3, mc_batch=3,
                        device="cpu")
TRAIN = TrainParams(channels=(4, 8), strides=(2,), amp=False, device="cpu")


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training sites A and B; held-out sites C and G whose labels cannot be read: each
    held-out case stores its label as an object array, which ``np.load`` refuses to
    unpickle, so a label-free method that touched a target label would fail."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    rows = [("A", "train", "train"), ("A", "test", "train"), ("B", "train", "train"),
            ("C", "test", "holdout"), ("C", "test", "holdout"), ("G", "test", "holdout")]
    (root / "cases").mkdir()
    records = []
    for i, (site, split, role) in enumerate(rows):
        key = f"s{i:02d}{site.lower()}"
        case = tiny_case(rng)
        if role == "holdout":
            case["label"] = np.array([{"label": "never read"}], dtype=object)
        np.savez_compressed(root / "cases" / f"{key}.npz", **case)
        records.append({"series_key": key, "study_key": f"st{i}", "patient_key": PATIENT,
                        "site": site, "split": split, "role": role, "labelled": True,
                        "has_label": True})
    pd.DataFrame(records).to_csv(root / "cohort.csv", index=False)
    (root / "spec.json").write_text(json.dumps(SPEC))
    (root / "labels.json").write_text(json.dumps(LABELS))
    return root


def _model(folder: Path, seed: int, site: str, channels: tuple[int, ...] = (4, 8)) -> None:
    torch.manual_seed(seed)
    arch = architecture(len(LABELS), channels, (2,), 0.5, 1)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(build_from_arch(arch), folder / "model.safetensors", arch,
               {"site": site, "labels": LABELS, "preprocessing": SPEC,
                "reference_ml": REFERENCE_ML[site], "n_train": N_TRAIN[site]})


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    _model(root / "A", 1, "A")
    _model(root / "B", 2, "B")
    return root


@pytest.fixture(scope="module")
def federated(cohort_dir: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict, dict[str, bytes]]:
    """One stage run (its own MLflow store); the local models' bytes before it."""
    root = tmp_path_factory.mktemp("federate")
    before = {s: (models_dir / s / "model.safetensors").read_bytes() for s in N_TRAIN}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(root / "mlartifacts"))
        mp.chdir(root)
        metrics = stage.run(PARAMS, TRAIN, cohort_dir, models_dir, root / "federated",
                            root / "ckpt")
    return root / "federated", metrics, before


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path)[0].state_dict()


def _float_params_equal(merged: dict, parts: dict[str, dict], weights: dict[str, float]
                        ) -> None:
    """Every float tensor of ``merged`` is the ``weights``-average of ``parts``."""
    checked = 0
    for key, value in merged.items():
        if not value.is_floating_point():
            continue
        expected = sum(weights[s] * parts[s][key] for s in parts)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked > 0


def test_one_shot_is_the_case_weighted_average_of_the_local_models(
        federated: tuple[Path, dict, dict], models_dir: Path) -> None:
    out, metrics, before = federated
    weights = {"A": 0.75, "B": 0.25}  # training cases 3 and 1
    assert metrics["sites"] == ["A", "B"]
    assert metrics["weights"] == pytest.approx(weights)
    merged = _state(out / "one_shot" / "model.safetensors")
    _float_params_equal(merged, {s: _state(models_dir / s / "model.safetensors") for s in N_TRAIN},
                        weights)
    card = json.loads((out / "one_shot" / "model_card.json").read_text())
    assert card["kind"] == "federated" and card["method"] == "one_shot"
    assert card["clients"] == ["A", "B"] and card["weights"] == pytest.approx(weights)
    assert card["labels"] == LABELS and card["preprocessing"] == SPEC
    # The clients' mean structure volumes, weighted as the average is.
    assert card["reference_ml"] == pytest.approx([1.5, 0.3])
    assert card["runtime"]["stage"]["device"] == "cpu"
    # Averaging works on copies: the local models on disk are untouched.
    assert {s: (models_dir / s / "model.safetensors").read_bytes() for s in N_TRAIN} == before


def test_uw_merge_writes_one_model_per_held_out_site_weighted_by_uncertainty(
        federated: tuple[Path, dict, dict], models_dir: Path) -> None:
    out, metrics, _ = federated
    locals_ = {s: _state(models_dir / s / "model.safetensors") for s in N_TRAIN}
    assert sorted(p.name for p in (out / "uw_merge").iterdir()) == ["C", "G"]
    for target in ("C", "G"):
        card = json.loads((out / "uw_merge" / target / "model_card.json").read_text())
        assert card["target_site"] == target and card["method"] == "uw_merge"
        assert card["signal"] == "sample_disagreement"
        assert set(card["scores"]) == {"A", "B"}
        assert all(np.isfinite(v) and v >= 0 for v in card["scores"].values())
        w = card["weights"]
        assert set(w) == {"A", "B"} and sum(w.values()) == pytest.approx(1.0)
        assert all(v > 0 for v in w.values())
        assert metrics[f"uw_merge_weights_{target}"] == pytest.approx(w)
        _float_params_equal(_state(out / "uw_merge" / target / "model.safetensors"), locals_, w)


def test_uw_select_takes_the_least_uncertain_candidate_per_target(
        federated: tuple[Path, dict, dict]) -> None:
    out, metrics, _ = federated
    for target in ("C", "G"):
        card = json.loads((out / "uw_select" / target / "model_card.json").read_text())
        scores = card["scores"]
        assert set(scores) == {"one_shot", "uw_merge"}
        assert card["chosen"] == min(scores, key=lambda m: (scores[m], m != "one_shot"))
        assert metrics[f"uw_select_{target}"] == {"chosen": card["chosen"], "scores": scores}
        source = (out / "one_shot" / "model.safetensors" if card["chosen"] == "one_shot"
                  else out / "uw_merge" / target / "model.safetensors")
        chosen, copy = _state(source), _state(out / "uw_select" / target / "model.safetensors")
        assert chosen.keys() == copy.keys()
        assert all(torch.equal(chosen[k], copy[k]) for k in chosen)


def test_only_the_listed_methods_run_and_nothing_names_a_patient(
        federated: tuple[Path, dict, dict]) -> None:
    out, metrics, _ = federated
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "one_shot",
                                                     "uw_merge", "uw_select"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(
        json.dumps(metrics, default=str))
    for f in out.rglob("*.json"):
        assert PATIENT not in f.read_text(), f


def test_equal_weighting_averages_the_sites_alike(cohort_dir: Path, models_dir: Path,
                                                  tmp_path: Path) -> None:
    params = dataclasses.replace(PARAMS, methods=("one_shot",), weighting="equal")
    metrics = stage.run(params, TRAIN, cohort_dir, models_dir, tmp_path / "out")
    assert metrics["weights"] == pytest.approx({"A": 0.5, "B": 0.5})
    _float_params_equal(_state(tmp_path / "out" / "one_shot" / "model.safetensors"),
                        {s: _state(models_dir / s / "model.safetensors") for s in N_TRAIN},
                        {"A": 0.5, "B": 0.5})


@pytest.mark.parametrize(("change", "message"), [
    ({"methods": ("one_shot", "fedsgd")}, "federate.methods = ['one_shot', 'fedsgd']: "
                                          "expected methods among"),
    ({"methods": ("one_shot", "one_shot")}, "expected each method once"),
    ({"sites": ("A", "B", "D")}, "no local model of site D"),
    ({"select_from": ("one_shot", "tent")}, "federate.select_from = ['one_shot', 'tent']: "
                                            "expected uw_select choosing among"),
    ({"select_from": ()}, "federate.select_from = []"),
    ({"select_from": ("one_shot", "uw_select")}, "federate.select_from"),
    ({"uw_signal": "dice"}, "federate.uw_signal = 'dice'"),
])
def test_bad_params_stop_before_any_output(cohort_dir: Path, models_dir: Path,
                                           tmp_path: Path, change: dict, message: str) -> None:
    params = dataclasses.replace(PARAMS, **change)
    with pytest.raises(FedctError, match=message.replace("[", r"\[").replace("]", r"\]")):
        stage.run(params, TRAIN, cohort_dir, models_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_local_models_of_other_architectures_are_refused(cohort_dir: Path, tmp_path: Path
                                                         ) -> None:
    _model(tmp_path / "models" / "A", 1, "A")
    _model(tmp_path / "models" / "B", 2, "B", channels=(8, 16))
    with pytest.raises(FedctError, match="differ in architecture"):
        stage.run(PARAMS, TRAIN, cohort_dir, tmp_path / "models", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_label_free_methods_need_a_held_out_site(cohort_dir: Path, models_dir: Path,
                                                 tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    rows = pd.read_csv(cohort_dir / "cohort.csv")
    rows[rows["role"] != "holdout"].to_csv(cohort / "cohort.csv", index=False)
    for name in ("spec.json", "labels.json"):
        (cohort / name).write_text((cohort_dir / name).read_text())
    (cohort / "cases").symlink_to(cohort_dir / "cases")
    with pytest.raises(FedctError, match="no held-out site for the label-free methods"):
        stage.run(PARAMS, TRAIN, cohort, models_dir, tmp_path / "out")


def test_label_free_methods_read_only_the_adapt_split_never_a_scored_case(
        cohort_dir: Path, models_dir: Path, tmp_path: Path) -> None:
    # cohort.adapt_fraction > 0: each held-out site has adapt cases and test cases. The
    # test cases' files are unreadable here, so a method that read one would fail; and no
    # case that evaluate or uncertainty scores is among those adapted on.
    import shutil

    from fedct.analysis.heldout import heldout_test_cases
    from fedct.data.cases import adaptation_cases, evaluation_cases

    cohort = shutil.copytree(cohort_dir, tmp_path / "cohort")
    table = pd.read_csv(cohort / "cohort.csv")
    table.loc[table["series_key"].isin(["s03c", "s05g"]), ["split", "has_label"]] = [
        "adapt", False]
    extra = table[table["series_key"] == "s05g"].assign(series_key="s06g", split="test")
    table = pd.concat([table, extra], ignore_index=True)
    table.to_csv(cohort / "cohort.csv", index=False)
    scored = table[(table["role"] == "holdout") & (table["split"] == "test")]
    for key in scored["series_key"]:
        (cohort / "cases" / f"{key}.npz").write_bytes(b"not a case: never read")
    adapted = set(adaptation_cases(table)["series_key"])
    assert adapted == {"s03c", "s05g"}
    assert not adapted & set(heldout_test_cases(table.assign(has_label=True))["series_key"])
    assert not adapted & set(evaluation_cases(table)["series_key"])
    stage.run(PARAMS, TRAIN, cohort, models_dir, tmp_path / "out")
    for target in ("C", "G"):
        card = json.loads((tmp_path / "out" / "uw_merge" / target / "model_card.json")
                          .read_text())
        assert card["target_site"] == target
    # Without an adapt split, the same methods read the scored cases (transductive): the
    # unreadable files then stop the run, so the test above did not pass by chance.
    table.loc[table["split"] == "adapt", "split"] = "test"
    table.to_csv(cohort / "cohort.csv", index=False)
    with pytest.raises(Exception):  # noqa: B017 - whatever numpy raises on a bad file
        stage.run(PARAMS, TRAIN, cohort, models_dir, tmp_path / "out2")


def test_rounds_summary_reports_the_best_and_the_last_round() -> None:
    history = [{"round": 1, "val_dice_mean": 0.5}, {"round": 2, "val_dice_mean": 0.7},
               {"round": 3, "val_dice_mean": 0.6}, {"round": 4, "val_dice_mean": None}]
    assert stage.rounds_summary(history) == {"best_round": 2, "last_round": 4,
                                             "kept_round": 4}
    # With plateau stopping the best round's model is the one kept.
    assert stage.rounds_summary(history, patience=2) == {"best_round": 2, "last_round": 4,
                                                         "kept_round": 2}
    assert stage.rounds_summary([]) == {"best_round": None, "last_round": None,
                                        "kept_round": None}
