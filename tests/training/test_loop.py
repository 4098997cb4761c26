"""Training loop: learns, is seeded, stops early, resumes from its checkpoint only when it may."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedct.config import TrainParams
from fedct.data.labels import LabelSet
from fedct.errors import FedctError
from fedct.training.loop import train_model, training_batches
from tests.model.payload import planted

LABELS = LabelSet(("background", "muscle", "femur"))
PARAMS = TrainParams(steps=6, channels=(4, 8), strides=(2,), patch_size=(16, 16, 8),
                     max_shift=(0, 0, 2), batch_size=2, val_checks=3, patience=0,
                     learning_rate=1e-2, seed=5)


def _cases(n: int, seed: int = 0) -> list[dict]:
    """Bright cubes labelled femur (2) on dark noise: trivially learnable."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.normal(0.1, 0.02, (1, 16, 16, 8)).astype(np.float32)
        lab = np.zeros((1, 16, 16, 8), dtype=np.uint8)
        x, y = rng.integers(2, 8, 2)
        img[0, x:x + 6, y:y + 6, 2:6] = 0.8
        lab[0, x:x + 6, y:y + 6, 2:6] = 2
        out.append({"image": img, "label": lab})
    return out


def test_training_is_seeded_and_reduces_loss() -> None:
    a_model, a_hist = train_model(PARAMS, LABELS, _cases(4), _cases(2, 1), None, "fp")
    b_model, b_hist = train_model(PARAMS, LABELS, _cases(4), _cases(2, 1), None, "fp")
    assert a_hist["loss"].iloc[-1] < a_hist["loss"].iloc[0]
    pd.testing.assert_frame_equal(a_hist, b_hist)
    for (ka, va), (kb, vb) in zip(a_model.state_dict().items(), b_model.state_dict().items(),
                                  strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert {"val_dice_mean", "val_dice_femur"} <= set(a_hist.columns)


def test_resume_only_with_matching_fingerprint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    _, full = train_model(PARAMS, LABELS, _cases(4), _cases(2, 1), ckpt, "fp-1")
    assert ckpt.exists()
    assert list(full["step"]) == [2, 4, 6] and list(full["epoch"]) == [1, 2, 3]
    seen: list[int] = []
    # Same fingerprint: the run is complete, nothing is retrained.
    _, resumed = train_model(PARAMS, LABELS, _cases(4), _cases(2, 1), ckpt, "fp-1",
                             on_check=lambda r: seen.append(r["step"]))
    assert seen == [] and len(resumed) == len(full)
    # Other params/data: the stale checkpoint is ignored.
    train_model(PARAMS, LABELS, _cases(4), _cases(2, 1), ckpt, "fp-2",
                on_check=lambda r: seen.append(r["step"]))
    assert seen == [2, 4, 6]


def test_a_killed_run_resumes_where_it_stopped_and_ends_as_if_never_stopped(
        tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    _, uninterrupted = train_model(PARAMS, LABELS, _cases(4), _cases(2, 1), None, "fp")

    class Killed(Exception):
        pass

    def kill_after_first(row: dict) -> None:
        if row["step"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train_model(PARAMS, LABELS, _cases(4), _cases(2, 1), ckpt, "fp",
                    on_check=kill_after_first)
    seen: list[int] = []
    _, resumed = train_model(PARAMS, LABELS, _cases(4), _cases(2, 1), ckpt, "fp",
                             on_check=lambda r: seen.append(r["step"]))
    assert seen == [4, 6]
    pd.testing.assert_frame_equal(resumed, uninterrupted)


def test_a_pickle_payload_as_the_checkpoint_is_refused_not_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    marker = planted(ckpt, tmp_path / "pwned")
    with pytest.raises(FedctError, match="ckpt.pt: the training checkpoint holds objects "
                                         "other than tensors"):
        train_model(PARAMS, LABELS, _cases(4), _cases(2, 1), ckpt, "fp")
    assert not marker.exists(), "resuming ran the code planted in the checkpoint"


def test_early_stopping_on_validation_loss_keeps_the_best_weights() -> None:
    # A learning rate this high makes validation loss stall or rise after a few passes.
    params = dataclasses.replace(PARAMS, steps=40, val_checks=20, patience=2,
                                 learning_rate=0.5)
    model, hist = train_model(params, LABELS, _cases(4), _cases(2, 1), None, "fp")
    best = hist["val_loss"].idxmin()
    assert hist["step"].iloc[-1] < 40  # stopped before the cap
    assert len(hist) == best + 1 + 2  # exactly `patience` passes after the best one
    from fedct.training.loop import evaluate

    # Evaluated as the loop did (bf16 where the CPU has it: params.amp).
    loss, _ = evaluate(model, _cases(2, 1), torch.device("cpu"), params.amp, LABELS.n_classes)
    assert loss == pytest.approx(hist["val_loss"][best], rel=1e-5)


def test_a_schedule_shorter_than_the_cap_holds_its_end_rate_until_the_plateau() -> None:
    params = dataclasses.replace(PARAMS, steps=24, schedule_steps=8, val_checks=12,
                                 patience=0, final_div_factor=4.0)
    _, hist = train_model(params, LABELS, _cases(4), _cases(2, 1), None, "fp")
    lr = dict(zip(hist["step"], hist["lr"], strict=True))
    end = params.learning_rate / 25 / 4
    # Past the warm-up (a quarter of the 8-step schedule) the rate decays to the schedule's
    # end at step 8 and is held there up to the cap.
    assert params.learning_rate > lr[2] > lr[4] > lr[6] > end
    assert all(lr[s] == pytest.approx(end) for s in range(8, 25, 2))
    # Without schedule_steps the same schedule spans the 24-step cap.
    _, full = train_model(dataclasses.replace(params, schedule_steps=0), LABELS, _cases(4),
                          _cases(2, 1), None, "fp")
    assert full["lr"].iloc[5] > 10 * end and full["lr"].iloc[-1] == pytest.approx(end)


def test_training_crops_move_the_anatomy_along_z() -> None:
    # One case with a marker slab: where it lands in the patch varies from step to step,
    # so slice index cannot encode anatomy; the patch keeps the requested size.
    case = _cases(1)[0]
    params = dataclasses.replace(PARAMS, batch_size=1, patch_size=(16, 16, 8),
                                 max_shift=(0, 0, 4))
    batches = training_batches([case], params, 0)
    z_of_slab = set()
    for _ in range(30):
        b = next(batches)
        assert b["image"].shape == (1, 1, 16, 16, 8)
        z = torch.nonzero((b["label"][0, 0] == 2).any(dim=(0, 1))).flatten()
        if len(z):
            z_of_slab.add(int(z[0]))
    assert len(z_of_slab) >= 4
    # Resuming at step 7 draws the same batches the uninterrupted stream drew there.
    a = training_batches([case], params, 0)
    for _ in range(7):
        next(a)
    torch.testing.assert_close(next(a)["image"], next(training_batches([case], params, 7))["image"])


def test_patches_that_do_not_fit_the_network_are_refused() -> None:
    bad = dataclasses.replace(PARAMS, patch_size=(16, 16, 7))
    with pytest.raises(FedctError, match="divisible by 2"):
        train_model(bad, LABELS, _cases(2), [], None, "fp")
    too_big = dataclasses.replace(PARAMS, patch_size=(16, 16, 16), max_shift=(0, 0, 2))
    with pytest.raises(FedctError, match="exceeds"):
        train_model(too_big, LABELS, _cases(2), [], None, "fp")


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_very_short_runs_train(steps: int) -> None:
    # The pipeline test trains 4 steps: the one-cycle schedule must still have two phases.
    params = dataclasses.replace(PARAMS, steps=steps, val_checks=2)
    _, hist = train_model(params, LABELS, _cases(2), _cases(1, 1), None, "fp")
    assert hist["step"].iloc[-1] == steps
