"""Training loop: learns, is seeded, resumes from its checkpoint only when it may."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedct.config import TrainParams
from fedct.data.labels import LabelSet
from fedct.training.loop import train_model

LABELS = LabelSet(("background", "muscle", "femur"))
PARAMS = TrainParams(steps=6, channels=(4, 8), strides=(2,), patch_size=(16, 16, 8),
                     batch_size=2, val_checks=3, learning_rate=1e-2, seed=5)


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
    seen: list[int] = []
    # Same fingerprint: the run is complete, nothing is retrained.
    _, resumed = train_model(PARAMS, LABELS, _cases(4), _cases(2, 1), ckpt, "fp-1",
                             on_epoch=lambda r: seen.append(r["epoch"]))
    assert seen == [] and len(resumed) == len(full)
    # Other params/data: the stale checkpoint is ignored.
    train_model(PARAMS, LABELS, _cases(4), _cases(2, 1), ckpt, "fp-2",
                on_epoch=lambda r: seen.append(r["epoch"]))
    assert seen == [1, 2, 3]
