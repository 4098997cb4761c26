"""``fedct evaluate``: every candidate model on the test cases of the held-out sites.

Candidates: each folder of ``MODELS_DIR`` holding ``model.safetensors`` (the local models
of ``train``, kind ``local``, and ``pooled``) and of ``FEDERATED_DIR`` (kind ``federated``,
one per method of ``federate``). A federated method adapted to each target site keeps one
model per held-out site (``FEDERATED_DIR/<method>/<site>/model.safetensors``, e.g. ``uw_merge``,
``tent``): each is scored on its own site's cases only, and together they are the
candidate ``<method>``. Without ``FEDERATED_DIR`` the local and pooled models are scored
and a warning says so.

Cases: the labelled test cases of held-out sites (``role == holdout`` and ``split ==
test`` in ``cohort.csv``; a held-out site's ``adapt`` cases, which the label-free methods
adapted on, are never scored). With ``evaluate.best_local_on: val`` the local models are
also scored on the training sites' labelled validation cases (``selection.csv``): the best
local model is chosen there, never on a held-out case. Every model runs MC dropout
through ``fedct.analysis.mc_eval``, the same code and records as the uncertainty stage;
the tables come from ``fedct.analysis.heldout``. Outputs (``OUT_DIR``):

- ``cases.csv``: one row per (model, case): Dice and HD95 (mean and per structure), the
  frozen failure signal (``uncertainty.signal`` / ``aggregation``), the flag threshold of
  ``uncertainty`` (``--threshold``) and the flag; the input of the promotion gate;
- ``summary.csv``: per model, per site and over all held-out sites, mean Dice and HD95
  with 95 % two-stage cluster-bootstrap intervals;
- ``paired.csv``: model minus best local, minus pooled and minus FedAvg, with intervals,
  and each uncertainty-guided method minus its ablation (the model card's ``ablation``:
  the same method without the uncertainty, e.g. ``steered`` - ``steered_uniform``);
- ``selection.csv`` (``best_local_on: val`` only): one row per (local model, validation
  case of a training site), as ``cases.csv``; what picks the best local model;
- ``metrics.json`` (DVC metrics: ``heldout_dice.<candidate>``, ...), ``dice_by_site.csv``
  (DVC plots) and ``dice_by_site.png``;
- ``scored.json``: the SHA-256 of ``cases.csv`` and of every weights file as loaded
  (``fedct.analysis.scored``): what ``promote`` verifies its inputs against.

MLflow: a parent run ``evaluate`` (params, tables as artifacts) and one child run per
candidate, all with the same metric names (``heldout_dice``, ``heldout_dice_lo``,
``heldout_dice_hi``, ``heldout_hd95``, ``heldout_dice_<site>``, ``paired_vs_best_local``,
...; ``fedct.analysis.heldout.candidate_metrics``), so the UI's run comparison shows the
table.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedct.analysis import heldout
from fedct.analysis.failure import SIGNALS
from fedct.analysis.mc_eval import score_models
from fedct.analysis.plots import interval_bars
from fedct.analysis.scored import FILE as SCORED_FILE
from fedct.analysis.scored import write_scored
from fedct.config import EvaluateParams, UncertaintyParams, to_dict
from fedct.data.cases import POOLED, read_cohort, read_spec, validation_cases
from fedct.devices import pick_device
from fedct.errors import FedctError
from fedct.model.io import CARD_FILE, LEGACY_FILE, find_weights, weights_path
from fedct.model.io import WEIGHTS_FILE as MODEL_FILE

SELECTION_FILE = "selection.csv"
OUTPUTS = ("cases.csv", "summary.csv", "paired.csv", "metrics.json", "dice_by_site.csv",
           "dice_by_site.png", SCORED_FILE)


@dataclass(frozen=True)
class Candidate:
    """One candidate: its name (folder), kind, and its model files with the site each one
    is scored on (None: every held-out site)."""

    name: str
    kind: str
    models: tuple[tuple[str | None, Path], ...]


def _per_target(folder: Path, kind: str, sites: list[str]) -> Candidate:
    targets = sorted(p.parent.name for p in find_weights(folder))
    missing = sorted(set(sites) - set(targets))
    if missing:
        raise FedctError(f"{folder}: per-target models for sites {targets}, but not for the "
                         f"held-out site(s) {missing}; every held-out site needs one")
    return Candidate(folder.name, kind, tuple((t, folder / t / MODEL_FILE) for t in sites))


def find_candidates(models_dir: Path, federated_dir: Path | None, sites: list[str]
                    ) -> list[Candidate]:
    """Local and pooled models of ``models_dir``, federated ones of ``federated_dir``."""
    found: list[Candidate] = []
    for p in find_weights(models_dir):
        name = p.parent.name
        found.append(Candidate(name, heldout.POOLED_KIND if name == POOLED else heldout.LOCAL,
                               ((None, p),)))
    if not found:
        raise FedctError(f"{models_dir}: no */{MODEL_FILE}; run `fedct train` first")
    if federated_dir is None or not Path(federated_dir).is_dir():
        warnings.warn(f"evaluate: {federated_dir} does not exist; evaluating the local and "
                      "pooled models only", stacklevel=2)
        return found
    federated = []
    for folder in sorted(p for p in Path(federated_dir).iterdir() if p.is_dir()):
        if (folder / MODEL_FILE).is_file() or (folder / LEGACY_FILE).is_file():
            # One model for every site (a pickled one is refused by weights_path).
            federated.append(Candidate(folder.name, heldout.FEDERATED,
                                       ((None, weights_path(folder)),)))
        elif find_weights(folder):
            federated.append(_per_target(folder, heldout.FEDERATED, sites))
    if not federated:
        warnings.warn(f"evaluate: {federated_dir} holds no federated model; evaluating the "
                      "local and pooled models only", stacklevel=2)
    clash = sorted({c.name for c in found} & {c.name for c in federated})
    if clash:
        raise FedctError(f"{federated_dir}: federated model name(s) {clash} are also local "
                         f"models in {models_dir}")
    return found + federated


def _check_cards(candidates: list[Candidate], spec: dict, cohort_dir: Path) -> None:
    """Every model expects the cohort's grid and has the same label set."""
    labels = None
    for c in candidates:
        for _, path in c.models:
            card_path = path.parent / CARD_FILE
            try:
                card = json.loads(card_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise FedctError(f"{card_path}: cannot read the model card ({exc})") from exc
            prep = card.get("preprocessing") or {}
            same = all(k in prep and np.allclose(np.asarray(prep[k], dtype=float),
                                                 np.asarray(spec[k], dtype=float))
                       for k in ("spacing_mm", "roi_size", "hu_min", "hu_max"))
            if not same:
                raise FedctError(f"{card_path}: preprocessing {prep} is not the cohort's grid "
                                 f"{spec} ({cohort_dir / 'spec.json'})")
            if labels is None:
                labels = card.get("labels")
            elif card.get("labels") != labels:
                raise FedctError(f"{card_path}: labels {card.get('labels')} differ from the "
                                 f"other candidates' {labels}")


def ablation_pairs(candidates: list[Candidate]) -> dict[str, str]:
    """Method -> its ablation, for each candidate whose model card names an ``ablation``
    that is a candidate too (``fedct.federation.methods``: the method without its
    uncertainty guidance)."""
    names = {c.name for c in candidates}
    pairs = {}
    for c in candidates:
        card = json.loads((c.models[0][1].parent / CARD_FILE).read_text())
        if card.get("ablation") in names:
            pairs[c.name] = str(card["ablation"])
    return pairs


def read_threshold(path: Path | None, signal: str, aggregation: str,
                   mc_samples: int | None = None) -> float:
    """The flag threshold of the uncertainty stage (``threshold.json``), NaN without one.

    A threshold of another signal or aggregation, or calibrated with another number of MC
    samples than ``mc_samples`` (the signal's scale depends on T), is refused."""
    if path is None:
        return math.nan
    try:
        data = json.loads(Path(path).read_text())
        threshold = float(data["threshold"]) if data["threshold"] is not None else math.nan
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise FedctError(f"{path}: cannot read the flag threshold ({exc})") from exc
    if data.get("signal") != signal or data.get("aggregate", aggregation) != aggregation:
        raise FedctError(f"{path}: threshold of signal {data.get('signal')!r} "
                         f"({data.get('aggregate')}), but uncertainty.signal is {signal!r} "
                         f"({aggregation}); rerun `fedct uncertainty`")
    calibrated = data.get("mc_samples")
    if mc_samples is not None and calibrated is not None and int(calibrated) != mc_samples:
        raise FedctError(f"{path}: threshold calibrated with {calibrated} MC samples, but "
                         f"evaluate.mc_samples is {mc_samples}; set them equal "
                         "(uncertainty.mc_samples)")
    return threshold


def run(params: EvaluateParams, uncertainty: UncertaintyParams, cohort_dir: Path,
        models_dir: Path, federated_dir: Path | None, out_dir: Path,
        threshold_file: Path | None = None) -> dict:
    """Score every candidate on the held-out sites' test cases; write tables, plots, runs."""
    from fedct import tracking

    cohort_dir, models_dir, out_dir = Path(cohort_dir), Path(models_dir), Path(out_dir)
    signal, aggregation = uncertainty.signal, uncertainty.aggregation
    if signal not in SIGNALS:
        raise FedctError(f"uncertainty.signal: {signal!r} is not one of {list(SIGNALS)}")
    cohort = read_cohort(cohort_dir)
    test = heldout.heldout_test_cases(cohort)
    if test.empty:
        raise FedctError(f"{cohort_dir / 'cohort.csv'}: no labelled test case of a held-out "
                         "site (cohort.holdout_sites)")
    sites = sorted(test["site"].astype(str).unique())
    candidates = find_candidates(models_dir, federated_dir, sites)
    _check_cards(candidates, read_spec(cohort_dir), cohort_dir)
    threshold = read_threshold(threshold_file, signal, aggregation, params.mc_samples)
    device = pick_device(params.device)
    val = validation_cases(cohort) if params.best_local_on == "val" else test.iloc[:0]
    if params.best_local_on == "val" and val.empty:
        raise FedctError(f"{cohort_dir / 'cohort.csv'}: evaluate.best_local_on is val, but no "
                         "training site has a labelled validation case (cohort.val_fraction)")

    def scored_on(c: Candidate, site: str | None):
        on = test if site is None else test[test["site"].astype(str) == site]
        if c.kind != heldout.LOCAL or val.empty:
            return on
        return pd.concat([on, val], ignore_index=True)

    jobs = [(c.name, path, scored_on(c, site)) for c in candidates for site, path in c.models]
    kinds = {c.name: c.kind for c in candidates}
    out_dir.mkdir(parents=True, exist_ok=True)
    with tracking.start_run("evaluate") as parent:
        parent.log_params({**to_dict(params), "signal": signal, "aggregation": aggregation,
                           "flag_threshold": threshold, "heldout_sites": sites,
                           "n_cases": len(test), "n_candidates": len(candidates),
                           "candidates": [c.name for c in candidates],
                           "federated_dir": str(federated_dir), "device": str(device)})
        structures, digests = score_models(params, cohort_dir, [p for _, p, _ in jobs],
                                           [t for _, _, t in jobs], device,
                                           names=[n for n, _, _ in jobs], desc="evaluate")
        on_heldout = structures["role"] == "holdout"
        cases = heldout.case_table(structures[on_heldout], kinds, signal, aggregation,
                                   threshold)
        selection = None
        if params.best_local_on == "val":
            selection = heldout.case_table(structures[~on_heldout], kinds, signal,
                                           aggregation, threshold)
            selection.to_csv(out_dir / SELECTION_FILE, index=False)
        else:
            (out_dir / SELECTION_FILE).unlink(missing_ok=True)
        summary = heldout.summary_table(cases, params.n_boot, params.seed)
        paired = heldout.paired_table(cases, params.n_boot, params.seed, selection=selection,
                                      ablations=ablation_pairs(candidates))
        cases.to_csv(out_dir / "cases.csv", index=False)
        # The digests promote checks: of this table as written and of each model as loaded.
        loaded = iter(digests)
        write_scored(out_dir / SCORED_FILE, (out_dir / "cases.csv").read_bytes(),
                     {c.name: (c.kind, [(site, path, next(loaded)) for site, path in c.models])
                      for c in candidates},
                     selection=(None if selection is None
                                else (out_dir / SELECTION_FILE).read_bytes()))
        summary.to_csv(out_dir / "summary.csv", index=False)
        paired.to_csv(out_dir / "paired.csv", index=False)
        bars = heldout.dice_by_site(summary)
        bars.to_csv(out_dir / "dice_by_site.csv", index=False)
        interval_bars(bars, out_dir / "dice_by_site.png",
                      "Mean Dice on held-out sites (95 % cluster-bootstrap interval)",
                      "mean case Dice")
        metrics = heldout.metrics_json(summary, paired)
        if selection is not None:
            metrics["best_local_on"] = params.best_local_on
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        parent.log_metrics({"n_cases": len(test), "n_candidates": len(candidates)})
        parent.set_tags({"fedct.best_local": str(metrics["best_local"]),
                         "fedct.signal": signal})
        for f in OUTPUTS + ((SELECTION_FILE,) if selection is not None else ()):
            parent.log_artifact(out_dir / f)
        parent_id = parent.run_id
    # One child run per candidate with the same metric names: MLflow's compare view.
    for c in candidates:
        label = heldout.metric_label(c.name, c.kind)
        tags = {"mlflow.parentRunId": parent_id, "fedct.candidate": label,
                "fedct.model": c.name, "fedct.kind": c.kind,
                "fedct.best_local": str(metrics["best_local"])}
        with tracking.start_run("evaluate", run_name=f"evaluate-{label}", tags=tags) as run:
            run.log_params({"candidate": label, "kind": c.kind, "signal": signal,
                            "models": [str(p) for _, p in c.models],
                            "mc_samples": params.mc_samples, "n_boot": params.n_boot,
                            "seed": params.seed})
            run.log_metrics(heldout.candidate_metrics(summary, paired, c.name))
    return metrics


def summary_line(metrics: dict) -> str:
    """One line for the command: each candidate's mean held-out Dice."""
    dice = metrics["heldout_dice"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in dice.items()
                      if v is not None and k != heldout.LOCAL)
    return (f"held-out Dice ({', '.join(metrics['sites'])}; best local: "
            f"{metrics['best_local']}): {shown}")
