"""The training loop of one Bayesian U-Net: early stopping, checkpoint and resume.

Every model, local or pooled, trains until its validation loss (Dice + CE of a
deterministic whole-volume pass over its validation cases) has not improved for
``train.patience`` validation passes, and for at most ``train.steps`` optimiser steps; the
weights of the best validation loss are kept. So each model is trained to its own
convergence under one common cap, and a comparison of local with pooled models is not a
comparison of how many updates each got. The learning rate follows a one-cycle schedule
over the cap (warm-up to ``train.learning_rate``, cosine decay), or over
``train.schedule_steps`` when set, after which the rate holds at the schedule's end value
until the plateau or the cap ends the run.

Augmentation: each training case is padded by ``train.max_shift`` voxels per side and a
random ``train.patch_size`` crop is taken, so the same anatomy appears at any position of
the input and slice index no longer tells the network where it is (the phantom, like a
real protocol, centres every scan on the same range); then left-right flips and small
intensity changes. Validation and inference see the whole volume.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import fedct.model
import fedct.training
from fedct.analysis.metrics import dice_per_structure
from fedct.config import TrainParams, model_params
from fedct.data.labels import LabelSet
from fedct.devices import pick_device, use_amp
from fedct.errors import FedctError
from fedct.model.factory import build_model
from fedct.model.io import read_checkpoint
from fedct.provenance import source_digest


def train_transforms(params: TrainParams):
    """Random translation (pad + crop), left-right flip, intensity jitter (MONAI, dict)."""
    from monai.transforms import (
        BorderPadd,
        Compose,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropd,
    )

    keys = ["image", "label"]
    return Compose([
        # Padding is air in the image (0 after the HU window) and background in the label.
        BorderPadd(keys=keys, spatial_border=[s for s in params.max_shift for _ in (0, 1)],
                   mode="constant", value=0),
        RandSpatialCropd(keys=keys, roi_size=params.patch_size, random_size=False),
        # Left-right flip keeps every label valid (structures are bilateral).
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandScaleIntensityd(keys="image", factors=0.05, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.02, prob=0.5),
    ])


def fingerprint(params: TrainParams, site: str, case_files: list[Path]) -> str:
    """What a resumable checkpoint must match: params, site, the cases' names and bytes,
    and the training code (params: ``config.model_params``)."""
    h = hashlib.sha256(json.dumps(model_params(params), sort_keys=True, default=str).encode())
    h.update(site.encode())
    # The code that decides the weights: a checkpoint of other code must not be resumed.
    h.update(source_digest(fedct.training, fedct.model).encode())
    for f in case_files:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def reference_volumes(label_maps: list[np.ndarray], spacing_mm: tuple[float, ...],
                      labels: LabelSet) -> list[float]:
    """Mean volume (ml) of each structure over the training label maps."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    return [float(np.mean([(lab == k).sum() * voxel_ml for lab in label_maps]))
            for k in labels.structures]


def make_loss():
    """The training loss of every fedct model (``train_model``, federated local updates):
    DiceCE; voxels labelled ``losses.IGNORE_INDEX`` (unconfident pseudo-labels) ignored."""
    from fedct.training.losses import MaskedDiceCELoss

    return MaskedDiceCELoss()


def evaluate(model: torch.nn.Module, cases: list[dict], device: torch.device, amp: bool,
             n_classes: int) -> tuple[float, np.ndarray]:
    """Deterministic (dropout off) whole-volume pass: mean loss, Dice (n_cases, C - 1)."""
    model.eval()
    loss_fn = make_loss()
    losses, dice = [], []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=use_amp(device, amp)):
        for c in cases:
            logits = model(torch.as_tensor(c["image"])[None].to(device)).float()
            label = torch.as_tensor(c["label"])[None].to(device)
            losses.append(float(loss_fn(logits, label)))
            seg = logits.argmax(1)[0].cpu()
            dice.append(dice_per_structure(seg, torch.as_tensor(c["label"][0]), n_classes))
    return float(np.mean(losses)), np.array(dice)


def evaluate_dice(model: torch.nn.Module, cases: list[dict], device: torch.device,
                  amp: bool, n_classes: int) -> np.ndarray:
    """Deterministic (dropout off) Dice per structure, (n_cases, C - 1)."""
    return evaluate(model, cases, device, amp, n_classes)[1]


def _nanmean(values: np.ndarray) -> float:
    """Mean ignoring NaN (structure absent from label and prediction); NaN if all are."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def training_batches(cases: list[dict], params: TrainParams, start_step: int
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches from step ``start_step`` on, each a function of (seed, step) only.

    The case order of each epoch and every random transform are seeded by the seed and
    the step, not by a running generator, so a resumed run draws exactly the batches the
    uninterrupted run would have drawn.
    """
    transform = train_transforms(params)
    size = min(params.batch_size, len(cases))
    per_epoch = -(-len(cases) // size)
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(
            _seed(params.seed, epoch)))
        items = []
        for i in order[k * size:(k + 1) * size].tolist():
            transform.set_random_state(seed=_seed(params.seed, step, i))
            items.append(transform(dict(cases[i])))
        yield {key: torch.stack([torch.as_tensor(it[key]).as_subclass(torch.Tensor)
                                 for it in items]) for key in ("image", "label")}
        step += 1


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], loss_fn: Callable, device: torch.device,
               amp: bool, penalty: Callable[[], torch.Tensor] | None = None) -> float:
    """One optimiser step on ``batch``; returns the data loss (without ``penalty``).

    The one training step of fedct: ``train_model`` and federated local updates
    (``fedct.training.local``) both call it. ``penalty()`` (e.g. FedProx's proximal term)
    is added to the loss before the backward pass.
    """
    model.train()
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(batch["image"].to(device))
        loss = loss_fn(logits.float(), batch["label"].to(device))
    total = loss if penalty is None else loss + penalty()
    total.backward()
    opt.step()
    return loss.detach().item()


def make_optimizer(model: torch.nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=params.learning_rate, weight_decay=1e-5)


def one_cycle(opt: torch.optim.Optimizer, params: TrainParams, total_steps: int
              ) -> tuple[torch.optim.lr_scheduler.OneCycleLR, int]:
    """The one-cycle schedule over ``total_steps`` and the number of steps it may take
    (after them the caller stops stepping it: the rate holds at its end value,
    learning_rate / 25 / ``train.final_div_factor``)."""
    # One-cycle needs a warm-up and a decay phase of at least one step each.
    total = max(4, total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=params.learning_rate, total_steps=total,
        pct_start=max(0.25, 2 / total), final_div_factor=params.final_div_factor), total


def schedule_length(params: TrainParams) -> int:
    """Steps of the one-cycle schedule: ``train.schedule_steps``, or the cap when 0."""
    return params.schedule_steps or params.steps


def check_shapes(params: TrainParams, shapes: list[tuple[int, ...]]) -> None:
    """Patches and whole volumes must fit the network: a clear error, not a shape crash."""
    factor = int(np.prod(params.strides))
    for name, shape in [("train.patch_size", tuple(params.patch_size)),
                        *(("a case", tuple(s)) for s in set(map(tuple, shapes)))]:
        if any(int(n) % factor for n in shape):
            raise FedctError(f"{name} {list(shape)}: every size must be divisible by "
                             f"{factor}, the product of train.strides")
    for s in set(map(tuple, shapes)):
        room = [n + 2 * m for n, m in zip(s, params.max_shift, strict=True)]
        if any(p > r for p, r in zip(params.patch_size, room, strict=True)):
            raise FedctError(f"train.patch_size {list(params.patch_size)} exceeds a case of "
                             f"{list(s)} voxels padded by train.max_shift ({room})")


def steps_per_epoch(n_cases: int, batch_size: int) -> int:
    return -(-n_cases // min(batch_size, n_cases))


def train_model(params: TrainParams, labels: LabelSet, train_cases: list[dict],
                val_cases: list[dict], checkpoint: Path | None, fp: str,
                on_check: Callable[[dict], None] | None = None, *,
                desc: str = "train: steps", position: int | None = None
                ) -> tuple[torch.nn.Module, pd.DataFrame]:
    """The training loop; returns the best model (by validation loss) and the history.

    One history row per validation pass (every ``steps // val_checks`` steps, and at the
    end): ``step``, ``epoch`` (steps / batches per epoch), mean training ``loss`` since the
    previous row, ``lr``, ``val_loss``, ``val_dice_mean`` and ``val_dice_<structure>``.
    Without validation cases the model trains for the whole cap and the last weights are
    kept. ``checkpoint`` (optional) is written at every row and resumed from when its
    fingerprint equals ``fp``; ``on_check(row)`` sees each row. ``desc`` and ``position``
    label the progress bar (``position``: its line, when several trainings run at once).
    """
    from monai.utils import set_determinism

    check_shapes(params, [c["image"].shape[1:] for c in train_cases + val_cases])
    set_determinism(seed=params.seed)
    torch.manual_seed(params.seed)
    device = pick_device(params.device)
    amp = use_amp(device, params.amp)
    model = build_model(params, labels).to(device)
    opt = make_optimizer(model, params)
    sched, total = one_cycle(opt, params, schedule_length(params))
    loss_fn = make_loss()
    val_every = max(1, params.steps // max(1, params.val_checks))
    per_epoch = steps_per_epoch(len(train_cases), params.batch_size)
    history: list[dict] = []
    step, best, best_state, stale = 0, float("inf"), None, 0
    if checkpoint is not None and checkpoint.exists():
        state = read_checkpoint(checkpoint, "training checkpoint", device)
        if state.get("fingerprint") == fp:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            torch.set_rng_state(state["torch_rng"])
            step, best, best_state = state["step"], state["best"], state["best_state"]
            stale, history = state["stale"], state["history"]
    done = step >= params.steps or (val_cases and stale >= params.patience > 0)
    batches = training_batches(train_cases, params, step)
    losses: list[float] = []
    bar = tqdm(total=params.steps, initial=step, desc=desc, position=position,
               disable=bool(done))
    while not done:
        losses.append(train_step(model, opt, next(batches), loss_fn, device, amp))
        if step + 1 < total:
            sched.step()
        step += 1
        bar.update(1)
        if step % val_every and step < params.steps:
            continue
        row: dict = {"step": step, "epoch": step / per_epoch, "loss": float(np.mean(losses)),
                     "lr": opt.param_groups[0]["lr"]}
        losses = []
        if val_cases:
            row["val_loss"], dice = evaluate(model, val_cases, device, amp, labels.n_classes)
            row["val_dice_mean"] = _nanmean(dice)
            row.update({f"val_dice_{n}": _nanmean(dice[:, k - 1])
                        for k, n in labels.structures.items()})
            if row["val_loss"] < best:
                best, stale = row["val_loss"], 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
        history.append(row)
        done = step >= params.steps or bool(val_cases and stale >= params.patience > 0)
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"fingerprint": fp, "step": step, "model": model.state_dict(),
                        "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "torch_rng": torch.get_rng_state(), "best": best,
                        "best_state": best_state, "stale": stale, "history": history}, tmp)
            os.replace(tmp, checkpoint)
        if on_check is not None:
            on_check(row)
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.cpu(), pd.DataFrame(history)
