"""How many steps, and which network, a local model needs to reach its in-domain target.

Trains one site's Bayesian U-Net (``fedct.training.loop.train_model``, the pipeline's own
loop) under several settings and reports, per setting: seconds per optimiser step on this
device, the step of the best validation loss, and the deterministic test Dice of the kept
weights on the same site (mean over structures and per structure). Run it on a
**development** cohort (``synth.dev_seeds``, ``cohort.dev_seeds``), never on the report
seeds: it is how the demo's ``train`` settings were chosen (docs/design-decisions.md).

    python benchmarks/convergence.py .dev/cohort --site A \\
        --setting base: --setting wide:channels=16,32,64,128 \\
        --setting long:steps=960 --out convergence.csv

A setting is ``name:key=value;key=value`` over ``train`` params (tuples comma-separated).
Every setting trains in the same process, one after the other, from the same seed; the
first setting is the baseline the others are compared with (``dice_gain``, ``time_ratio``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedct.config import TrainParams, load_params
from fedct.data.cases import case_path, cohort_labels, load_case, read_cohort, training_cases
from fedct.devices import pick_device
from fedct.training.loop import evaluate_dice, train_model


def parse_setting(text: str, base: TrainParams) -> tuple[str, TrainParams]:
    name, _, body = text.partition(":")
    changes: dict = {}
    for item in filter(None, body.split(";")):
        key, _, value = item.partition("=")
        current = getattr(base, key)
        if isinstance(current, tuple):
            changes[key] = tuple(type(current[0])(v) for v in value.split(","))
        elif isinstance(current, bool):
            changes[key] = value.lower() in ("1", "true", "yes")
        else:
            changes[key] = type(current)(value)
    return name, dataclasses.replace(base, **changes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cohort", type=Path)
    p.add_argument("--site", default="A")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--setting", action="append", default=[])
    p.add_argument("--device", default=None, help="override train.device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("convergence.csv"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_params(args.params).train
    if args.device:
        base = dataclasses.replace(base, device=args.device)
    labels = cohort_labels(args.cohort)
    cohort = read_cohort(args.cohort)
    cases = training_cases(cohort, args.site)
    split = dict(zip(cases["series_key"], cases["split"], strict=True))
    loaded = {k: load_case(case_path(args.cohort, k)) for k in cases["series_key"]}
    train = [c for k, c in loaded.items() if split[k] == "train"]
    val = [c for k, c in loaded.items() if split[k] == "val"]
    test_keys = cohort.loc[(cohort["site"] == args.site) & (cohort["split"] == "test"),
                           "series_key"]
    test = [load_case(case_path(args.cohort, k)) for k in test_keys]
    device = pick_device(base.device)
    print(f"site {args.site}: {len(train)} train, {len(val)} val, {len(test)} test cases; "
          f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else ''})",
          flush=True)
    rows = []
    for text in args.setting or ["base:"]:
        name, params = parse_setting(text, base)
        t0 = time.perf_counter()
        model, history = train_model(params, labels, train, val, None, name)
        seconds = time.perf_counter() - t0
        dice = evaluate_dice(model.to(device), test, device, params.amp, labels.n_classes)
        per = np.nanmean(dice, axis=0)
        best = history.loc[history["val_loss"].idxmin()]
        row = {"setting": name, "channels": "-".join(map(str, params.channels)),
               "dropout": params.dropout, "steps_cap": params.steps,
               "steps_run": int(history["step"].iloc[-1]), "best_step": int(best["step"]),
               "seconds": round(seconds, 1),
               "s_per_step": round(seconds / max(1, int(history["step"].iloc[-1])), 4),
               "val_dice_best": round(float(best["val_dice_mean"]), 4),
               "test_dice": round(float(np.nanmean(per)), 4),
               **{f"test_{n}": round(float(per[k - 1]), 3)
                  for k, n in labels.structures.items()}}
        rows.append(row)
        curve = " ".join(f"{int(r.step)}:{r.val_dice_mean:.2f}" for r in history.itertuples())
        print(f"{name}: test Dice {row['test_dice']:.3f}, {row['s_per_step']} s/step, "
              f"best step {row['best_step']}/{row['steps_run']}; val Dice {curve}", flush=True)
    table = pd.DataFrame(rows)
    table["dice_gain"] = (table["test_dice"] - table["test_dice"].iloc[0]).round(4)
    table["time_ratio"] = (table["seconds"] / table["seconds"].iloc[0]).round(2)
    table.to_csv(args.out, index=False)
    print(table.drop(columns=[c for c in table if c.startswith("test_") and c != "test_dice"])
          .to_string(index=False))


if __name__ == "__main__":
    main()
