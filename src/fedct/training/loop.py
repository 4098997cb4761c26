"""The training loop of one Bayesian U-Net, with checkpoint and resume.

Training runs a fixed number of optimiser steps (``train.steps``), rounded up to whole
epochs; the model with the best mean validation Dice (deterministic pass) is kept. Random
crops, left-right flips and small intensity changes augment the training cases.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from fedct.analysis.metrics import dice_per_structure
from fedct.config import TrainParams, to_dict
from fedct.data.labels import LabelSet
from fedct.devices import pick_device
from fedct.model.io import architecture, build_from_arch


def model_arch(params: TrainParams, labels: LabelSet) -> dict:
    """The architecture of ``params`` for ``labels`` (saved with the model)."""
    return architecture(labels.n_classes, params.channels, params.strides, params.dropout,
                        params.num_res_units)


def build_model(params: TrainParams, labels: LabelSet) -> torch.nn.Module:
    return build_from_arch(model_arch(params, labels))


def _train_transforms(params: TrainParams):
    from monai.transforms import (
        Compose,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropd,
        ToTensord,
    )

    return Compose([
        RandSpatialCropd(keys=["image", "label"], roi_size=params.patch_size, random_size=False),
        # Left-right flip keeps every label valid (structures are bilateral).
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
        RandScaleIntensityd(keys="image", factors=0.05, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.02, prob=0.5),
        ToTensord(keys=["image", "label"]),
    ])


def fingerprint(params: TrainParams, site: str, case_files: list[Path]) -> str:
    h = hashlib.sha256(json.dumps(to_dict(params), sort_keys=True, default=str).encode())
    h.update(site.encode())
    for f in case_files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def reference_volumes(label_maps: list[np.ndarray], spacing_mm: tuple[float, ...],
                      labels: LabelSet) -> list[float]:
    """Mean volume (ml) of each structure over the training label maps."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    return [float(np.mean([(lab == k).sum() * voxel_ml for lab in label_maps]))
            for k in labels.structures]


def evaluate_dice(model: torch.nn.Module, cases: list[dict], device: torch.device,
                  amp: bool, n_classes: int) -> np.ndarray:
    """Deterministic (dropout off) Dice per structure, (n_cases, C - 1)."""
    model.eval()
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=amp and device.type == "cuda"):
        for c in cases:
            logits = model(torch.as_tensor(c["image"])[None].to(device))
            seg = logits.argmax(1)[0].cpu()
            out.append(dice_per_structure(seg, torch.as_tensor(c["label"][0]), n_classes))
    return np.array(out)


def _nanmean(values: np.ndarray) -> float:
    """Mean ignoring NaN (structure absent from label and prediction); NaN if all are."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def train_model(params: TrainParams, labels: LabelSet, train_cases: list[dict],
                val_cases: list[dict], checkpoint: Path | None, fp: str, on_epoch=None
                ) -> tuple[torch.nn.Module, pd.DataFrame]:
    """The training loop; returns the best model (by validation Dice) and the history.

    ``checkpoint`` (optional) is written after every epoch and resumed from when its
    fingerprint equals ``fp``; ``on_epoch(row)`` sees each epoch's history row.
    """
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    set_determinism(seed=params.seed)
    torch.manual_seed(params.seed)
    device = pick_device(params.device)
    amp = params.amp and device.type == "cuda"
    model = build_model(params, labels).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=params.learning_rate, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    ds = Dataset(train_cases, transform=_train_transforms(params))
    gen = torch.Generator().manual_seed(params.seed)
    loader = DataLoader(ds, batch_size=params.batch_size, shuffle=True, num_workers=0,
                        generator=gen)
    epochs = max(1, -(-params.steps // len(loader)))
    val_every = max(1, epochs // max(1, params.val_checks))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    history: list[dict] = []
    start, best, best_state = 0, -1.0, None
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state.get("fingerprint") == fp:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            gen.set_state(state["gen"])
            torch.set_rng_state(state["torch_rng"])
            start, best, best_state = state["epoch"], state["best"], state["best_state"]
            history = state["history"]
    for epoch in tqdm(range(start, epochs), desc="train: epochs", initial=start,
                      total=epochs):
        model.train()
        losses = []
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(batch["image"].to(device))
                loss = loss_fn(logits.float(), batch["label"].to(device))
            loss.backward()
            opt.step()
            losses.append(loss.detach().item())
        sched.step()
        row: dict = {"epoch": epoch + 1, "loss": float(np.mean(losses)),
                     "lr": sched.get_last_lr()[0]}
        last = epoch + 1 == epochs
        if val_cases and ((epoch + 1) % val_every == 0 or last):
            dice = evaluate_dice(model, val_cases, device, amp, labels.n_classes)
            row["val_dice_mean"] = _nanmean(dice)
            row.update({f"val_dice_{n}": _nanmean(dice[:, k - 1])
                        for k, n in labels.structures.items()})
            if row["val_dice_mean"] > best:
                best = row["val_dice_mean"]
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"fingerprint": fp, "epoch": epoch + 1, "model": model.state_dict(),
                        "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                        "best": best, "best_state": best_state, "history": history}, tmp)
            os.replace(tmp, checkpoint)
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.cpu(), pd.DataFrame(history)
