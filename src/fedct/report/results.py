"""What a clone of the repository shows without a DVC remote: ``results/``.

DVC's convention for results that travel with git: small files, written by a stage as
uncached outputs (``cache: false``) and committed with ``dvc.lock``. The report stage
writes them beside the report, from the same stage outputs and with the same figures:

- ``metrics.json``: the headline numbers only, flat, grouped by stage (``dvc metrics
  show`` prints one row of about 25 columns); the detail stays in each stage's own
  ``outputs/<stage>/metrics.json`` (cached, pulled with the outputs).
- ``plots/*.png``: static images (``dvc plots show`` draws them without Vega, which
  loads from a CDN that hospital networks block): learning curves of ``train``,
  validation Dice per federated round, held-out Dice with intervals, and copies of the
  stages' own heatmaps and scatter.

Aggregates and site letters only: no path, no pseudonym, no case row.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from fedct.report import figures
from fedct.report.sections import (
    CATALOGUE,
    EVALUATE,
    FEDERATED,
    HI_COLUMNS,
    LO_COLUMNS,
    PROMOTE,
    UNCERTAINTY,
    continued_rounds,
)

MODELS = "models"
#: Images the stages draw themselves, copied as they are: (stage folder, file).
STAGE_IMAGES = ((CATALOGUE, "shift_heatmap.png"), (UNCERTAINTY, "shift_dice.png"),
                (UNCERTAINTY, "shift_uncertainty.png"),
                (UNCERTAINTY, "uncertainty_vs_dice.png"), (EVALUATE, "dice_by_site.png"))
_HEADLINES = {
    CATALOGUE: ("n_series", "n_usable", "n_rejects", "n_sites"),
    UNCERTAINTY: ("auroc_all", "auroc_lo_all", "auroc_hi_all", "flag_sensitivity",
                  "flag_specificity", "in_domain_dice"),
}


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _number(v: Any) -> float | int | None:
    """A JSON number, NaN and infinities as null (DVC and strict JSON readers)."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int | float):
        return v if math.isfinite(v) else None
    return None


def headline_metrics(root: Path) -> dict[str, dict[str, float | int | None]]:
    """The headline numbers of the stage outputs under ``root``, by stage; a stage that
    has not run is left out."""
    out: dict[str, dict[str, float | int | None]] = {}
    for stage, keys in _HEADLINES.items():
        m = _json(root / stage / "metrics.json")
        if m:
            out[stage] = {k: _number(m.get(k)) for k in keys}
    fed = {}
    for h in sorted((root / FEDERATED).glob("*/history.csv")):
        rounds = pd.read_csv(h)
        if len(rounds) and "val_dice" in rounds:
            fed[f"{h.parent.name}_last_round_val_dice"] = _number(
                float(rounds["val_dice"].iloc[-1]))
    if fed:
        out[FEDERATED] = fed
    heldout = _json(root / EVALUATE / "metrics.json").get("heldout_dice") or {}
    if heldout:
        out[EVALUATE] = {f"heldout_dice_{m}": _number(v) for m, v in heldout.items()}
    decision = _json(root / PROMOTE / "decision.json")
    if decision:
        numbers = decision.get("numbers") or {}
        diff = numbers.get("difference") or {}
        out[PROMOTE] = {"promoted": _number(bool(decision.get("promote"))),
                        "vs_best_local": _number(diff.get("estimate")),
                        "vs_best_local_lo": _number(diff.get("lo")),
                        "vs_best_local_hi": _number(diff.get("hi"))}
    return out


def _first(columns: list[str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in columns), None)


def plots(root: Path) -> dict[str, bytes]:
    """The static plots (file name -> PNG bytes) of what under ``root`` exists."""
    out: dict[str, bytes] = {}
    train = {p.parent.name: pd.read_csv(p) for p in sorted((root / MODELS).glob("*/history.csv"))}
    if train:
        out["training_loss.png"] = figures.line_chart(
            train, "epoch", "loss", "epoch", "Dice + CE loss (training)",
            "Training loss per epoch, one line per model")
        with_val = {k: h for k, h in train.items() if "val_dice_mean" in h}
        if with_val:
            out["validation_dice.png"] = figures.line_chart(
                with_val, "epoch", "val_dice_mean", "epoch", "mean validation Dice",
                "Validation Dice, one line per model")
    fed = {p.parent.name: pd.read_csv(p) for p in sorted((root / FEDERATED).glob("*/history.csv"))}
    fed = {k: h for k, h in fed.items() if len(h) and {"round", "val_dice"} <= set(h)}
    if fed:
        starts = {k: _json(root / FEDERATED / k / "model_card.json").get("start") for k in fed}
        out["federated_rounds.png"] = figures.round_curves(continued_rounds(fed, starts))
    summary_csv = root / EVALUATE / "summary.csv"
    if summary_csv.is_file():
        s = pd.read_csv(summary_csv)
        lo, hi = _first(list(s.columns), LO_COLUMNS), _first(list(s.columns), HI_COLUMNS)
        if {"model", "site", "dice"} <= set(s.columns) and lo and hi:
            s = s.dropna(subset=["dice"])
            if len(s):
                out["heldout_dice.png"] = figures.interval_chart(s, "dice", lo, hi)
    for stage, name in STAGE_IMAGES:
        if (root / stage / name).is_file():
            out[f"{stage}_{name}"] = (root / stage / name).read_bytes()
    return out


def write_results(root: Path, results_dir: Path) -> list[Path]:
    """Write ``results_dir/metrics.json`` and ``results_dir/plots/*.png`` afresh (a plot
    whose input is gone goes too); the files written."""
    results_dir = Path(results_dir)
    shutil.rmtree(results_dir / "plots", ignore_errors=True)
    (results_dir / "plots").mkdir(parents=True)
    metrics = results_dir / "metrics.json"
    metrics.write_text(json.dumps(headline_metrics(Path(root)), indent=1) + "\n")
    written = [metrics]
    for name, png in plots(Path(root)).items():
        (results_dir / "plots" / name).write_bytes(png)
        written.append(results_dir / "plots" / name)
    return written
