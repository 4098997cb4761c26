"""benchmarks/ablation.py: the factor table, its statistics, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    path = ROOT / "benchmarks" / "ablation.py"
    spec = importlib.util.spec_from_file_location("ablation_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ablation = _load()


def _cases(factor: str, ref: np.ndarray, fac: np.ndarray, pos=None, shift=0.0) -> pd.DataFrame:
    return pd.DataFrame({"factor": factor, "case": np.arange(len(ref)), "dice_ref": ref,
                         "dice_factor": fac,
                         "dice_position": np.nan if pos is None else pos,
                         "centroid_shift_vox": shift})


def test_summarise_flags_a_drop_and_not_noise_or_position() -> None:
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.80, 0.90, 12)
    table = ablation.summarise(pd.concat([
        _cases("bites", ref, ref - 0.10 + rng.normal(0, 0.01, 12)),
        _cases("noise", ref, ref + rng.normal(0, 0.01, 12)),
        _cases("small", ref, ref - 0.02 + rng.normal(0, 0.005, 12)),
        # The whole drop comes back when the reference is merely moved.
        _cases("position", ref, ref - 0.10, pos=ref - 0.10, shift=5.0),
    ]), n_boot=300).set_index("factor")
    assert table.loc["bites", "drop"] == pytest.approx(0.10, abs=0.01)
    assert table.loc["bites", "drop_lo"] > 0 and table.loc["bites", "bites"]
    assert table.loc["bites", "bites_beyond_position"]  # no position shift to explain it
    noise = table.loc["noise"]
    assert noise["drop_lo"] < 0 < noise["drop_hi"] and not noise["bites"]
    assert table.loc["small", "drop_lo"] > 0 and not table.loc["small", "bites"]  # < 0.05
    pos = table.loc["position"]
    assert pos["bites"] and not pos["bites_beyond_position"]
    assert pos["drop_position_only"] == pytest.approx(0.10)
    assert (table["n_cases"] == 12).all()


def test_translate_moves_by_whole_voxels_and_fills_with_background() -> None:
    image = np.zeros((1, 6, 5, 4), np.float32)
    image[0, 2, 2, 1] = 1.0
    case = {"image": image, "label": (image > 0).astype(np.uint8)}
    moved = ablation.translate(case, np.array([1.4, -2.0, 0.0]))
    assert moved["image"][0, 3, 0, 1] == 1.0 and moved["image"].sum() == 1.0
    np.testing.assert_allclose(ablation.centroid(moved["label"]) - ablation.centroid(case["label"]),
                               [1.0, -2.0, 0.0])
    gone = ablation.translate(case, np.array([5.0, 0.0, 0.0]))
    assert gone["label"].sum() == 0  # moved out of the grid


def test_report_seed_is_refused(tmp_path: Path) -> None:
    from fedct.config import load_params

    report = load_params(ROOT / "params.yaml").synth.seed
    with pytest.raises(SystemExit, match="report seed"):
        ablation.run(["--profile", "tiny", "--params", str(ROOT / "params.yaml"),
                      "--seed", str(report), "--out", str(tmp_path / "a.csv")])


@pytest.mark.slow
def test_tiny_ablation_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "ablation.csv"
    table = ablation.run([
        "--profile", "tiny", "--params", str(ROOT / "params.yaml"), "--threads", "1",
        "--factors", "calibration_offset,unilateral_small_fov", "--n-train", "2",
        "--n-test", "4", "--steps", "4", "--n-boot", "200", "--out", str(out)])
    written = pd.read_csv(out)
    assert list(written.columns[: len(ablation.COLUMNS)]) == ablation.COLUMNS
    assert list(written["factor"]) == ["calibration_offset", "unilateral_small_fov", "control"]
    assert (written["n_cases"] == 4).all() and "wall_s" in written
    t = table.set_index("factor")
    # The control (a rescan under the reference acquisition) costs nothing.
    control = t.loc["control"]
    # (A rescan draws new noise: on 4 cases its interval may just miss 0, never by 0.01.)
    assert abs(control["drop"]) < 0.01
    assert -0.01 < control["drop_lo"] <= control["drop_hi"] < 0.01
    assert control["centroid_shift_vox"] == 0 and not control["bites"]
    # The offset reaches the model input through the pipeline's preprocessing and moves
    # nothing; the unilateral field moves the anatomy, so it gets a position-only control.
    offset = t.loc["calibration_offset"]
    assert offset["grid_shift_vox"] == 0 and offset["centroid_shift_vox"] == 0
    assert 4.0 < offset["input_mad_hu"] < 9.0
    uni = t.loc["unilateral_small_fov"]
    assert uni["grid_shift_vox"] > 3 and np.isfinite(uni["drop_position_only"])
    cases = pd.read_csv(tmp_path / "ablation_cases.csv")
    assert len(cases) == 12 and set(cases["case"]) == {0, 1, 2, 3}
    info = json.loads((tmp_path / "ablation_run.json").read_text())
    from fedct.config import load_params

    dev = load_params(ROOT / "params.yaml").synth.dev_seeds
    assert info["seed"] == dev[0] and info["steps_run"] == 4 and info["seconds"]["total"] > 0


def test_the_local_profile_trains_on_what_a_local_model_of_the_pipeline_gets() -> None:
    from fedct.config import load_params
    from fedct.synth.axial import PROFILES

    params = load_params(ROOT / "params.yaml")
    args = ablation.parse_args(["--profile", "local"])
    n_train, n_val, n_test = ablation.patients(ablation.PROFILES["local"], args, params.cohort)
    # The demo archive's 8 patients per site: 2 test, 1 val, 1 calib, 4 train.
    assert PROFILES["demo"].patients_per_site == 8
    assert (n_train, n_val, n_test) == (4, 1, 12)
    # Its training settings are params.yaml's, unchanged (train.steps, not the old 480).
    local = ablation.train_params(args, params.train, ablation.PROFILES["local"])
    assert local == params.train
    assert ablation.train_params(args, params.train, ablation.PROFILES["demo"]).steps == 480
    # Options still win.
    args = ablation.parse_args(["--profile", "local", "--n-train", "6", "--n-val", "0"])
    assert ablation.patients(ablation.PROFILES["local"], args, params.cohort)[:2] == (6, 0)


def test_the_study_profile_trains_as_make_study_and_refuses_its_report_seeds(
        tmp_path: Path) -> None:
    from fedct.overlay import load_overlay

    params, _, _ = load_overlay(ROOT / "profiles" / "study.yaml", ROOT / "params.yaml")
    args = ablation.parse_args(["--profile", "study"])
    n_train, n_val, n_test = ablation.patients(ablation.PROFILES["study"], args, params.cohort)
    # One training site of the study archive: 16 patients, 4 test, 2 val, 4 calib.
    assert (n_train, n_val, n_test) == (6, 2, 16)
    trained = ablation.train_params(args, params.train, ablation.PROFILES["study"])
    assert (trained.steps, trained.patience) == (params.train.steps, params.train.patience)
    assert trained.steps != ablation.load_params(ROOT / "params.yaml").train.steps
    for seed in params.synth.report_seeds:  # the overlay's report seeds, not params.yaml's
        with pytest.raises(SystemExit, match="report seed"):
            ablation.run(["--profile", "study", "--params", str(ROOT / "params.yaml"),
                          "--seed", str(seed), "--out", str(tmp_path / "a.csv")])
