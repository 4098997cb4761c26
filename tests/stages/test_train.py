"""The train stage: the pooled model's matched epochs, and checkpoints that never outlive
their run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedct.config import TrainParams
from fedct.stages import train as stage
from fedct.stages.train import pooled_params
from fedct.training.loop import fingerprint


def test_pooled_sees_each_case_as_often_as_a_local_model() -> None:
    cases = pd.DataFrame({"site": ["A", "A", "B", "D", "D"]})
    params = pooled_params(TrainParams(steps=100), cases)
    assert params.steps == 300  # 3 sites: 3x the local cap
    assert params.channels == TrainParams().channels  # nothing else changes


def _tiny_cohort(root: Path) -> Path:
    """Site A: 2 training and 1 validation case, prepared as the cohort stage writes them."""
    rng = np.random.default_rng(0)
    (root / "cases").mkdir(parents=True)
    rows = []
    for i, split in enumerate(["train", "train", "val"]):
        label = np.zeros((1, 16, 16, 8), dtype=np.uint8)
        label[0, 4:12, 4:12, 2:6] = 1
        image = (0.2 + 0.5 * label + rng.normal(0, 0.03, label.shape)).astype(np.float32)
        np.savez(root / "cases" / f"k{i}.npz", image=image, label=label)
        rows.append({"series_key": f"k{i}", "study_key": f"st{i}", "patient_key": f"p{i}",
                     "site": "A", "split": split, "role": "train", "labelled": True,
                     "has_label": True})
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    (root / "spec.json").write_text(json.dumps({"spacing_mm": [2.0, 2.0, 2.0],
                                                "roi_size": [16, 16, 8], "hu_min": -200.0,
                                                "hu_max": 1000.0}))
    (root / "labels.json").write_text(json.dumps({"0": "background", "1": "muscle"}))
    return root


TINY = TrainParams(sites=("A",), steps=4, channels=(4, 8), strides=(2,), patch_size=(16, 16, 8),
                   max_shift=(0, 0, 0), batch_size=2, val_checks=2, patience=0, device="cpu")


def test_a_finished_run_leaves_no_checkpoint_for_a_rerun_to_restore(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC reruns ``train`` when code or cases change under the same params: the weights of
    the earlier run must not come back from its checkpoint."""
    monkeypatch.chdir(tmp_path)
    cohort = _tiny_cohort(tmp_path / "cohort")
    ckpts = tmp_path / "ckpt"
    calls: list[Path | None] = []
    real = stage.train_model

    def spy(*args, **kwargs):
        calls.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "train_model", spy)
    stage.run(TINY, "A", cohort, tmp_path / "out", ckpts)
    assert calls == [ckpts / "A" / "checkpoint.pt"]
    assert not (ckpts / "A" / "checkpoint.pt").exists()
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert list(history["step"]) == [2, 4]  # trained, not restored


def test_the_fingerprint_sees_case_contents_not_only_their_size(tmp_path: Path) -> None:
    cohort = _tiny_cohort(tmp_path / "cohort")
    files = sorted((cohort / "cases").glob("*.npz"))
    before = fingerprint(TINY, "A", files)
    with np.load(files[0]) as z:
        image, label = z["image"].copy(), z["label"]
    image[0, 0, 0, 0] += 0.5  # same shape, same file size, other data
    np.savez(files[0], image=image, label=label)
    assert files[0].stat().st_size == (cohort / "cases" / "k1.npz").stat().st_size
    assert fingerprint(TINY, "A", files) != before
    assert fingerprint(TINY, "B", files) != fingerprint(TINY, "A", files)
