"""Ablation: which injected physical factor, alone, lowers held-out Dice (issue 9, item 6).

One Bayesian U-Net is trained (``fedct.training.loop.train_model``) on REFERENCE patients,
all scanned under one routine acquisition (training site A's protocol, the Canon FC13
reference condition, no injected factor). New test patients of the same seed stream are
then scanned once under the reference acquisition and once per factor of
``fedct.synth.factors`` with exactly that factor injected (same patient, scan plan and
noise seed), plus a ``control`` (a rescan: only the noise realisation differs). Every
scan goes through the pipeline's preprocessing (``fedct.data.preprocess.prepare_case``:
anti-aliased resampling to the model grid, HU window) in memory, with the integer HU
and rounded geometry the archive's DICOM would carry.

Per factor: per-case mean Dice over structures (deterministic pass), the drop
(reference minus factor) as a paired difference over the same patients with a 95 %
bootstrap interval over patients (``fedct.analysis.stats.paired_difference``), and the
shift of the label's centroid on the model grid (voxels). A factor *bites* when
``drop >= 0.05`` and ``drop_lo > 0``. For a factor that moves the anatomy (centroid shift
>= ``--position-vox``), the reference cases translated by the same per-case shift give a
position-only drop; ``bites_beyond_position`` asks that the factor's drop exceed it by
>= 0.05 with an interval above 0, so that no factor counts through position alone.

Run it on a development seed (``synth.dev_seeds``), never on the report seed:

    python benchmarks/ablation.py --profile demo --workers 2 --out ablation.csv

``--profile local`` trains the model as the pipeline trains a local model (one training
site's split of the demo archive, ``params.yaml``'s ``train`` settings); ``demo`` is the
earlier profile (6 patients, 480 steps); ``study`` trains as `make study` trains a local
model (profiles/study.yaml over params.yaml: 6 training patients of the study archive).

Outputs: ``--out`` (one row per factor), ``<out>_cases.csv`` (one row per factor and
test patient) and ``<out>_run.json`` (settings, timings, the model's validation curve).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from fedct.analysis.stats import paired_difference
from fedct.config import TrainParams, load_params
from fedct.data.labels import parse_labels
from fedct.data.preprocess import PrepSpec, prepare_case
from fedct.overlay import load_overlay
from fedct.stages.cohort import split_sizes
from fedct.synth.anatomy import STRUCTURES
from fedct.synth.axial import PROFILES as ARCHIVE_PROFILES
from fedct.synth.factors import (
    BY_NAME,
    CONTROL,
    FACTORS,
    REFERENCE_CONDITION,
    REFERENCE_SITE,
    patient_seed,
    variant,
)

BITE = 0.05  # the Done-when threshold on the drop in mean Dice
COLUMNS = ["factor", "n_cases", "dice_ref", "dice_factor", "drop", "drop_lo", "drop_hi",
           "centroid_shift_vox", "bites"]
TRAIN, VAL, TEST = 0, 1, 2


@dataclass(frozen=True)
class Profile:
    """Sizes of one ablation run: synth profile, patients, model grid, train overrides.

    ``n_train`` / ``n_val`` None: as many as the cohort's split (``params.yaml`` cohort
    fractions) gives one training site of the ``synth`` archive profile, so the model is
    trained on the data a local model of the pipeline gets.
    """

    synth: str
    n_train: int | None
    n_val: int | None
    n_test: int
    spec: PrepSpec | None  # None: the cohort's grid from params.yaml
    train: dict


PROFILES = {
    # Seconds on 2 cores: a 24-pixel phantom on a 14 mm grid, a 2-level network, 6 steps.
    "tiny": Profile("tiny", 3, 1, 4, PrepSpec((14.0, 14.0, 14.0), (32, 24, 16), -250.0, 1000.0),
                    dict(steps=6, val_checks=2, patience=0, channels=(4, 8), strides=(2,),
                         num_res_units=0, patch_size=(32, 24, 16), max_shift=(2, 2, 2))),
    # The demo archive's phantom on the pipeline's grid; the training settings chosen on
    # development seeds (channels 8-64, peak lr 0.01, 480 steps).
    "demo": Profile("demo", 6, 2, 12, None,
                    dict(steps=480, channels=(8, 16, 32, 64), learning_rate=0.01)),
    # A local model of the pipeline: one training site's split of the demo archive (8
    # patients: 4 train, 1 val) and params.yaml's train settings unchanged (train.steps).
    "local": Profile("demo", None, None, 12, None, {}),
    # A local model of `make study` (issue 23, part 6): one training site's split of the
    # study archive (16 patients: 6 train, 2 val) and the train settings of params.yaml
    # with profiles/study.yaml over it (1,200-step cap, validation-plateau stopping).
    "study": Profile("study", None, None, 16, None, {}),
}
# Profiles whose params are params.yaml with an overlay over it (``fedct.overlay.load_overlay``).
OVERLAYS = {"study": Path("profiles/study.yaml")}


def to_images(scan) -> tuple[sitk.Image, sitk.Image]:
    """An ``AxialScan`` as the cohort would read it: integer HU from the DICOM stored
    values (clipped at -1024), spacing and origin rounded as the headers carry them."""
    hu = np.rint(np.maximum(scan.image, -1024.0)).astype(np.float32)
    spacing = (round(scan.pixel, 6), round(scan.pixel, 6), float(scan.thickness))
    origin = (float(scan.xs[0]), float(scan.ys[0]), round(float(scan.slice_z[0]), 4))
    images = []
    for arr in (hu, scan.labels.astype(np.uint8)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        images.append(img)
    return images[0], images[1]


def volume_centre(image: sitk.Image) -> np.ndarray:
    """Physical centre (mm, LPS) of ``image``: where the model grid is centred."""
    centre = (np.array(image.GetSize()) - 1) / 2.0
    return np.array(image.TransformContinuousIndexToPhysicalPoint(centre.tolist()))


def _prepare(job: tuple) -> tuple[dict, np.ndarray]:
    """(factor name or None, patient seed, synth profile, spec) -> prepared case and the
    physical centre (mm) of the scanned volume."""
    name, seed, synth_profile, spec = job
    scan = variant(BY_NAME[name] if name else None, seed, synth_profile)
    image, label = to_images(scan)
    return prepare_case(image, label, spec), volume_centre(image)


def synthesize(jobs: list[tuple], workers: int) -> list[tuple[dict, np.ndarray]]:
    if workers > 1 and len(jobs) > 1:
        # Not fork: after training, the parent's OpenMP threads would deadlock forked
        # children (seen here: the factor scans hung with every process asleep).
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            return list(pool.map(_prepare, jobs))
    return [_prepare(j) for j in jobs]


def centroid(label: np.ndarray) -> np.ndarray:
    """Centroid (voxels, x y z) of the foreground of a (1, X, Y, Z) label map."""
    idx = np.argwhere(label[0] > 0)
    return idx.mean(axis=0) if len(idx) else np.full(3, np.nan)


def translate(case: dict, shift_vox: np.ndarray) -> dict:
    """``case`` moved by whole voxels; what enters is air (0 after the window) and
    background."""
    shift = np.rint(shift_vox).astype(int)
    out = {}
    for key, arr in case.items():
        moved = np.zeros_like(arr)
        src, dst = [slice(None)], [slice(None)]
        for n, s in zip(arr.shape[1:], shift, strict=True):
            src.append(slice(max(0, -s), n - max(0, s)))
            dst.append(slice(max(0, s), n - max(0, -s)))
        moved[tuple(dst)] = arr[tuple(src)]
        out[key] = moved
    return out


def case_dice(model, cases: list[dict], device, amp: bool, n_classes: int) -> np.ndarray:
    """Deterministic Dice per case, the mean over structures present in label or
    prediction, (n_cases,)."""
    from fedct.training.loop import evaluate_dice

    dice = evaluate_dice(model, cases, device, amp, n_classes)
    return np.array([np.nanmean(d) if np.isfinite(d).any() else np.nan for d in dice])


def _interval(frame: pd.DataFrame, a: str, b: str, n_boot: int, seed: int):
    return paired_difference(frame, a, b, cluster_cols=(), case_col="case", n_boot=n_boot,
                             seed=seed)


def summarise(cases: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per factor from one row per (factor, case).

    ``cases`` has ``factor, case, dice_ref, dice_factor, centroid_shift_vox`` and
    optionally ``dice_position`` (the reference moved as the factor moved it; NaN where
    not computed) and ``input_mad_hu``. Intervals resample patients.
    """
    rows = []
    for name, g in cases.groupby("factor", sort=False):
        g = g.dropna(subset=["dice_ref", "dice_factor"])
        drop = _interval(g, "dice_ref", "dice_factor", n_boot, seed)
        bites = bool(drop.lo > 0 and drop.estimate >= BITE)
        row = {"factor": name, "n_cases": len(g),
               "dice_ref": float(g["dice_ref"].mean()),
               "dice_factor": float(g["dice_factor"].mean()),
               "drop": drop.estimate, "drop_lo": drop.lo, "drop_hi": drop.hi,
               "centroid_shift_vox": float(g["centroid_shift_vox"].mean()), "bites": bites}
        if "grid_shift_vox" in g:
            row["grid_shift_vox"] = float(g["grid_shift_vox"].mean())
        pos = g["dice_position"] if "dice_position" in g else pd.Series(dtype=float)
        if pos.notna().all() and len(pos):
            only = _interval(g, "dice_ref", "dice_position", n_boot, seed)
            beyond = _interval(g, "dice_position", "dice_factor", n_boot, seed)
            row.update(drop_position_only=only.estimate, drop_beyond_position=beyond.estimate,
                       drop_beyond_position_lo=beyond.lo, drop_beyond_position_hi=beyond.hi)
            row["bites_beyond_position"] = bool(bites and beyond.lo > 0
                                                and beyond.estimate >= BITE)
        else:
            row.update(drop_position_only=np.nan, drop_beyond_position=np.nan,
                       drop_beyond_position_lo=np.nan, drop_beyond_position_hi=np.nan,
                       bites_beyond_position=bites)
        if "input_mad_hu" in g:
            row["input_mad_hu"] = float(g["input_mad_hu"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--seed", type=int, default=None,
                   help="synth seed (default: the first of synth.dev_seeds)")
    p.add_argument("--allow-report-seed", action="store_true",
                   help="permit synth.seed, the report seed (only once choices are frozen)")
    p.add_argument("--factors", default="all",
                   help=f"comma-separated subset of {[f.name for f in FACTORS]}")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-val", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--channels", help="e.g. 8,16,32,64")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--device", help="override train.device")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--position-vox", type=float, default=0.5,
                   help="mean centroid shift above which the position-only control runs")
    p.add_argument("--workers", type=int, default=1, help="processes for synthesis")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("ablation.csv"))
    return p.parse_args(argv)


def train_params(args: argparse.Namespace, base: TrainParams, prof: Profile) -> TrainParams:
    changes = dict(prof.train)
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.channels:
        changes["channels"] = tuple(int(c) for c in args.channels.split(","))
    if args.lr is not None:
        changes["learning_rate"] = args.lr
    if args.device:
        changes["device"] = args.device
    params = dataclasses.replace(base, **changes)
    if len(params.strides) != len(params.channels) - 1:
        params = dataclasses.replace(params, strides=(2,) * (len(params.channels) - 1))
    return params


def patients(prof: Profile, args: argparse.Namespace, cohort) -> tuple[int, int, int]:
    """Train, val and test patients: the options, else the profile, else (train, val)
    one training site's split of the profile's archive under ``cohort``'s fractions."""
    site = split_sizes(ARCHIVE_PROFILES[prof.synth].patients_per_site, cohort)
    n_train = args.n_train or prof.n_train or site["train"]
    n_val = args.n_val if args.n_val is not None else (
        prof.n_val if prof.n_val is not None else site["val"])
    return n_train, n_val, args.n_test or prof.n_test


def run(argv: list[str] | None = None) -> pd.DataFrame:
    """The whole ablation; returns the factor table (also written to ``--out``)."""
    import torch

    from fedct.devices import pick_device
    from fedct.training.loop import train_model

    args = parse_args(argv)
    t_start = time.perf_counter()
    params_all = (load_overlay(args.params.parent / OVERLAYS[args.profile], args.params)[0]
                  if args.profile in OVERLAYS else load_params(args.params))
    seed = args.seed if args.seed is not None else int(params_all.synth.dev_seeds[0])
    base_seeds = load_params(args.params).synth
    if (seed in (params_all.synth.seed, base_seeds.seed, *params_all.synth.report_seeds,
                 *base_seeds.report_seeds) and not args.allow_report_seed):
        raise SystemExit(f"ablation: seed {seed} is a report seed (synth.seed or report_seeds, "
                         f"of params.yaml or the overlay); use a development seed "
                         f"({list(params_all.synth.dev_seeds)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    prof = PROFILES[args.profile]
    cohort = params_all.cohort
    spec = prof.spec or PrepSpec(tuple(cohort.spacing_mm), tuple(cohort.roi_size),
                                 cohort.hu_min, cohort.hu_max)
    params = train_params(args, params_all.train, prof)
    names = [f.name for f in FACTORS] if args.factors == "all" else args.factors.split(",")
    unknown = [n for n in names if n not in BY_NAME or n == CONTROL.name]
    if unknown:
        raise SystemExit(f"ablation: unknown factors {unknown}; "
                         f"choose from {[f.name for f in FACTORS]}")
    names = [*names, CONTROL.name]
    n_train, n_val, n_test = patients(prof, args, cohort)
    labels = parse_labels({"0": "background", **{str(k): v for k, v in STRUCTURES.items()}},
                          "fedct.synth.anatomy.STRUCTURES")
    print(f"ablation: seed {seed}, profile {args.profile}, reference {REFERENCE_SITE}/"
          f"{REFERENCE_CONDITION}; {n_train} train, {n_val} val, {n_test} test patients; "
          f"grid {spec.roi_size} x {spec.spacing_mm} mm; factors {names}", flush=True)

    # 1. Reference patients (train + val) and the test patients' reference scans.
    t0 = time.perf_counter()
    ref_jobs = ([(None, patient_seed(seed, TRAIN, i), prof.synth, spec) for i in range(n_train)]
                + [(None, patient_seed(seed, VAL, i), prof.synth, spec) for i in range(n_val)]
                + [(None, patient_seed(seed, TEST, i), prof.synth, spec) for i in range(n_test)])
    ref = synthesize(ref_jobs, args.workers)
    train_cases = [c for c, _ in ref[:n_train]]
    val_cases = [c for c, _ in ref[n_train:n_train + n_val]]
    test_ref = [c for c, _ in ref[n_train + n_val:]]
    ref_centre = np.array([m for _, m in ref[n_train + n_val:]])
    t_ref = time.perf_counter() - t0
    print(f"reference scans: {len(ref)} in {t_ref:.0f} s", flush=True)

    # 2. The model, trained on the reference acquisition only.
    t0 = time.perf_counter()
    model, history = train_model(params, labels, train_cases, val_cases, None, "ablation")
    t_train = time.perf_counter() - t0
    device = pick_device(params.device)
    model = model.to(device)
    amp = params.amp and device.type == "cuda"
    dice_ref = case_dice(model, test_ref, device, amp, labels.n_classes)
    steps_run = int(history["step"].iloc[-1]) if len(history) else 0
    print(f"trained {steps_run} steps in {t_train:.0f} s ({t_train / max(1, steps_run):.2f} "
          f"s/step); reference test Dice {np.nanmean(dice_ref):.3f}", flush=True)

    # 3. One factor at a time on the same test patients.
    rows, wall, t_synth, t_eval = [], {}, t_ref, 0.0
    for name in names:
        t0 = time.perf_counter()
        jobs = [(name, patient_seed(seed, TEST, i), prof.synth, spec) for i in range(n_test)]
        done = synthesize(jobs, args.workers)
        cases = [c for c, _ in done]
        t1 = time.perf_counter()
        dice_f = case_dice(model, cases, device, amp, labels.n_classes)
        shifts = np.array([centroid(c["label"]) - centroid(r["label"])
                           for c, r in zip(cases, test_ref, strict=True)])
        norm = np.linalg.norm(shifts, axis=1)
        # The anatomy moves opposite to the scanned volume's centre on the model grid.
        grid = -(np.array([m for _, m in done]) - ref_centre) / np.array(spec.spacing_mm)
        grid_norm = np.linalg.norm(grid, axis=1)
        dice_pos = np.full(n_test, np.nan)
        move = None
        if np.nanmean(grid_norm) >= args.position_vox:
            move = grid
        elif np.nanmean(norm) >= args.position_vox:
            move = shifts
        if move is not None:
            moved = [translate(r, s) for r, s in zip(test_ref, move, strict=True)]
            dice_pos = case_dice(model, moved, device, amp, labels.n_classes)
        t_eval += time.perf_counter() - t1
        t_synth += t1 - t0
        for i, (c, r) in enumerate(zip(cases, test_ref, strict=True)):
            same_grid = grid_norm[i] < args.position_vox
            body = r["label"] > 0
            mad = (float(np.abs(c["image"] - r["image"])[body].mean())
                   * (spec.hu_max - spec.hu_min) if same_grid and body.any() else np.nan)
            rows.append(dict(factor=name, case=i, dice_ref=dice_ref[i], dice_factor=dice_f[i],
                             dice_position=dice_pos[i], centroid_shift_vox=norm[i],
                             grid_shift_vox=grid_norm[i], input_mad_hu=mad))
        wall[name] = time.perf_counter() - t0
        print(f"{name}: Dice {np.nanmean(dice_f):.3f} (reference {np.nanmean(dice_ref):.3f}), "
              f"centroid shift {np.nanmean(norm):.2f} vox, grid shift {np.nanmean(grid_norm):.2f}"
              f" vox, {time.perf_counter() - t0:.0f} s",
              flush=True)

    per_case = pd.DataFrame(rows)
    table = summarise(per_case, n_boot=args.n_boot, seed=0)
    table.insert(1, "site", [BY_NAME[n].site for n in table["factor"]])
    table.insert(2, "acts_on", [BY_NAME[n].acts_on for n in table["factor"]])
    table["wall_s"] = table["factor"].map(wall)
    table = table[COLUMNS + [c for c in table if c not in COLUMNS]]
    total = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.round(4).to_csv(out, index=False)
    per_case.round(4).to_csv(out.with_name(out.stem + "_cases.csv"), index=False)
    run_info = {
        "seed": seed, "profile": args.profile, "reference": [REFERENCE_SITE, REFERENCE_CONDITION],
        "n_train": n_train, "n_val": n_val, "n_test": n_test,
        "spec": dataclasses.asdict(spec), "train": {k: (list(v) if isinstance(v, tuple) else v)
                                                    for k, v in dataclasses.asdict(params).items()},
        "steps_run": steps_run, "device": str(device),
        "dice_ref_mean": float(np.nanmean(dice_ref)),
        "seconds": {"synth": round(t_synth, 1), "train": round(t_train, 1),
                    "eval": round(t_eval, 1), "total": round(total, 1)},
        "history": history.round(4).to_dict(orient="records"),
        "reasons": {n: BY_NAME[n].reason for n in names},
    }
    out.with_name(out.stem + "_run.json").write_text(json.dumps(run_info, indent=1,
                                                                default=str))
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table[COLUMNS + ["site", "grid_shift_vox", "drop_position_only",
                               "bites_beyond_position",
                               "input_mad_hu", "wall_s"]].round(3).to_string(index=False))
    n_bite = int(table.loc[table["factor"] != CONTROL.name, "bites_beyond_position"].sum())
    print(f"factors that bite beyond position: {n_bite} (Done-when needs >= 3)")
    print(f"wall time: synth {t_synth:.0f} s, train {t_train:.0f} s, eval {t_eval:.0f} s, "
          f"total {total:.0f} s")
    return table


if __name__ == "__main__":
    run(sys.argv[1:])
