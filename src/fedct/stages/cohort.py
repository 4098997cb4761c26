"""Cohort: choose one usable series per study, split per site by patient, prepare volumes.

Inputs: the catalogue's ``series.parquet``, its ``series_files.parquet`` (the files of
each series in slice order, relative to the archive; in the catalogue's paths folder,
which stays at the site: neither DVC nor git carries it), the DICOM archive, and the label
folder (NIfTI named by SeriesInstanceUID; the UID is pseudonymised with the catalogue's
key before it is compared, so no UID reaches an output). Outputs: ``cohort.csv`` (one
row per chosen series: keys, site, split, role, labelled) and ``cases/<series_key>.npz``
(network-ready arrays, see fedct.data.preprocess), and ``labels.json``, the label set read
from the label folder's labels file (label value -> structure name), which every later
stage reads instead of knowing the structures itself.

Selection rule, per study: the usable series with the most slices, then the thinnest
slices, then the lowest SeriesNumber, then the smallest series key (deterministic).
Split rule, per site: patients shuffled with a generator seeded by (seed, site); then
``test_fraction`` of them (at least one) to test, ``val_fraction`` (at least one when a
site has three or more patients) to val (checkpoint selection), ``calib_fraction`` (at
least one when a site has four or more) to calib (the failure definition and the flag
threshold of the uncertainty stage, which nothing else sees; at least ``min_calib`` when
the site can spare them), the rest to train. Held-out sites never train a model: with
``adapt_fraction`` 0 every patient is in test; else that fraction (at least one, never
all) is in ``adapt``, images the label-free methods adapt on, prepared without their
labels, and the rest in test, the only cases any model is scored on. Unlabelled sites keep
their split but carry ``labelled = False``; only label-free methods may use them.
Patients at several sites (``cohort.shared_patients``): with ``one_site`` a patient key
found at several sites (the same PatientID at two hospitals, as with a national patient
number) is one person, kept at one of them only (a held-out site first, then a labelled
training site, then an unlabelled one, each in name order), and its series at the others
are left out (counted in ``metrics.json``), so that no patient trains a model at one site
and is tested at another, or is split two ways. Where that would take more than
``MAX_SHARED_LOSS`` of a site's patients, the IDs are more likely issued per hospital and
repeat by chance: the stage stops and names the setting. With ``per_site`` every site
splits its own patients, whatever other sites hold.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from fedct.catalogue import PATHS_DIRNAME, SERIES_FILES_FILE
from fedct.catalogue.pseudonym import KEY_ENV, load_key, pseudonym
from fedct.config import CatalogueParams, CohortParams, to_dict
from fedct.data.cases import ADAPT, case_path, save_case
from fedct.data.labels import read_labels, write_labels
from fedct.data.preprocess import PrepSpec, grid_mismatch, prepare_volume
from fedct.dicom.files import exact_path
from fedct.dicom.volume import read_volume
from fedct.errors import FedctError, Rejected

# cohort.shared_patients one_site: more of a site's patients than this found elsewhere
# means IDs that repeat across hospitals, not shared patients (the stage stops).
MAX_SHARED_LOSS = 0.5


def select_series(series: pd.DataFrame) -> pd.DataFrame:
    """One usable series per study (the documented rule above)."""
    usable = series[series["usable"]].copy()
    usable["_neg_slices"] = -usable["n_slices"]
    usable["_thick"] = usable["slice_thickness"].fillna(np.inf)
    usable["_num"] = usable["series_number"].fillna(np.inf)
    usable = usable.sort_values(["study_key", "_neg_slices", "_thick", "_num", "series_key"])
    return usable.drop_duplicates("study_key").drop(columns=["_neg_slices", "_thick", "_num"])


def one_site_per_patient(chosen: pd.DataFrame, holdout_sites: Iterable[str],
                         unlabelled_sites: Iterable[str] = ()
                         ) -> tuple[pd.DataFrame, int, int]:
    """``chosen`` with each patient kept at one site (``one_site``, module docstring); also
    the number of series left out and of patients found at several sites."""
    holdout, unlabelled = set(holdout_sites), set(unlabelled_sites)
    sites = chosen.groupby("patient_key")["site"].agg(lambda v: sorted(set(map(str, v))))
    several = sites[sites.map(len) > 1]
    if several.empty:
        return chosen, 0, 0
    home = several.map(lambda v: min(v, key=lambda s: (s not in holdout, s in unlabelled, s)))
    elsewhere = (chosen["patient_key"].isin(home.index)
                 & (chosen["site"].astype(str) != chosen["patient_key"].map(home)))
    return chosen[~elsewhere], int(elsewhere.sum()), len(several)


def shared_patient_losses(before: pd.DataFrame, after: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """Site -> (patients left out, patients before) for sites that lost any."""
    n0 = before.groupby("site")["patient_key"].nunique()
    n1 = after.groupby("site")["patient_key"].nunique().reindex(n0.index, fill_value=0)
    return {str(s): (int(n0[s] - n1[s]), int(n0[s])) for s in n0.index if n1[s] < n0[s]}


def _site_rng(seed: int, site: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{site}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def split_sizes(n: int, params: CohortParams) -> dict[str, int]:
    """Patients of a training site with ``n`` patients in each split (the rule above)."""
    n_test = max(1, int(round(params.test_fraction * n))) if n >= 2 else 0
    n_val = int(round(params.val_fraction * n))
    if n >= 3:
        n_val = max(1, n_val)
    n_val = min(n_val, n - n_test - 1) if n - n_test > 1 else 0
    n_calib = int(round(params.calib_fraction * n))
    if n >= 4 and params.calib_fraction > 0:
        n_calib = max(1, n_calib)
    n_calib = max(n_calib, params.min_calib)
    n_calib = min(n_calib, max(0, n - n_test - n_val - 1))
    return {"test": n_test, "val": n_val, "calib": n_calib,
            "train": n - n_test - n_val - n_calib}


def adapt_size(n: int, fraction: float) -> int:
    """Patients of a held-out site with ``n`` patients in ``adapt`` (the rule above)."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, int(round(fraction * n))))


def split_patients(chosen: pd.DataFrame, params: CohortParams) -> pd.DataFrame:
    """Add ``split`` (train/val/calib/test), ``role`` (train/holdout) and ``labelled``.

    The split is by patient: all series of one patient land in the same split.
    """
    out = []
    for site, group in chosen.groupby("site", sort=True):
        patients = np.array(sorted(group["patient_key"].unique()))
        patients = patients[_site_rng(params.seed, str(site)).permutation(len(patients))]
        n = len(patients)
        holdout = site in params.holdout_sites
        if holdout:
            n_adapt = adapt_size(n, params.adapt_fraction)
            split = {p: "adapt" if i < n_adapt else "test" for i, p in enumerate(patients)}
        else:
            size = split_sizes(n, params)
            bounds = np.cumsum([size["test"], size["val"], size["calib"]])
            names = np.array(["test", "val", "calib", "train"])
            split = {p: str(names[np.searchsorted(bounds, i, side="right")])
                     for i, p in enumerate(patients)}
        g = group.copy()
        g["split"] = g["patient_key"].map(split)
        g["role"] = "holdout" if holdout else "train"
        g["labelled"] = site not in params.unlabelled_sites
        out.append(g)
    if not out:
        return chosen.assign(split=[], role=[], labelled=[])
    return pd.concat(out, ignore_index=True)


# Columns of a cohort row that belong to its series (a study's other series replaces them).
SERIES_OWN = ("series_key", "vendor", "model", "kernel", "slice_thickness", "thickness_class",
              "n_slices")


def other_series(series: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
    """The usable series of ``chosen``'s studies that were not chosen, in the selection
    rule's order: the stand-ins of a chosen series that cannot be prepared."""
    rest = series[series["study_key"].isin(chosen["study_key"])
                  & ~series["series_key"].isin(chosen["series_key"])]
    out = []
    while not (best := select_series(rest)).empty:
        out.append(best)
        rest = rest[~rest["series_key"].isin(best["series_key"])]
    cols = ["study_key", *SERIES_OWN]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def _read_table(path: Path, what: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A table of the catalogue; a clear error naming it when it cannot be read."""
    try:
        return pd.read_parquet(path, columns=columns)
    except (OSError, ValueError) as exc:  # pyarrow's errors subclass these
        raise FedctError(f"{path}: cannot read the catalogue's {what} ({exc}); "
                         "rerun `fedct catalogue`") from exc


def series_files(paths_dir: Path, keys: Iterable[str]) -> dict[str, list[str]]:
    """Relative paths of each series' files, ordered along the slice normal.

    Read from the catalogue's ``series_files.parquet`` in ``paths_dir`` (duplicates and
    rejects already left out), so the cohort never walks the archive again.
    """
    path = Path(paths_dir) / SERIES_FILES_FILE
    if not path.exists():
        raise FedctError(
            f"{path}: missing. The catalogue's file lists hold archive paths, so they stay "
            "where the archive was catalogued (neither DVC nor git carries them); rerun "
            "`fedct catalogue` here (`dvc repro` does) or pass its --paths-dir")
    wanted = set(keys)
    files = _read_table(path, "series files", ["series_key", "slice", "relpath",
                                               "relpath_bytes"])
    files = files[files["series_key"].isin(wanted)].sort_values(["series_key", "slice"])
    out = {k: [exact_path(r, b) for r, b in zip(g["relpath"], g["relpath_bytes"], strict=True)]
           for k, g in files.groupby("series_key")}
    missing = wanted - set(out)
    if missing:
        raise FedctError(f"{path}: no files for {len(missing)} series of the catalogue "
                         f"(e.g. {sorted(missing)[0]}); rerun `fedct catalogue`")
    return out


def label_index(labels_dir: Path | None, secret: bytes) -> dict[str, Path]:
    """series_key -> label file, pseudonymising the UID in each label file name."""
    if labels_dir is None or not labels_dir.is_dir():
        return {}
    out = {}
    for f in sorted(labels_dir.glob("*.nii*")):
        uid = f.name.split(".nii")[0]
        out[pseudonym(secret, "series", uid)] = f
    return out


def read_label(path: Path, image: sitk.Image) -> sitk.Image:
    """The label map of ``image``; a clear error when it is unreadable or off its grid."""
    try:
        label = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise Rejected(path, "cannot read the label map") from exc
    why = grid_mismatch(image, label)
    if why:
        raise Rejected(path, f"the label map is not on its series' voxel grid: {why}; "
                             "resample it onto the DICOM series' grid")
    return label


def run(params: CohortParams, catalogue_params: CatalogueParams, catalogue_dir: Path,
        archive: Path, labels_dir: Path | None, out_dir: Path,
        paths_dir: Path | None = None) -> pd.DataFrame:
    """Choose, split and prepare the cohort; log to MLflow.

    ``paths_dir``: the catalogue's paths folder [default: CATALOGUE_DIR/paths, as the
    catalogue's own default].
    """
    from fedct import tracking

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series_path = Path(catalogue_dir) / "series.parquet"
    series = _read_table(series_path, "series")
    chosen = select_series(series)
    unknown = set(params.holdout_sites) | set(params.unlabelled_sites)
    unknown -= set(series["site"].astype(str))
    if unknown:
        raise FedctError(f"cohort: sites {sorted(unknown)} are not in {series_path}")
    n_dropped = n_shared = 0
    if params.shared_patients == "one_site":
        kept, n_dropped, n_shared = one_site_per_patient(chosen, params.holdout_sites,
                                                         params.unlabelled_sites)
        losses = shared_patient_losses(chosen, kept)
        worst = {s: (k, n) for s, (k, n) in losses.items() if k > MAX_SHARED_LOSS * n}
        if worst:
            raise FedctError(
                f"{series_path}: {n_shared} patient keys appear at several sites, and keeping "
                f"each at one site would take " + ", ".join(
                    f"{k} of {n} patients from site {s}" for s, (k, n) in sorted(worst.items()))
                + ": PatientIDs that repeat across hospitals are likely issued per hospital; "
                "then set cohort.shared_patients: per_site")
        if n_shared:
            print(f"cohort: {n_shared} patients have series at several sites; each is kept "
                  f"at one site only ({n_dropped} series left out)", flush=True)
        chosen = kept
    cohort = split_patients(chosen, params)
    key = load_key(catalogue_params)
    if "key_id" in series and (series["key_id"].astype(str) != key.key_id).any():
        raise FedctError(f"{series_path}: catalogued with pseudonym key "
                         f"{series['key_id'].iloc[0]}, but this run's key is {key.key_id}; no "
                         "label would match a series. Use the catalogue's key "
                         f"({KEY_ENV} or catalogue.key_file) or rerun `fedct catalogue`")
    labels = label_index(Path(labels_dir) if labels_dir else None, key.secret)
    orphans = len(set(labels) - set(series["series_key"]))
    if orphans:
        print(f"cohort: {orphans} of {len(labels)} label files in {labels_dir} match no "
              "catalogued series; they are not used", flush=True)
    label_set = read_labels(Path(labels_dir)) if labels_dir else None
    # A series that cannot be prepared is rejected; its study's next usable series (in
    # the selection rule's order) takes its place.
    others = other_series(series, cohort)
    paths_dir = Path(paths_dir) if paths_dir is not None else Path(catalogue_dir) / PATHS_DIRNAME
    files = series_files(paths_dir, [*cohort["series_key"], *others["series_key"]])
    stand_ins = {k: g.to_dict("records") for k, g in others.groupby("study_key")}
    spec = PrepSpec(params.spacing_mm, params.roi_size, params.hu_min, params.hu_max)
    (out_dir / "spec.json").write_text(json.dumps(
        {"spacing_mm": list(spec.spacing_mm), "roi_size": list(spec.roi_size),
         "hu_min": spec.hu_min, "hu_max": spec.hu_max}, indent=1))
    if label_set is not None:
        write_labels(out_dir, label_set)
    with tracking.start_run("cohort") as mlrun:
        mlrun.log_params(to_dict(params))
        prepared, rejects = [], []
        for row in tqdm(cohort.to_dict("records"), desc="cohort: prepare"):
            for cand in [row, *stand_ins.get(row["study_key"], [])]:
                # An adapt case is for label-free use only: its label is never prepared.
                lab_path = (labels.get(cand["series_key"])
                            if row["labelled"] and row["split"] != ADAPT else None)
                try:
                    image = read_volume(Path(archive), files[cand["series_key"]])
                    label = read_label(lab_path, image) if lab_path is not None else None
                    case = prepare_volume(image, label, spec,
                                          label_set.n_classes if label_set else None)
                except Rejected as exc:  # the reason holds no path: it is written out
                    rejects.append({"series_key": cand["series_key"], "site": row["site"],
                                    "reason": exc.reason})
                    continue
                save_case(case_path(out_dir, cand["series_key"]), case)
                prepared.append({**row, **{c: cand[c] for c in SERIES_OWN},
                                 "has_label": label is not None})
                break
        cohort = pd.DataFrame(prepared, columns=[*cohort.columns, "has_label"])
        rejected = pd.DataFrame(rejects, columns=["series_key", "site", "reason"])
        rejected.to_csv(out_dir / "rejects.csv", index=False)
        if len(rejected):
            print(f"cohort: {len(rejected)} series could not be prepared and are left out "
                  f"(reasons in {out_dir / 'rejects.csv'})", flush=True)
        has_label = cohort["has_label"].astype(bool)
        unmatched = int((cohort["labelled"].astype(bool) & ~has_label
                         & (cohort["split"] != ADAPT)).sum())
        if unmatched:
            print(f"cohort: {unmatched} series of labelled sites have no label file in "
                  f"{labels_dir}; they are kept as unlabelled (has_label false)", flush=True)
        cols = ["series_key", "study_key", "patient_key", "site", "vendor", "model", "kernel",
                "slice_thickness", "thickness_class", "n_slices", "split", "role", "labelled",
                "has_label"]
        cohort = cohort[cols].sort_values(["site", "split", "series_key"]).reset_index(drop=True)
        cohort.to_csv(out_dir / "cohort.csv", index=False)
        counts = cohort.groupby(["site", "split"]).size().unstack(fill_value=0)
        counts.to_csv(out_dir / "split_counts.csv")
        summary = {
            "n_series": len(cohort),
            "n_patients": int(cohort["patient_key"].nunique()),
            "n_train": int((cohort["split"] == "train").sum()),
            "n_val": int((cohort["split"] == "val").sum()),
            "n_calib": int((cohort["split"] == "calib").sum()),
            "n_test": int((cohort["split"] == "test").sum()),
            **({"n_adapt": int((cohort["split"] == ADAPT).sum())} if params.adapt_fraction
               else {}),
            "n_labelled": int(cohort["has_label"].sum()),
            "n_labelled_site_without_label": unmatched,
            "n_orphan_label_files": orphans,
            "n_patients_at_several_sites": n_shared,
            "n_series_left_out_other_site": n_dropped,
            "n_series_rejected": len(rejected),
        }
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
        mlrun.log_metrics(summary)
        mlrun.log_artifact(out_dir / "split_counts.csv")
        mlrun.log_dataset(cohort, name="cohort", source=str(out_dir / "cohort.csv"),
                          context="cohort")
    return cohort
