"""``fedct federate``: federated models of the training sites, and label-free methods.

Inputs: the cohort, the local models of ``train`` (``MODELS_DIR/<site>/model.safetensors``).
Output: one folder per candidate in ``OUT_DIR``, each with ``model.safetensors`` and
``model_card.json`` (the format of ``train``; MC dropout survives loading):

- ``one_shot/``: the average of the local models (``federation.aggregate``), weighted by
  training cases (``federate.weighting``);
- ``fedavg/``, ``fedprox/``: ``federate.rounds`` rounds of Flower (simulation, one
  SuperNode per site; ``fedct.federation.simulation``) from a seeded fresh model; each
  client trains ``local_steps`` steps per round on its own training split only. Beside
  the model: ``history.csv`` (a row per round) and ``federation.log``;
- label-free methods, which read the images of the held-out target sites but never their
  labels (``fedct.data.cases.load_image`` reads the image member of a case only):
  ``uw_merge/<target>/`` merges the local models with weights from their MC-dropout
  uncertainty on the target's images; ``tent/<target>/`` adapts the FedAvg model's
  normalisation affine parameters by entropy minimisation on them; ``self_train/``
  continues FedAvg for ``self_train_rounds`` rounds with every target as one more client
  whose data are the FedAvg model's confident, stable MC-dropout pseudo-labels (DPL).
  ``uw_select/<target>/`` is the candidate of ``federate.select_from`` (FedAvg, FedProx,
  the target's TENT model, the self-trained model) with the lowest MC-dropout uncertainty
  (``federate.uw_signal``) on the target's images: the model a site without ground truth
  would deploy. It runs last, on the models written above.

The label-free methods read the target's images, never a label: its ``adapt`` cases,
disjoint from the ``test`` cases ``evaluate`` scores, when the cohort has them
(``cohort.adapt_fraction`` > 0); else they are transductive and see the same target
images that ``evaluate`` scores (as TENT does at test time).

MLflow: one parent run per stage, a child run per method (a step per round: global
validation Dice, per-site loss and Dice, bytes, seconds), with a grandchild run per
site for the multi-round methods, and each model logged with its card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedct.config import FederateParams, TrainParams, to_dict
from fedct.data.cases import adaptation_cases, case_path, load_image, read_cohort, save_case
from fedct.devices import pick_device, runtime
from fedct.errors import FedctError
from fedct.federation import LABEL_FREE
from fedct.federation.aggregate import case_weights, site_weights, weighted_average
from fedct.federation.stopping import best_round
from fedct.model.io import WEIGHTS_FILE, load_model, save_model, weights_path

METHODS = ("one_shot", "fedavg", "fedprox", "uw_merge", "tent", "self_train", "uw_select")
# Methods that need the FedAvg model (their teacher / starting point).
NEEDS_FEDAVG = ("tent", "self_train")


def _local_models(models_dir: Path, sites: tuple[str, ...]
                  ) -> dict[str, tuple[torch.nn.Module, dict]]:
    out = {}
    for site in sites:
        folder = Path(models_dir) / site
        path = weights_path(folder) if folder.is_dir() else folder / WEIGHTS_FILE
        if not path.is_file():
            raise FedctError(f"{path}: no local model of site {site} (federate.sites must "
                             "be sites that `train` trained)")
        out[site] = load_model(path)
    arches = {json.dumps(card["arch"], sort_keys=True) for _, card in out.values()}
    if len(arches) != 1:
        raise FedctError(f"{models_dir}: the local models of {list(sites)} differ in "
                         "architecture and cannot be averaged")
    return out


def _weights(params: FederateParams, n_train: dict[str, int]) -> dict[str, float]:
    if params.weighting == "equal":
        return site_weights({s: 1.0 for s in n_train})
    return case_weights(n_train)


def _card(base_card: dict, method: str, where: dict, **extra) -> dict:
    """A federated model's card: the local cards' labels and preprocessing, its own name,
    and ``runtime``: where its weights were computed (``where``: ``stage``, this stage's
    process, for what it computes itself; ``clients``, each site's, for Flower's methods)."""
    keep = {k: base_card[k] for k in ("labels", "preprocessing", "reference_ml")
            if k in base_card}
    return {**keep, "site": method, "kind": "federated", "method": method, **extra,
            "runtime": where}


def _save(model: torch.nn.Module, out: Path, arch: dict, card: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_model(model.cpu(), out / WEIGHTS_FILE, arch, card)
    return out / WEIGHTS_FILE


def _target_images(cohort: pd.DataFrame, cohort_dir: Path) -> dict[str, list[np.ndarray]]:
    """Each held-out site's images (never a label): the label-free methods' only input;
    its ``adapt`` cases when the cohort has them (``adaptation_cases``)."""
    held = adaptation_cases(cohort)
    return {site: [load_image(case_path(cohort_dir, k)) for k in rows["series_key"]]
            for site, rows in held.groupby("site", sort=True)}


def _mean_reference(cards: list[dict], weights: list[float]) -> list[float]:
    refs = np.array([c["reference_ml"] for c in cards], dtype=float)
    return [float(v) for v in np.average(refs, axis=0, weights=weights)]


@contextlib.contextmanager
def _timed(method: str):
    """Progress: one line when a method starts and when it is done."""
    print(f"federate {method}: start", flush=True)
    t0 = time.perf_counter()
    yield
    print(f"federate {method}: done in {time.perf_counter() - t0:.0f} s", flush=True)


def rounds_summary(history: list[dict], patience: int = 0) -> dict:
    """Convergence of a multi-round method (issue 23): ``best_round``, the completed round
    with the highest aggregated validation Dice of the clients' val splits (None without
    one); ``last_round``, the last round run (below ``federate.rounds`` when a plateau
    stopped it); ``kept_round``, the round whose model is kept: the best with
    ``federate.patience`` > 0, else the last (``patience`` is the stage's setting)."""
    done = [r for r in history if r.get("round") is not None]
    best = best_round([r.get("val_dice_mean", float("nan")) for r in done])
    last = int(done[-1]["round"]) if done else None
    return {"best_round": int(done[best - 1]["round"]) if best else None,
            "last_round": last, "kept_round": last if not patience or not best
            else int(done[best - 1]["round"])}


def _history_table(history: list[dict]) -> pd.DataFrame:
    rows = []
    for rec in history:
        row = {k: rec.get(k) for k in ("round", "attempt", "seconds", "bytes_sent",
                                       "bytes_received", "clients", "train_loss",
                                       "val_dice_mean")}
        row["val_dice"] = rec.get("val_dice_mean")
        row["failed"] = ";".join(f"{f['site']}: {f['reason']}" for f in rec.get("failed", []))
        for site, m in (rec.get("sites") or {}).items():
            for key in ("train_loss", "val_dice", "seconds"):
                row[f"{site}_{key}"] = m.get(key)
        rows.append(row)
    return pd.DataFrame(rows)


def _multi_round(name: str, mu: float, params: FederateParams, train: TrainParams,
                 cohort_dir: Path, sites: tuple[str, ...], out: Path, checkpoint_dir: Path,
                 mlrun, init_model: Path | None = None, rounds: int | None = None,
                 site_weights_: dict[str, float] | None = None,
                 min_clients: int | None = None, patience: int | None = None
                 ) -> tuple[Path, list[dict]]:
    from fedct import tracking
    from fedct.federation.simulation import run_federation

    rounds = params.rounds if rounds is None else rounds

    def on_round(rec: dict) -> None:
        step = int(rec["round"])
        metrics = {"val_dice": rec.get("val_dice_mean"), "train_loss": rec.get("train_loss"),
                   "round_seconds": rec.get("seconds"), "bytes_sent": rec.get("bytes_sent"),
                   "bytes_received": rec.get("bytes_received"),
                   "clients": rec.get("clients"), "failed_clients": len(rec.get("failed", []))}
        for site, m in (rec.get("sites") or {}).items():
            metrics.update({f"{site}.train_loss": m.get("train_loss"),
                            f"{site}.val_dice": m.get("val_dice"),
                            f"{site}.seconds": m.get("seconds")})
        mlrun.log_metrics(metrics, step=step)
        failed = ", ".join(f"{f['site']} ({f['reason']})" for f in rec.get("failed", []))
        print(f"federate {name}: round {step}/{rounds}, val Dice "
              f"{rec.get('val_dice_mean', float('nan')):.3f}, {rec.get('seconds', 0):.0f} s"
              + (f"; failed: {failed}" if failed else ""), flush=True)

    train = _federated_train_params(train, params)
    history, model_path = run_federation(
        cohort_dir, sites, train, rounds=rounds, local_steps=params.local_steps, mu=mu,
        min_clients=min(min_clients or params.min_clients, len(sites)),
        init_model=init_model, out_dir=out, checkpoint_dir=checkpoint_dir / name,
        on_round=on_round, seed=params.seed, site_weights=site_weights_,
        patience=params.patience if patience is None else patience)
    # The checkpoint serves a killed run only: a finished one must not be reused when the
    # cohort changes under the same settings.
    shutil.rmtree(checkpoint_dir / name, ignore_errors=True)
    table = _history_table(history)
    table.to_csv(out / "history.csv", index=False)
    # One child run per site, with its per-round metrics.
    for site in sites:
        with tracking.start_run("federate", run_name=f"{name}-{site}", nested=True,
                                tags={"fedct.method": name, "fedct.site": site}) as child:
            n_train = None
            for rec in history:
                m = (rec.get("sites") or {}).get(site)
                if m:
                    child.log_metrics({k: m.get(k) for k in ("train_loss", "val_dice",
                                                             "val_loss", "seconds")},
                                      step=int(rec["round"]))
                    n_train = m.get("n_train") if n_train is None else n_train
            child.log_params({"site": site, "n_train": n_train})
    return model_path, history


def _federated_train_params(train: TrainParams, params: FederateParams) -> TrainParams:
    """The clients' training settings: ``train``'s, on the federation's device."""
    return dataclasses.replace(train, device=params.device)


def _self_train_cohort(cohort: pd.DataFrame, cohort_dir: Path, teacher: torch.nn.Module,
                       images: dict[str, list[np.ndarray]], params: FederateParams,
                       sites: tuple[str, ...], out: Path, amp: bool
                       ) -> tuple[Path, dict[str, float]]:
    """A cohort whose target sites train on the teacher's pseudo-labels (DPL filter)."""
    from fedct.federation.label_free import pseudo_labelled_cases, with_ignore

    derived = out / "cohort"
    shutil.rmtree(derived, ignore_errors=True)
    (derived / "cases").mkdir(parents=True)
    for name in ("labels.json", "spec.json"):
        shutil.copy2(Path(cohort_dir) / name, derived / name)
    keep = cohort[cohort["site"].isin(sites) & (cohort["role"] == "train")].copy()
    for key in keep["series_key"]:
        shutil.copy2(case_path(cohort_dir, key), case_path(derived, key))
    device = pick_device(params.device)
    teacher = teacher.to(device)
    kept: dict[str, float] = {}
    rows = [keep]
    held = adaptation_cases(cohort)
    for site, imgs in images.items():
        cases = pseudo_labelled_cases(teacher, imgs, params.mc_samples, params.mc_batch,
                                      params.seed, params.pseudo_p_min, params.pseudo_std_max,
                                      amp=amp)
        keys = held.loc[held["site"] == site, "series_key"].tolist()
        for key, case in zip(keys, cases, strict=True):
            label = with_ignore(case["label"], case["mask"]).astype(np.uint8)
            save_case(case_path(derived, key), {"image": case["image"], "label": label})
        kept[site] = float(np.mean([c["mask"].mean() for c in cases]))
        site_rows = held[held["site"] == site].copy()
        site_rows["split"], site_rows["role"], site_rows["has_label"] = "train", "train", True
        rows.append(site_rows)
    pd.concat(rows).to_csv(derived / "cohort.csv", index=False)
    return derived, kept


def run(params: FederateParams, train: TrainParams, cohort_dir: Path, models_dir: Path,
        out_dir: Path, checkpoint_dir: Path | None = None) -> dict:
    """Every method of ``federate.methods``; the stage metrics (also ``metrics.json``)."""
    from fedct import tracking
    from fedct.federation.label_free import (
        WEIGHT_SIGNALS,
        merge_for_target,
        scores_to_weights,
        select_by_uncertainty,
        target_uncertainty,
        tent_adapt,
    )

    unknown = sorted(set(params.methods) - set(METHODS))
    if unknown:
        raise FedctError(f"federate.methods: unknown {unknown}; choose from {list(METHODS)}")
    if params.rounds * params.local_steps != train.steps:
        # Allowed (a study of more local work), but then federated and local models differ
        # in optimiser steps as well as in method: say so where the numbers are made.
        warnings.warn(f"federate: rounds x local_steps = {params.rounds * params.local_steps}"
                      f" optimiser steps per client, but train.steps = {train.steps}: the "
                      "federated and local models differ in training length", stacklevel=2)
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir.parent / "federate_ckpt"
    sites = tuple(params.sites)
    cohort = read_cohort(cohort_dir)
    locals_ = _local_models(models_dir, sites)
    base_card = next(iter(locals_.values()))[1]
    arch = base_card["arch"]
    n_train = {s: int(card["n_train"]) for s, (_, card) in locals_.items()}
    weights = _weights(params, n_train)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"sites": list(sites), "weights": weights}
    device = pick_device(params.device)
    amp = train.amp  # bf16 where the device has it (fedct.devices.use_amp)
    here = {"stage": runtime(device, amp)}
    needs_targets = set(LABEL_FREE) & set(params.methods)
    targets = _target_images(cohort, cohort_dir) if needs_targets else {}
    if needs_targets and not targets:
        raise FedctError(f"{cohort_dir / 'cohort.csv'}: no held-out site for the label-free "
                         f"methods {sorted(needs_targets)} (cohort.holdout_sites)")
    if "uw_select" in params.methods:
        bad = [m for m in params.select_from if m not in params.methods or m == "uw_select"]
        if bad or not params.select_from:
            raise FedctError(f"federate.select_from {list(params.select_from)}: uw_select "
                             f"chooses among methods that run (federate.methods); not "
                             f"{bad or 'an empty list'}")
    if set(params.methods) & {"uw_merge", "uw_select"} and params.uw_signal not in WEIGHT_SIGNALS:
        raise FedctError(f"federate.uw_signal {params.uw_signal!r}: choose one of "
                         f"{list(WEIGHT_SIGNALS)}")
    # Every federated card carries the clients' mean structure volumes (label-free volume
    # checks in evaluate and predict), not one site's.
    base_card = {**base_card, "reference_ml": _mean_reference(
        [locals_[s][1] for s in sites], [weights[s] for s in sites])}
    fedavg_path = out_dir / "fedavg" / WEIGHTS_FILE
    with tracking.start_run("federate", run_name="federate") as parent:
        parent.log_params({**to_dict(params), "n_train": n_train,
                           **{f"runtime.{k}": v for k, v in here["stage"].items()}})
        if "one_shot" in params.methods:
            with _timed("one_shot"), tracking.start_run(
                    "federate", run_name="one_shot", nested=True,
                    tags={"fedct.method": "one_shot"}) as mlrun:
                merged = weighted_average([locals_[s][0].state_dict() for s in sites],
                                          [weights[s] for s in sites])
                model = locals_[sites[0]][0]
                model.load_state_dict(merged)
                card = _card(base_card, "one_shot", here, clients=list(sites), weights=weights)
                path = _save(model, out_dir / "one_shot", arch, card)
                mlrun.log_params({"weights": weights})
                tracking.log_fedct_model(mlrun, path.parent)
                # The local models were modified in place: reload them.
                locals_ = _local_models(models_dir, sites)
        for name, mu in (("fedavg", 0.0), ("fedprox", params.proximal_mu)):
            if name not in params.methods and not (name == "fedavg" and set(NEEDS_FEDAVG)
                                                   & set(params.methods)):
                continue
            with _timed(name), tracking.start_run("federate", run_name=name, nested=True,
                                                  tags={"fedct.method": name}) as mlrun:
                mlrun.log_params({"rounds": params.rounds, "local_steps": params.local_steps,
                                  "proximal_mu": mu, "min_clients": params.min_clients,
                                  "patience": params.patience})
                path, history = _multi_round(
                    name, mu, params, train, cohort_dir, sites, out_dir / name,
                    checkpoint_dir, mlrun,
                    site_weights_=weights if params.weighting == "equal" else None)
                _finish_card(path, base_card, name, here, clients=list(sites),
                             rounds=params.rounds,
                             local_steps=params.local_steps, proximal_mu=mu)
                tracking.log_fedct_model(mlrun, path.parent)
                mlrun.log_artifact(path.parent / "history.csv")
                summary = rounds_summary(history, params.patience)
                kept = summary["kept_round"]
                metrics[f"{name}_val_dice"] = (history[kept - 1].get("val_dice_mean")
                                               if kept else None)
                metrics.update({f"{name}_{k}": v for k, v in summary.items()})
                metrics[f"{name}_failed_clients"] = sum(len(r.get("failed", []))
                                                        for r in history)
        if "uw_merge" in params.methods:
            with _timed("uw_merge"), tracking.start_run(
                    "federate", run_name="uw_merge", nested=True,
                    tags={"fedct.method": "uw_merge"}) as mlrun:
                models = {s: m.to(device) for s, (m, _) in locals_.items()}
                for target, imgs in targets.items():
                    scores = target_uncertainty(models, imgs, mc_samples=params.mc_samples,
                                                mc_batch=params.mc_batch, seed=params.seed,
                                                signal=params.uw_signal,
                                                aggregation=params.uw_aggregation, amp=amp)
                    try:
                        w = scores_to_weights(
                            scores, params.uw_rule, params.uw_temperature,
                            case_counts=n_train if params.weighting == "cases" else None)
                    except ValueError as exc:
                        raise FedctError(f"federate uw_merge, target {target}: {exc}") from exc
                    merged = merge_for_target({s: m.state_dict() for s, m in models.items()},
                                              w)
                    model = load_model(Path(models_dir) / sites[0] / WEIGHTS_FILE)[0]
                    model.load_state_dict({k: v.cpu() for k, v in merged.items()})
                    card = _card(base_card, "uw_merge", here, target_site=target,
                                 clients=list(sites), weights=w, scores=scores,
                                 signal=params.uw_signal)
                    path = _save(model, out_dir / "uw_merge" / target, arch, card)
                    tracking.log_fedct_model(mlrun, path.parent, artifact_path=f"model-{target}")
                    mlrun.log_metrics({f"{target}.weight.{s}": v for s, v in w.items()})
                    mlrun.log_metrics({f"{target}.score.{s}": v for s, v in scores.items()})
                    metrics[f"uw_merge_weights_{target}"] = w
                    print(f"federate uw_merge: target {target}, weights "
                          + ", ".join(f"{s} {v:.2f}" for s, v in w.items()), flush=True)
        if "tent" in params.methods:
            with _timed("tent"), tracking.start_run(
                    "federate", run_name="tent", nested=True,
                    tags={"fedct.method": "tent"}) as mlrun:
                for target, imgs in targets.items():
                    teacher, start = load_model(fedavg_path)
                    adapted = tent_adapt(teacher.to(device), imgs, steps=params.tent_steps,
                                         lr=params.tent_lr, seed=params.seed, amp=amp)
                    card = _card(base_card, "tent", {**start.get("runtime", {}), **here},
                                 target_site=target, start="fedavg",
                                 steps=params.tent_steps, lr=params.tent_lr)
                    path = _save(adapted, out_dir / "tent" / target, arch, card)
                    tracking.log_fedct_model(mlrun, path.parent, artifact_path=f"model-{target}")
                mlrun.log_params({"tent_steps": params.tent_steps, "tent_lr": params.tent_lr})
        if "self_train" in params.methods:
            with _timed("self_train"), tracking.start_run(
                    "federate", run_name="self_train", nested=True,
                    tags={"fedct.method": "self_train"}) as mlrun:
                teacher, _ = load_model(fedavg_path)
                derived, kept = _self_train_cohort(cohort, cohort_dir, teacher, targets,
                                                   params, sites, out_dir / "self_train", amp)
                clients = sites + tuple(sorted(targets))
                # Its own schedule over its rounds, whatever train.schedule_steps says.
                fine_tune = dataclasses.replace(train, learning_rate=params.self_train_lr,
                                                schedule_steps=0)
                path, history = _multi_round(
                    "self_train", 0.0, params, fine_tune, derived, clients,
                    out_dir / "self_train", checkpoint_dir, mlrun, init_model=fedavg_path,
                    rounds=params.self_train_rounds, min_clients=params.min_clients,
                    patience=0,  # a fixed number of fine-tuning rounds
                    # federate.weighting holds here too, pseudo-labelled sites included.
                    site_weights_=(site_weights({s: 1.0 for s in clients})
                                   if params.weighting == "equal" else None))
                _finish_card(path, base_card, "self_train", here, start="fedavg",
                             clients=list(clients),
                             pseudo_labelled=sorted(targets), kept_fraction=kept,
                             rounds=params.self_train_rounds)
                shutil.rmtree(derived, ignore_errors=True)  # images stay in the cohort
                tracking.log_fedct_model(mlrun, path.parent)
                mlrun.log_metrics({f"kept_fraction.{s}": v for s, v in kept.items()})
                metrics["self_train_kept_fraction"] = kept
        if "uw_select" in params.methods:
            with _timed("uw_select"), tracking.start_run(
                    "federate", run_name="uw_select", nested=True,
                    tags={"fedct.method": "uw_select"}) as mlrun:
                mlrun.log_params({"select_from": list(params.select_from),
                                  "signal": params.uw_signal})
                for target, imgs in targets.items():
                    paths = {m: (out_dir / m / target / WEIGHTS_FILE
                                 if (out_dir / m / target / WEIGHTS_FILE).is_file()
                                 else out_dir / m / WEIGHTS_FILE) for m in params.select_from}
                    models = {m: load_model(p)[0].to(device) for m, p in paths.items()}
                    scores = target_uncertainty(models, imgs, mc_samples=params.mc_samples,
                                                mc_batch=params.mc_batch, seed=params.seed,
                                                signal=params.uw_signal,
                                                aggregation=params.uw_aggregation, amp=amp)
                    try:
                        chosen = select_by_uncertainty(scores)
                    except ValueError as exc:
                        raise FedctError(f"federate uw_select, target {target}: {exc}") from exc
                    model, src_card = load_model(paths[chosen])
                    # The weights are the chosen model's; the choice (MC dropout) is here.
                    card = _card(base_card, "uw_select",
                                 {**src_card.get("runtime", {}), **here}, target_site=target,
                                 chosen=chosen, scores=scores, signal=params.uw_signal,
                                 chosen_card={k: src_card.get(k) for k in
                                              ("method", "target_site", "clients")})
                    path = _save(model, out_dir / "uw_select" / target, arch, card)
                    tracking.log_fedct_model(mlrun, path.parent, artifact_path=f"model-{target}")
                    mlrun.log_metrics({f"{target}.score.{m}": v for m, v in scores.items()})
                    mlrun.set_tags({f"fedct.chosen.{target}": chosen})
                    metrics[f"uw_select_{target}"] = {"chosen": chosen, "scores": scores}
                    print(f"federate uw_select: target {target}, {chosen} (scores "
                          + ", ".join(f"{m} {v:.4f}" for m, v in scores.items()) + ")",
                          flush=True)
        if "fedavg" not in params.methods and fedavg_path.exists():
            shutil.rmtree(fedavg_path.parent)  # only a teacher here, not a candidate
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
        parent.log_artifact(out_dir / "metrics.json")
    return metrics


def _finish_card(path: Path, base_card: dict, method: str, where: dict, **extra) -> None:
    """Give a model written by the Flower server the card of a federated candidate (its
    ``runtime``: the clients' from the server's card, and ``where``, the stage's)."""
    model, card = load_model(path)
    full = _card(base_card, method, {**card.get("runtime", {}), **where}, **extra)
    full.update({k: card[k] for k in ("fingerprint",) if k in card})
    save_model(model, path, card["arch"], full)
