"""Write the synthetic multi-site archive: real DICOM files, NIfTI labels, ground truth.

Each patient's axial scan is simulated in memory by :mod:`fedct.synth.axial`; this module
plans who is scanned where, writes the series a PACS export holds (localizer, the axial
stack, distractors, dose report) and the truth tables.

Deterministic by construction: every random draw comes from a generator seeded by
(seed, site, patient, purpose); UIDs are derived from the seed with pydicom's
``generate_uid(entropy_srcs=...)``; dates come from the generator, never the clock.
The same seed and package versions give byte-identical files, so the synth stage's
hashes in ``dvc.lock`` hold wherever it is regenerated.

Layout::

    ARCHIVE/<site>/<study folder>/<series folder>/IM00001.dcm   DICOM, as a PACS export
    LABELS/<SeriesInstanceUID>.nii.gz                            ground-truth masks
    LABELS/labels.json                                          label value -> structure
    TRUTH/series.csv       one row per series; usable axial rows carry every factor:
                           kVp, mAs, kernel MTF50, noise sigma (stored, clinical, 7 mm),
                           contrast, metal, FOV, truncation, scan range, patient factors
    TRUTH/factors_by_site.csv, summary.json (shift_sites: site -> factors),
          conditions.csv, site_protocols.csv, files.csv, patients.csv, phi.csv, montage.png
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    XRayRadiationDoseSRStorage,
    generate_uid,
)
from tqdm import tqdm

from fedct.errors import FedctError
from fedct.synth import physics
from fedct.synth.anatomy import (
    N_CLASSES,
    STRUCTURE_CODES,
    STRUCTURES,
)
from fedct.synth.anatomy import sample_anatomy as _sample_anatomy
from fedct.synth.axial import PROFILES, Profile, draw_scan, simulate_axial
from fedct.synth.scanners import (
    BY_KEY,
    CONDITIONS,
    SHIFT_SITES,
    SITE_PROTOCOLS,
    SITES,
    Condition,
    allocate,
    site_mix,
)

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root: valid, and ours to derive from


# How each vendor stores pixels (as their scanners commonly do): signedness and intercept.
STORAGE = {
    "CANON": (1, 0.0),
    "GE": (1, -1024.0),
    "PHILIPS": (0, -1024.0),
    "SIEMENS": (0, -1024.0),
}
BODY_PART = ("PELVIS", "HIP", "LEG", "LOWER_LIMB")
_GIVEN = ("TARO", "HANAKO", "KENJI", "YUKI", "AKIRA", "EMI", "HIROSHI", "MEI", "SORA", "REN")
_FAMILY = ("SYNTHYAMADA", "SYNTHSATO", "SYNTHSUZUKI", "SYNTHTANAKA", "SYNTHITO")
FIRST_DATE = dt.date(2018, 3, 1)
LAST_DATE = dt.date(2025, 12, 31)


@dataclass(frozen=True)
class PatientPlan:
    site: str
    index: int  # within the site
    condition: str
    seed: int
    distractors: tuple[str, ...]
    compress: bool


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(seed), *map(str, parts)])


def _hex(seed: int, *parts: object) -> str:
    return hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).hexdigest()[:10]


def plan(profile: Profile, seed: int) -> list[PatientPlan]:
    """Who is scanned where, under which condition, with which extra series."""
    plans: list[PatientPlan] = []
    kinds = ("coronal", "thick", "sagittal", "localizer2")
    n_global = 0
    for s, site in enumerate(SITES):
        conds = allocate(site_mix(site), profile.patients_per_site)
        order = np.random.default_rng([seed, s, 99]).permutation(len(conds))
        for i, j in enumerate(order):
            # Round-robin distractors so that even the tiny profile has every kind.
            extra = tuple(k for m, k in enumerate(kinds) if (n_global + m) % 2 == 0)
            patient_seed = int(np.random.default_rng([seed, s, i]).integers(2**31))
            plans.append(PatientPlan(site, i, conds[j], patient_seed, extra,
                                     compress=(n_global % 7 == 3)))
            n_global += 1
    return plans


def _base_dataset(p: PatientPlan, cond: Condition, seed: int, rng_meta: dict) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = rng_meta["name"]
    ds.PatientID = rng_meta["patient_id"]
    ds.PatientBirthDate = rng_meta["birth_date"]
    ds.PatientSex = rng_meta["sex"]
    ds.AccessionNumber = rng_meta["accession"]
    ds.StudyInstanceUID = _uid(seed, p.site, p.index, "study")
    ds.FrameOfReferenceUID = _uid(seed, p.site, p.index, "for")
    ds.StudyDate = rng_meta["study_date"]
    ds.StudyTime = rng_meta["study_time"]
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.InstitutionName = f"Hospital {p.site}"
    ds.StationName = f"CT{p.site}{rng_meta['station']}"
    ds.Manufacturer = cond.manufacturer
    ds.ManufacturerModelName = cond.model
    ds.BodyPartExamined = rng_meta["body_part"]
    ds.PatientPosition = "FFS"
    ds.KVP = f"{cond.kvp:g}"
    if rng_meta.get("contrast", "none") != "none":
        ds.ContrastBolusAgent = "IOPAMIDOL 370"
        ds.ContrastBolusRoute = "IV"
    return ds


def _meta(p: PatientPlan) -> dict:
    rng = np.random.default_rng([p.seed, 7])
    days = (LAST_DATE - FIRST_DATE).days
    study_date = FIRST_DATE + dt.timedelta(days=int(rng.integers(0, days + 1)))
    age = int(rng.integers(45, 90))
    birth = study_date - dt.timedelta(days=365 * age + int(rng.integers(0, 365)))
    return {
        "name": f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}"
                f"^{_GIVEN[int(rng.integers(len(_GIVEN)))]}^{p.site}{p.index:04d}",
        "patient_id": f"SYN{p.site}{int(rng.integers(10**6, 10**7))}",
        "birth_date": birth.strftime("%Y%m%d"),
        "sex": "F" if rng.random() < 0.5 else "M",
        "accession": f"ACC{p.site}{int(rng.integers(10**7, 10**8))}",
        "study_date": study_date.strftime("%Y%m%d"),
        "study_time": f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}00",
        "station": int(rng.integers(1, 4)),
        "body_part": BODY_PART[int(rng.integers(len(BODY_PART)))],
    }


def _image_dataset(base: Dataset, sop_uid: str, series_uid: str, image: np.ndarray,
                   vendor: str) -> Dataset:
    """A CT image: copies ``base`` and stores ``image`` (HU) with the vendor's encoding."""
    ds = Dataset()
    ds.update(base)
    signed, intercept = STORAGE[vendor]
    # Scanners clip at -1024 HU (the bottom of the 12-bit CT range).
    stored = np.rint(np.maximum(image, -1024.0) - intercept)
    if signed:
        arr = stored.clip(-32768, 32767).astype(np.int16)
    else:
        arr = stored.clip(0, 65535).astype(np.uint16)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = signed
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = arr.tobytes()
    return ds


def _write(ds: Dataset, path: Path, compress: bool = False) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if compress:
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _patient(args: tuple) -> dict:
    """Generate one patient's study; returns truth rows. Runs in a worker process."""
    p, profile, seed, archive, labels_dir = args
    cond = BY_KEY[p.condition]
    rng = np.random.default_rng([p.seed, 1])
    a = _sample_anatomy(rng, SITE_PROTOCOLS[p.site].population)
    meta = _meta(p)
    plan_ = draw_scan(a, cond, p.site, profile, rng)
    acq, z1, start, covered = plan_.acq, plan_.z1, plan_.start, plan_.covered
    meta["contrast"] = acq.contrast
    scan = simulate_axial(a, cond, plan_, profile, p.seed)
    img, lab, truth_vol, measured = scan.image, scan.labels, scan.truth, scan.measured
    xs, ys, slice_z, fine_z, dz, pixel = (scan.xs, scan.ys, scan.slice_z, scan.fine_z,
                                          scan.dz, scan.pixel)
    n_sl = len(slice_z)
    study_dir = Path(archive) / p.site / f"ST{_hex(seed, p.site, p.index, 'study')}"
    base = _base_dataset(p, cond, seed, meta)
    rows: list[dict] = []
    factors = dict(
        kvp=acq.kvp, mas=acq.mas, contrast=acq.contrast, fov_mm=acq.fov_mm,
        unilateral=acq.unilateral, recon_centre_x_mm=acq.centre[0],
        table_offset_x_mm=round(acq.iso[0], 1), table_offset_y_mm=round(acq.iso[1], 1),
        scan_top_mm=round(float(z1), 1),
        scan_bottom_mm=round(float(slice_z[0] - cond.slice_thickness_mm / 2), 1),
        kernel_mtf50_lp_cm=round(physics.mtf50_lp_cm(cond.recon_kernel), 2),
        ir_strength=cond.ir_strength, hu_offset=cond.hu_offset,
        metal=a.prosthesis_side != 0, prosthesis_side=a.prosthesis_side,
        oa_side=a.oa_side, oa_severity=round(a.oa_severity, 3),
        infiltration=round(a.infiltration, 3), fat_mm=round(a.fat_mm, 1),
        muscle_scale=round(a.muscle_scale, 3), frame=round(a.frame, 3),
        bone_density=round(a.bone_density, 3), **measured)

    def series(number: int) -> tuple[str, Path]:
        uid = _uid(seed, p.site, p.index, "series", number)
        return uid, study_dir / f"SE{number:03d}"

    def row(uid: str, folder: Path, kind: str, n: int, usable: bool, thick: float,
            orient: str, **kw) -> dict:
        return dict(series_uid=uid, site=p.site, patient=f"{p.site}{p.index:04d}",
                    study_uid=base.StudyInstanceUID, kind=kind, orientation=orient,
                    vendor=cond.vendor, manufacturer=cond.manufacturer, model=cond.model,
                    kernel="\\".join(cond.kernel), condition=cond.key, n_slices=n,
                    slice_thickness_mm=thick, pixel_spacing_mm=pixel, usable=usable,
                    shift="+".join(SHIFT_SITES.get(p.site, ())) if usable else "",
                    path=str(folder.relative_to(archive)), **kw)

    # 1. Localizer (projection radiograph of the whole range).
    uid, folder = series(1)
    proj = truth_vol.mean(axis=1)[::-1]  # (z descending, x): coronal projection
    for j in range(2 if "localizer2" in p.distractors else 1):
        ds = _image_dataset(base, _uid(seed, uid, j), uid, proj * 0.25, cond.vendor)
        ds.SeriesNumber, ds.InstanceNumber = 1, j + 1
        ds.SeriesDescription = "Topogram 0.6 T20f" if cond.vendor == "SIEMENS" else "Scout"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [float(xs[0]), 0.0, float(fine_z[-1])]
        ds.PixelSpacing = [float(dz), float(pixel)]
        _write(ds, folder / f"IM{j + 1:05d}.dcm")
    rows.append(row(uid, folder, "localizer", 1, False, 0.0, "coronal"))

    # 2. The axial 3D stack: the series AI can use.
    uid, folder = series(2)
    thick = cond.slice_thickness_mm
    for k, z in enumerate(slice_z):
        ds = _image_dataset(base, _uid(seed, uid, k), uid, img[k], cond.vendor)
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.SeriesDescription = f"LEG {thick:g}mm {cond.kernel[0]}"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ConvolutionKernel = list(cond.kernel) if len(cond.kernel) > 1 else cond.kernel[0]
        ds.SliceThickness = f"{thick:g}"
        ds.SpacingBetweenSlices = f"{thick:g}"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(xs[0]), float(ys[0]), round(float(z), 4)]
        ds.SliceLocation = round(float(z), 4)
        ds.PixelSpacing = [round(float(pixel), 6), round(float(pixel), 6)]
        ds.XRayTubeCurrent = int(round(acq.mas * 2))
        ds.Exposure = int(round(acq.mas))
        ds.AcquisitionNumber = 1
        _write(ds, folder / f"IM{k + 1:05d}.dcm", compress=p.compress)
    label_path = Path(labels_dir) / f"{uid}.nii.gz"
    limg = sitk.GetImageFromArray(lab.astype(np.uint8))
    limg.SetSpacing((float(pixel), float(pixel), float(thick)))
    limg.SetOrigin((float(xs[0]), float(ys[0]), float(slice_z[0])))
    sitk.WriteImage(limg, str(label_path), useCompression=True)
    volumes = {STRUCTURES[k]: float((lab == k).sum() * pixel * pixel * thick / 1000.0)
               for k in STRUCTURES}
    rows.append(row(uid, folder, "axial", n_sl, True, thick, "axial",
                    label=label_path.name, compressed=p.compress,
                    **factors,
                    **{f"volume_ml_{k}": v for k, v in volumes.items()}))

    # 3. A thick axial recon (< 32 slices): archived, not usable for 3D AI.
    if "thick" in p.distractors:
        uid, folder = series(3)
        n_thick = int(covered // profile.thick_recon_mm)
        tz = start + profile.thick_recon_mm * (np.arange(n_thick) + 0.5)
        for k, z in enumerate(tz):
            sel = np.abs(slice_z - z) <= profile.thick_recon_mm / 2
            ds = _image_dataset(base, _uid(seed, uid, k), uid, img[sel].mean(axis=0), cond.vendor)
            ds.SeriesNumber, ds.InstanceNumber = 3, k + 1
            ds.SeriesDescription = f"LEG {profile.thick_recon_mm:g}mm"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ConvolutionKernel = list(cond.kernel) if len(cond.kernel) > 1 else cond.kernel[0]
            ds.SliceThickness = f"{profile.thick_recon_mm:g}"
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [float(xs[0]), float(ys[0]), round(float(z), 4)]
            ds.PixelSpacing = [round(float(pixel), 6), round(float(pixel), 6)]
            _write(ds, folder / f"IM{k + 1:05d}.dcm")
        rows.append(row(uid, folder, "thick", len(tz), False, profile.thick_recon_mm, "axial"))

    # 4. Coronal / sagittal multiplanar reformats: 3D stacks, but not axial.
    # Evenly spaced planes, as a scanner's MPR writes them: an integer stride of columns
    # (rounded linspace steps alternate, which reads as irregular slice spacing).
    n_ref = min(profile.reformat_slices, profile.matrix)
    stride = max(1, (profile.matrix - 1) // max(1, n_ref - 1))
    first = (profile.matrix - 1 - stride * (n_ref - 1)) // 2
    picks = first + stride * np.arange(n_ref)
    reformats = (("coronal", 4, [1, 0, 0, 0, 0, -1]), ("sagittal", 5, [0, 1, 0, 0, 0, -1]))
    for kind, number, iop in reformats:
        if kind not in p.distractors:
            continue
        uid, folder = series(number)
        for k, c in enumerate(picks):
            plane = img[::-1, c, :] if kind == "coronal" else img[::-1, :, c]
            ds = _image_dataset(base, _uid(seed, uid, k), uid, plane, cond.vendor)
            ds.SeriesNumber, ds.InstanceNumber = number, k + 1
            ds.SeriesDescription = f"{kind.upper()} MPR"
            ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
            ds.ImageOrientationPatient = iop
            pos = [float(xs[0]), float(ys[c]), float(slice_z[-1])]
            if kind == "sagittal":
                pos = [float(xs[c]), float(ys[0]), float(slice_z[-1])]
            ds.ImagePositionPatient = pos
            ds.PixelSpacing = [float(thick), round(float(pixel), 6)]
            ds.SliceThickness = f"{pixel:.3f}"
            _write(ds, folder / f"IM{k + 1:05d}.dcm")
        rows.append(row(uid, folder, kind, n_ref, False, float(pixel), kind))

    # 5. The dose report every modern scanner sends along (not an image).
    uid, folder = series(99)
    sr = Dataset()
    sr.update(base)
    sr.SOPClassUID = XRayRadiationDoseSRStorage
    sr.SOPInstanceUID = _uid(seed, uid, 0)
    sr.SeriesInstanceUID = uid
    sr.Modality = "SR"
    sr.SeriesNumber, sr.InstanceNumber = 99, 1
    sr.SeriesDescription = "Dose Report"
    sr.ValueType = "CONTAINER"
    sr.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "113701", "DCM"
    concept.CodeMeaning = "X-Ray Radiation Dose Report"
    sr.ConceptNameCodeSequence = Sequence([concept])
    _write(sr, folder / "IM00001.dcm")
    rows.append(row(uid, folder, "dose_sr", 1, False, 0.0, ""))

    patient = dict(patient=f"{p.site}{p.index:04d}", site=p.site, condition=cond.key,
                   **asdict(a))
    phi = dict(patient=f"{p.site}{p.index:04d}", name=meta["name"], patient_id=meta["patient_id"],
               birth_date=meta["birth_date"], accession=meta["accession"])
    return dict(series=rows, patient=patient, phi=phi)


def _archive_distractors(archive: Path, series_rows: list[dict], seed: int) -> list[dict]:
    """Corrupt, truncated and duplicated files, as real archives hold them."""
    rng = np.random.default_rng([seed, 4242])
    out: list[dict] = []
    junk = archive / "A" / "INCOMING"
    junk.mkdir(parents=True, exist_ok=True)
    for j in range(2):
        path = junk / f"corrupt{j}.dcm"
        path.write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
        out.append(dict(path=str(path.relative_to(archive)), kind="corrupt"))
    (junk / "notes.txt").write_text("transfer log: 3 studies received\n")
    out.append(dict(path=str((junk / "notes.txt").relative_to(archive)), kind="not_dicom"))
    axial = [r for r in series_rows if r["kind"] == "axial"]
    src = sorted((archive / axial[0]["path"]).iterdir())[0]
    data = src.read_bytes()
    for name, cut, kind in (("trunc_pixels.dcm", len(data) - 300, "truncated_pixels"),
                            ("trunc_header.dcm", 200, "truncated_header")):
        (junk / name).write_bytes(data[:cut])
        out.append(dict(path=str((junk / name).relative_to(archive)), kind=kind))
    # A series re-sent by the modality: the same SOP instances under another folder.
    dup_src = archive / axial[-1]["path"]
    dup_dst = dup_src.parent / (dup_src.name + "_RESENT")
    shutil.copytree(dup_src, dup_dst, dirs_exist_ok=True)
    for f in sorted(dup_dst.iterdir()):
        out.append(dict(path=str(f.relative_to(archive)), kind="duplicate"))
    return out


OWNER_FILE = ".fedct-synth.json"  # in TRUTH: the folders this generator wrote


def _check_replaceable(archive: Path, labels_dir: Path, truth: Path) -> None:
    """Refuse to delete a non-empty folder that ``generate`` did not write."""
    owned: set[Path] = set()
    try:
        rec = json.loads((truth / OWNER_FILE).read_text())
        owned = {truth.resolve(), (truth / rec["archive"]).resolve(),
                 (truth / rec["labels"]).resolve()}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for d in (archive, labels_dir, truth):
        if d.exists() and not d.is_dir():
            raise FedctError(f"{d}: exists and is not a folder; fedct synth writes a folder there")
        if d.is_dir() and any(d.iterdir()) and d.resolve() not in owned:
            raise FedctError(f"{d}: exists, is not empty and was not written by fedct synth "
                             f"(no {truth / OWNER_FILE} naming it); nothing was deleted. "
                             "Remove it yourself or choose another folder")


def generate(archive: Path, labels_dir: Path, truth: Path, profile_name: str = "demo",
             seed: int = 2026, workers: int | None = None) -> dict:
    """Write the archive, labels and ground truth; returns summary counts.

    ARCHIVE/LABELS/TRUTH folders that an earlier ``generate`` wrote (as TRUTH's
    ``OWNER_FILE`` records) are replaced: the archive is a pure function of (profile,
    seed). Any other non-empty folder is refused, so that a mistyped path cannot delete a
    real export.
    """
    if profile_name not in PROFILES:
        raise ValueError(f"unknown profile {profile_name!r}; choose from {sorted(PROFILES)}")
    profile = PROFILES[profile_name]
    archive, labels_dir, truth = Path(archive), Path(labels_dir), Path(truth)
    _check_replaceable(archive, labels_dir, truth)
    for d in (archive, labels_dir, truth):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    # Written first, so that a run killed half-way can still be replaced by the next one.
    (truth / OWNER_FILE).write_text(json.dumps(
        {"archive": os.path.relpath(archive, truth), "labels": os.path.relpath(labels_dir, truth)}))
    plans = plan(profile, seed)
    jobs = [(p, profile, seed, str(archive), str(labels_dir)) for p in plans]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    results: list[dict] = []
    desc = f"synth {profile_name}: patients"
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_patient, jobs), total=len(jobs), desc=desc))
    else:
        results = [_patient(j) for j in tqdm(jobs, desc=desc)]
    series_rows = [r for res in results for r in res["series"]]
    files = _archive_distractors(archive, series_rows, seed)
    (labels_dir / "labels.json").write_text(json.dumps(
        {"0": "background", **{str(k): v for k, v in STRUCTURES.items()},
         "codes": {v: list(STRUCTURE_CODES[v]) for v in STRUCTURES.values()}}, indent=1))
    series_df = pd.DataFrame(series_rows)
    series_df.to_csv(truth / "series.csv", index=False)
    pd.DataFrame(files).to_csv(truth / "files.csv", index=False)
    pd.DataFrame([r["patient"] for r in results]).to_csv(truth / "patients.csv", index=False)
    pd.DataFrame([r["phi"] for r in results]).to_csv(truth / "phi.csv", index=False)
    pd.DataFrame([{**asdict(c), "mtf50_lp_cm": round(physics.mtf50_lp_cm(c.recon_kernel), 2)}
                  for c in CONDITIONS]).to_csv(truth / "conditions.csv", index=False)
    pd.DataFrame([{"site": k, **asdict(v)} for k, v in SITE_PROTOCOLS.items()]).to_csv(
        truth / "site_protocols.csv", index=False)
    _factor_summary(series_df).to_csv(truth / "factors_by_site.csv")
    summary = {
        "profile": profile_name,
        "seed": seed,
        "n_patients": len(plans),
        "n_series": len(series_df),
        "n_usable": int(series_df["usable"].sum()),
        "n_files": sum(1 for _ in archive.rglob("*") if _.is_file()),
        "n_classes": N_CLASSES,
        "shift_sites": {k: list(v) for k, v in SHIFT_SITES.items()},
        "shift_reasons": {k: SITE_PROTOCOLS[k].reason for k in SHIFT_SITES},
    }
    (truth / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary


def _factor_summary(series: pd.DataFrame) -> pd.DataFrame:
    """Per site: the mean of each acquisition and patient factor of the usable series."""
    axial = series[series["usable"]]
    num = ["kvp", "mas", "fov_mm", "kernel_mtf50_lp_cm", "slice_thickness_mm", "wed_mm",
           "noise_sigma_hu", "noise_sigma_clinical_hu", "noise_sigma_7mm_hu",
           "truncated_fraction", "infiltration", "oa_severity", "fat_mm", "muscle_scale"]
    out = axial.groupby("site")[num].mean().round(3)
    for col in ("metal", "unilateral"):
        out[f"{col}_fraction"] = axial.groupby("site")[col].mean().round(3)
    out["contrast"] = axial.groupby("site")["contrast"].agg(lambda v: ",".join(sorted(set(v))))
    return out


def montage(archive: Path, truth: Path, out_png: Path, level: float = 40, width: float = 400
            ) -> Path:
    """One axial slice per site (hip level of the first patient), one window: the shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = pd.read_csv(truth / "series.csv")
    axial = series[series["kind"] == "axial"].groupby("site").head(1).set_index("site")
    fig, axes = plt.subplots(2, 5, figsize=(15, 6.6))
    for ax, site in zip(axes.ravel(), SITES, strict=True):
        ax.axis("off")
        if site not in axial.index:
            continue
        folder = archive / axial.loc[site, "path"]
        files = sorted(folder.iterdir())
        ds = pydicom.dcmread(files[int(len(files) * 0.35)])
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ax.imshow(hu, cmap="gray", vmin=level - width / 2, vmax=level + width / 2)
        r = axial.loc[site]
        ax.set_title(f"{site}: {r['vendor']} {r['kernel']} {r['slice_thickness_mm']:g}mm",
                     fontsize=9)
    fig.suptitle(f"Hip level (35 % up the stack), one patient per site, W{width:g}/L{level:g}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
