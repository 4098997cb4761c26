"""Which federation schedule gets FedAvg closest to pooled training on the held-out sites.

Runs federated averaging in one process (no Flower: the pipeline's own
``fedct.training.local.local_update`` on each site's training split and
``fedct.federation.aggregate`` for the merge and the server step, exactly what the
``federate`` stage's Flower apps call) under several settings, and scores every result with
one deterministic whole-volume pass on the held-out sites' test cases, beside the
pipeline's pooled model and the best local model (``train``'s outputs) scored the same way
in the same run. Run it on a **development** cohort (``synth.dev_seeds``,
``cohort.dev_seeds``), never on the report seeds: it is how the ``federate`` schedule was
chosen (docs/design-decisions.md).

    python benchmarks/federation.py outputs/cohort outputs/models \\
        --setting base: --setting many:rounds=16,local_steps=25 \\
        --setting momentum:rounds=16,local_steps=25,server_momentum=0.9 --out fed.csv

A setting is ``name:key=value,...`` over ``rounds``, ``local_steps``, ``server_lr``,
``server_momentum``, ``mu`` (FedProx) and ``client_state`` (1: each client keeps its AdamW
moments between rounds, 0: they start afresh); unset keys come from ``params.yaml``
(``federate``). Every setting keeps the matched-epochs budget of the pipeline unless told
otherwise: each client trains ``rounds x local_steps`` steps.

``--centralised STEPS`` (repeatable) trains, in the same run, a model on all clients'
training cases together for ``STEPS`` optimiser steps with the training loop of ``train``
(the pooled model's loop; the pipeline's pooled model takes ``train.steps x sites``, matched
epochs): at ``STEPS = rounds x local_steps`` it has as many sequential updates as the
federated model, which separates what federation costs from what the number of updates
costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedct.analysis.heldout import heldout_test_cases
from fedct.config import load_params
from fedct.data.cases import case_path, cohort_labels, load_case, read_cohort, training_cases
from fedct.devices import pick_device
from fedct.federation.aggregate import case_weights, server_step, weighted_average
from fedct.model.factory import build_model
from fedct.model.io import load_model
from fedct.training.local import local_update, round_seed
from fedct.training.loop import evaluate, evaluate_dice, train_model

KEYS = {"rounds": int, "local_steps": int, "server_lr": float, "server_momentum": float,
        "mu": float, "client_state": int}


def parse_setting(text: str, base: dict) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    setting = dict(base)
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in KEYS:
            raise SystemExit(f"setting {name!r}: unknown key {key!r} (one of {sorted(KEYS)})")
        setting[key] = KEYS[key](value)
    return name, setting


def case_dice(model: torch.nn.Module, cases: list[dict], device: torch.device, amp: bool,
              n_classes: int) -> np.ndarray:
    """Mean Dice over structures of each case (deterministic pass)."""
    return np.nanmean(evaluate_dice(model.to(device), cases, device, amp, n_classes), axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cohort", type=Path)
    p.add_argument("models", type=Path, help="train's outputs: <site>/model.safetensors")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--setting", action="append", default=[])
    p.add_argument("--centralised", type=int, action="append", default=[],
                   metavar="STEPS", help="also train a centralised model for STEPS steps")
    p.add_argument("--out", type=Path, default=Path("federation.csv"))
    args = p.parse_args()
    params = load_params(args.params)
    tp, fp = params.train, params.federate
    labels = cohort_labels(args.cohort)
    cohort = read_cohort(args.cohort)
    device = pick_device(tp.device)
    amp = tp.amp
    sites = list(fp.sites)
    if any(n < 1 for n in args.centralised):
        raise SystemExit(f"--centralised: steps must be >= 1, got {args.centralised}")
    train, val = {}, []
    for s in sites:
        c = training_cases(cohort, s)
        train[s] = [load_case(case_path(args.cohort, k))
                    for k in c.loc[c["split"] == "train", "series_key"]]
        val += [load_case(case_path(args.cohort, k))
                for k in c.loc[c["split"] == "val", "series_key"]]
    held = heldout_test_cases(cohort)
    test = [load_case(case_path(args.cohort, k)) for k in held["series_key"]]
    held_sites = held["site"].to_numpy()
    print(f"clients {sites} ({sum(map(len, train.values()))} training cases), "
          f"{len(test)} held-out test cases at {sorted(set(held_sites))}", flush=True)

    rows = []

    def score(name: str, model: torch.nn.Module, extra: dict) -> None:
        d = case_dice(model, test, device, amp, labels.n_classes)
        row = {"model": name, "heldout_dice": round(float(d.mean()), 4),
               **{f"dice_{s}": round(float(d[held_sites == s].mean()), 4)
                  for s in sorted(set(held_sites))}, **extra}
        rows.append(row)
        print(row, flush=True)

    for s in ["pooled", *sites]:
        path = args.models / s / "model.safetensors"
        if path.is_file():
            score("pooled" if s == "pooled" else f"local_{s}", load_model(path)[0], {})
    for steps in args.centralised:
        t0 = time.perf_counter()
        model, hist = train_model(dataclasses.replace(tp, steps=steps), labels,
                                  [c for s in sites for c in train[s]], val, None,
                                  f"centralised-{steps}")
        score(f"centralised_{steps}", model, {"steps": steps,
                                              "seconds": round(time.perf_counter() - t0, 1),
                                              "val_dice_last": float(hist["val_dice_mean"]
                                                                     .dropna().iloc[-1])})
    base = {"rounds": fp.rounds, "local_steps": fp.local_steps, "server_lr": 1.0,
            "server_momentum": 0.0, "mu": 0.0, "client_state": 0}
    weights = case_weights({s: len(train[s]) for s in sites})
    for text in args.setting or ["base:"]:
        name, st = parse_setting(text, base)
        torch.manual_seed(tp.seed)
        model = build_model(tp, labels)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        velocity, curve = None, []
        stores = {s: ({} if st["client_state"] else None) for s in sites}
        total = st["rounds"] * st["local_steps"]
        t0 = time.perf_counter()
        for rnd in range(1, st["rounds"] + 1):
            updates = {}
            for s in sites:
                updates[s], _ = local_update(
                    build_model(tp, labels), train[s], tp, st["local_steps"],
                    round_seed(fp.seed, rnd, s), global_state=state, mu=st["mu"],
                    start_step=(rnd - 1) * st["local_steps"], total_steps=total,
                    opt_store=stores[s])
            merged = weighted_average(updates, weights)
            state, velocity = server_step(state, merged, velocity, st["server_lr"],
                                          st["server_momentum"])
            model.load_state_dict(state)
            loss, dice = evaluate(model.to(device), val, device, amp, labels.n_classes)
            curve.append(f"{rnd}:{float(np.nanmean(dice)):.2f}")
            print(f"{name}: round {rnd}/{st['rounds']}, val loss {loss:.3f}, val Dice "
                  f"{curve[-1].split(':')[1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        seconds = time.perf_counter() - t0
        print(f"{name}: val Dice by round {' '.join(curve)} ({seconds:.0f} s)", flush=True)
        score(name, model, {**st, "seconds": round(seconds, 1), "val_dice_last":
                            float(curve[-1].split(":")[1])})
    table = pd.DataFrame(rows)
    ref = table.loc[table["model"] == "pooled", "heldout_dice"]
    if len(ref):
        table["vs_pooled"] = (table["heldout_dice"] / float(ref.iloc[0])).round(3)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
