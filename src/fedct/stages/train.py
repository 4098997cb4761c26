"""Train one Bayesian U-Net per site (or the pooled model on all training sites).

Inputs: the cohort (``cohort.csv`` + prepared ``cases/``). Output folder: ``model.pt``
(state dict + the architecture, so MC dropout works after loading), ``reference.json``
(mean structure volumes of the training set, for label-free volume checks),
``history.csv`` (per-epoch loss and validation Dice per structure), ``curves.png`` and
``metrics.json``. A checkpoint in ``checkpoint_dir`` lets a killed run resume; it is only
reused when params and training data are the same.
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

from fedct.config import TrainParams, to_dict
from fedct.errors import FedctError
from fedct.model import build_bayesian_unet
from fedct.preprocess import load_case
from fedct.synth.anatomy import N_CLASSES, STRUCTURES

POOLED = "pooled"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def training_cases(cohort: pd.DataFrame, site: str) -> pd.DataFrame:
    """Labelled train/val cases of ``site`` (or of every training site for the pooled model)."""
    c = cohort[(cohort["role"] == "train") & cohort["has_label"].astype(bool)]
    if site != POOLED:
        c = c[c["site"] == site]
    if c.empty or not (c["split"] == "train").any():
        raise FedctError(f"train: no labelled training cases for site {site!r} in the cohort "
                         f"(sites with training data: {sorted(set(cohort['site']))})")
    return c


def build_model(params: TrainParams) -> torch.nn.Module:
    return build_bayesian_unet(N_CLASSES, params.channels, params.strides, params.dropout,
                               params.num_res_units)


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


def reference_volumes(labels: list[np.ndarray], spacing_mm: tuple[float, ...]) -> list[float]:
    """Mean volume (ml) of each structure over the training labels."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    return [float(np.mean([(lab == k).sum() * voxel_ml for lab in labels]))
            for k in STRUCTURES]


def evaluate_dice(model: torch.nn.Module, cases: list[dict], device: torch.device,
                  amp: bool) -> np.ndarray:
    """Deterministic (dropout off) Dice per structure, (n_cases, C - 1)."""
    from fedct.metrics import dice_per_structure

    model.eval()
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=amp and device.type == "cuda"):
        for c in cases:
            logits = model(torch.as_tensor(c["image"])[None].to(device))
            seg = logits.argmax(1)[0].cpu()
            out.append(dice_per_structure(seg, torch.as_tensor(c["label"][0]), N_CLASSES))
    return np.array(out)


def _nanmean(values: np.ndarray) -> float:
    """Mean ignoring NaN (structure absent from label and prediction); NaN if all are."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def train_model(params: TrainParams, train_cases: list[dict], val_cases: list[dict],
                checkpoint: Path | None, fp: str, on_epoch=None
                ) -> tuple[torch.nn.Module, pd.DataFrame]:
    """The training loop; returns the best model (by validation Dice) and the history."""
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    set_determinism(seed=params.seed)
    torch.manual_seed(params.seed)
    device = pick_device(params.device)
    amp = params.amp and device.type == "cuda"
    model = build_model(params).to(device)
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
            dice = evaluate_dice(model, val_cases, device, amp)
            row["val_dice_mean"] = _nanmean(dice)
            row.update({f"val_dice_{n}": _nanmean(dice[:, k - 1]) for k, n in STRUCTURES.items()})
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


def save_model(model: torch.nn.Module, params: TrainParams, path: Path, extra: dict) -> None:
    """State dict + architecture: loadable anywhere with ``load_model`` (MC dropout intact)."""
    torch.save({"state_dict": model.state_dict(),
                "arch": {"n_classes": N_CLASSES, "channels": list(params.channels),
                         "strides": list(params.strides), "dropout": params.dropout,
                         "num_res_units": params.num_res_units},
                **extra}, path)


def load_model(path: Path) -> tuple[torch.nn.Module, dict]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    a = blob["arch"]
    model = build_bayesian_unet(a["n_classes"], a["channels"], a["strides"], a["dropout"],
                                a["num_res_units"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob


def _plot_curves(history: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(history["epoch"], history["loss"])
    ax[0].set(xlabel="epoch", ylabel="Dice + CE loss", title=f"{title}: training loss")
    if "val_dice_mean" in history:
        v = history.dropna(subset=["val_dice_mean"])
        for n in STRUCTURES.values():
            ax[1].plot(v["epoch"], v[f"val_dice_{n}"], label=n, lw=0.8)
        ax[1].plot(v["epoch"], v["val_dice_mean"], "k", lw=2, label="mean")
        ax[1].set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice")
        ax[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(params: TrainParams, site: str, cohort_dir: Path, out_dir: Path,
        checkpoint_dir: Path | None = None) -> dict:
    """Train the model of ``site`` (a site letter or ``pooled``); log to MLflow."""
    from fedct import tracking

    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cohort = pd.read_csv(cohort_dir / "cohort.csv")
    cases = training_cases(cohort, site)
    files = [cohort_dir / "cases" / f"{k}.npz" for k in cases["series_key"]]
    loaded = [load_case(f) for f in tqdm(files, desc=f"train {site}: load")]
    train = [c for c, s in zip(loaded, cases["split"], strict=True) if s == "train"]
    val = [c for c, s in zip(loaded, cases["split"], strict=True) if s == "val"]
    fp = fingerprint(params, site, files)
    ckpt = Path(checkpoint_dir) / site / "checkpoint.pt" if checkpoint_dir else None
    spacing = tuple(json.loads((cohort_dir / "spec.json").read_text())["spacing_mm"])
    name = f"fedct-{POOLED}" if site == POOLED else f"fedct-local-{site}"
    with tracking.start_run("train", run_name=f"train-{site}",
                            tags={"fedct.site": site}) as mlrun:
        mlrun.log_params({**to_dict(params), "site": site, "n_train": len(train),
                          "n_val": len(val), "device": str(pick_device(params.device))})
        mlrun.log_dataset(cases, name=f"cohort-{site}", source=str(cohort_dir / "cohort.csv"),
                          context="training")
        model, history = train_model(
            params, train, val, ckpt, fp,
            on_epoch=lambda row: mlrun.log_metrics(
                {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])))
        reference = reference_volumes([c["label"][0] for c in train], spacing)
        (out_dir / "reference.json").write_text(json.dumps(
            {"structures": list(STRUCTURES.values()), "volume_ml": reference}, indent=1))
        save_model(model, params, out_dir / "model.pt",
                   {"site": site, "reference_ml": reference, "spacing_mm": list(spacing),
                    "fingerprint": fp})
        history.to_csv(out_dir / "history.csv", index=False)
        _plot_curves(history, out_dir / "curves.png", name)
        final = history.dropna(subset=["val_dice_mean"]) if "val_dice_mean" in history else None
        metrics = {"final_loss": float(history["loss"].iloc[-1]), "n_train": len(train),
                   "n_val": len(val),
                   "best_val_dice": float(final["val_dice_mean"].max())
                   if final is not None and len(final) else float("nan")}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        mlrun.log_metrics(metrics)
        mlrun.log_artifact(out_dir / "curves.png")
        mlrun.log_artifact(out_dir / "history.csv")
        mlrun.log_torch_model(model, name="model", registered_name=name)
    return metrics
