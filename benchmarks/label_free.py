"""What each label-free method gains at each held-out site, over its starting model and over
its ablation without uncertainty (issue 27), on a **development** run's outputs.

Calls the methods' own functions in one process (no Flower, no pipeline): class-wise
self-training (``fedct.federation.adaptation.cw_self_train``) and gated TENT with their
ablations, and the steered federation emulated in-process: each round every client runs
the pipeline's ``local_update`` from the global model on its training split, the target
scores each update on its adaptation images (``label_free.target_uncertainty``) and the
merge takes ``label_free.steering_weights`` (``steered``) or FedAvg's weights
(``steered_uniform``); the first round's updates are shared by both (same start, same
seeds), as in the pipeline. Every model is scored by one deterministic whole-volume pass
on the held-out sites' **test** cases (the adapt cases are the methods' only input), and
each difference is paired on the same cases with a 95 % case-bootstrap interval.

    python benchmarks/label_free.py outputs/cohort outputs/models \\
        --teacher outputs/federated/fedavg/model.safetensors --profile profiles/study.yaml \\
        --methods cw_self_train,cw_self_train_all --targets C,G --set cwst_keep=0.3,0.6 \\
        --out label_free_dev.csv

``--set`` overrides ``federate`` keys (comma-separated values for a list). Run it on
development seeds only: it is where the label-free settings are chosen.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedct.analysis.heldout import heldout_test_cases
from fedct.config import FederateParams, check, load_overlay, load_params
from fedct.data.cases import case_path, cohort_labels, load_case, read_cohort, training_cases
from fedct.devices import pick_device
from fedct.federation.adaptation import cw_self_train, random_gates, uncertainty_gates
from fedct.federation.aggregate import case_weights, weighted_average
from fedct.federation.label_free import steering_weights, target_uncertainty, tent_adapt
from fedct.federation.methods.base import target_images
from fedct.model.io import load_model
from fedct.training.local import local_update, round_seed
from fedct.training.loop import evaluate_dice

METHODS = ("teacher", "tent", "gated_tent", "gated_tent_random", "cw_self_train",
           "cw_self_train_all", "steered", "steered_uniform")


def paired(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0
           ) -> tuple[float, float, float]:
    """Mean of ``a - b`` over cases and its 95 % case-bootstrap interval."""
    d = a - b
    rng = np.random.default_rng(seed)
    boots = [np.nanmean(d[rng.integers(0, len(d), len(d))]) for _ in range(n_boot)]
    lo, hi = np.nanquantile(boots, [0.025, 0.975])
    return float(np.nanmean(d)), float(lo), float(hi)


def override(fp: FederateParams, sets: list[str]) -> FederateParams:
    changes = {}
    for item in sets:
        key, _, value = item.partition("=")
        current = getattr(fp, key)
        if isinstance(current, tuple):
            changes[key] = tuple(type(current[0])(v) for v in value.split(","))
        else:
            changes[key] = type(current)(value)
    return check(dataclasses.replace(fp, **changes), "federate")


def steered_runs(teacher: torch.nn.Module, train: dict[str, list[dict]], targets: list[str],
                 images: dict[str, list], fp: FederateParams, tp, device, log
                 ) -> dict[str, tuple[torch.nn.Module, list[dict]]]:
    """``steered-<target>`` for each target and ``steered_uniform``: ``steer_rounds``
    rounds from ``teacher``; the model and per-round records of each."""
    ft = dataclasses.replace(tp, learning_rate=fp.steer_lr, schedule_steps=0)
    base = case_weights({s: len(c) for s, c in train.items()})
    total = fp.steer_rounds * fp.local_steps
    start = {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()}
    runs = {name: {"state": start, "records": []}
            for name in ["uniform", *targets]}
    shared: dict[str, dict] = {}
    for r in range(1, fp.steer_rounds + 1):
        for name, run in runs.items():
            t0 = time.perf_counter()
            updates = {}
            for s, cases in train.items():
                if r == 1 and s in shared:
                    updates[s] = shared[s]
                    continue
                model = copy.deepcopy(teacher)
                updates[s], _ = local_update(model, cases, ft, fp.local_steps,
                                             round_seed(fp.seed, r, s),
                                             global_state=run["state"],
                                             start_step=(r - 1) * fp.local_steps,
                                             total_steps=total)
                if r == 1:
                    shared[s] = updates[s]
            record: dict = {"round": r}
            if name == "uniform":
                weights = base
            else:
                models = {}
                for s, st in updates.items():
                    m = copy.deepcopy(teacher)
                    m.load_state_dict(st)
                    models[s] = m.to(device)
                scores = target_uncertainty(models, images[name], mc_samples=fp.mc_samples,
                                            mc_batch=fp.mc_batch, seed=fp.seed,
                                            signal=fp.uw_signal, aggregation=fp.uw_aggregation,
                                            amp=tp.amp)
                weights = steering_weights({name: scores}, base, fp.steer_temperature)
                record["scores"] = scores
            record["weights"] = weights
            run["state"] = weighted_average([updates[s] for s in train],
                                            [weights[s] for s in train])
            run["records"].append(record)
            log(f"steered {name}: round {r}, {time.perf_counter() - t0:.0f} s, weights "
                + json.dumps({s: round(w, 3) for s, w in weights.items()})
                + (" scores " + json.dumps({s: round(v, 4) for s, v in
                                            record.get("scores", {}).items()})))
    out = {}
    for name, run in runs.items():
        model = copy.deepcopy(teacher)
        model.load_state_dict(run["state"])
        out["steered_uniform" if name == "uniform" else name] = (model, run["records"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cohort", type=Path)
    p.add_argument("models", type=Path, help="train's outputs (the clients' training data "
                   "are read from the cohort; only the architecture comes from --teacher)")
    p.add_argument("--teacher", type=Path, required=True,
                   help="the starting model (FedAvg's model.safetensors)")
    p.add_argument("--profile", type=Path, default=None, help="a params overlay")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--methods", default="teacher,gated_tent,gated_tent_random,cw_self_train,"
                   "cw_self_train_all")
    p.add_argument("--targets", default="", help="held-out sites (default: all)")
    p.add_argument("--set", action="append", default=[], help="federate key=value")
    p.add_argument("--out", type=Path, default=Path("label_free_dev.csv"))
    args = p.parse_args()
    params = (load_overlay(args.profile, args.params)[0] if args.profile
              else load_params(args.params))
    tp, fp = dataclasses.replace(params.train, device="cpu"), override(params.federate, args.set)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    cohort = read_cohort(args.cohort)
    labels = cohort_labels(args.cohort)
    device = pick_device("cpu")
    images = target_images(cohort, args.cohort)
    targets = [t for t in (args.targets.split(",") if args.targets else sorted(images)) if t]
    held = heldout_test_cases(cohort)
    test = {t: [load_case(case_path(args.cohort, k))
                for k in held.loc[held["site"] == t, "series_key"]] for t in targets}
    print(f"targets {targets}: adapt images {[len(images[t]) for t in targets]}, test cases "
          f"{[len(test[t]) for t in targets]}; federate {json.dumps(args.set)}", flush=True)

    def log(line: str) -> None:
        print(line, flush=True)

    def dice(model: torch.nn.Module, t: str) -> np.ndarray:
        return np.nanmean(evaluate_dice(model.to(device), test[t], device, tp.amp,
                                        labels.n_classes), axis=1)

    teacher, _ = load_model(args.teacher)
    base = {t: dice(teacher, t) for t in targets}
    rows, scored = [], {}

    def record(method: str, t: str, model: torch.nn.Module, seconds: float, **extra) -> None:
        d = dice(model, t)
        scored[(method, t)] = d
        diff, lo, hi = paired(d, base[t])
        row = {"method": method, "target": t, "dice": float(d.mean()),
               "teacher_dice": float(base[t].mean()), "minus_teacher": diff,
               "minus_teacher_lo": lo, "minus_teacher_hi": hi, "seconds": round(seconds),
               "settings": json.dumps(args.set), **extra}
        rows.append(row)
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in row.items()}))
        pd.DataFrame(rows).to_csv(args.out, index=False)

    for t in targets:
        for m in [m for m in methods if not m.startswith("steered")]:
            t0 = time.perf_counter()
            extra: dict = {}
            if m == "teacher":
                model = teacher
            elif m == "tent":
                model = tent_adapt(teacher, images[t], fp.tent_steps, fp.tent_lr, fp.seed,
                                   tp.amp)
            elif m.startswith("gated_tent"):
                gates = uncertainty_gates(teacher, images[t], fp.gate_keep, fp.mc_samples,
                                          fp.mc_batch, fp.seed, tp.amp)
                if m.endswith("random"):
                    gates = random_gates(gates, fp.seed)
                model = tent_adapt(teacher, images[t], fp.tent_steps, fp.tent_lr, fp.seed,
                                   tp.amp, gates=gates)
            else:
                keep = (1.0, 1.0) if m.endswith("_all") else fp.cwst_keep
                stats: list = []
                ft = dataclasses.replace(tp, learning_rate=fp.cwst_lr, schedule_steps=0)
                model = cw_self_train(teacher, images[t], ft, rounds=fp.cwst_rounds,
                                      steps=fp.cwst_steps, keep=keep, floor=fp.cwst_floor,
                                      mc_samples=fp.mc_samples, mc_batch=fp.mc_batch,
                                      seed=fp.seed, mu=fp.cwst_mu, site=t,
                                      on_round=lambda r, s, st=stats: st.append(s))
                extra = {"kept": json.dumps([round(s["kept"], 3) for s in stats]),
                         "loss": json.dumps([round(s["loss"], 3) for s in stats])}
            record(m, t, model, time.perf_counter() - t0, **extra)
    if any(m.startswith("steered") for m in methods):
        train = {}
        for s in fp.sites:
            c = training_cases(cohort, s)
            train[s] = [load_case(case_path(args.cohort, k))
                        for k in c.loc[c["split"] == "train", "series_key"]]
        t0 = time.perf_counter()
        runs = steered_runs(teacher, train, targets if "steered" in methods else [], images,
                            fp, tp, device, log)
        seconds = time.perf_counter() - t0
        for t in targets:
            record("steered_uniform", t, runs["steered_uniform"][0], seconds)
            if t in runs:
                record("steered", t, runs[t][0], seconds,
                       weights=json.dumps([r["weights"] for r in runs[t][1]]))
    # Each method against its ablation, paired on the same cases.
    for m, a in (("gated_tent", "gated_tent_random"), ("cw_self_train", "cw_self_train_all"),
                 ("steered", "steered_uniform")):
        for t in targets:
            if (m, t) in scored and (a, t) in scored:
                diff, lo, hi = paired(scored[(m, t)], scored[(a, t)])
                log(f"{m} - {a} at {t}: {diff:+.4f} [{lo:+.4f}, {hi:+.4f}]")
                for row in rows:
                    if row["method"] == m and row["target"] == t:
                        row.update(minus_ablation=diff, minus_ablation_lo=lo,
                                   minus_ablation_hi=hi)
    pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
