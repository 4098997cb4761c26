"""A tiny model folder and tiny CT inputs (DICOM series, NIfTI) for ``fedct predict``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pydicom.uid import generate_uid

from fedct import tracking
from fedct.model.io import architecture, build_from_arch, save_model
from tests.dicom.writers import ct_slice, write

LABELS = {"0": "background", "1": "muscle", "2": "femur"}
SIZE = 16          # rows = columns of the tiny series
N_SLICES = 40      # >= 32, the catalogue's rule
PIXEL_MM = 1.0
SLICE_MM = 1.5


def phantom(n_slices: int = N_SLICES) -> np.ndarray:
    """HU volume (z, y, x): air, a 40 HU body disc, a 700 HU bone disc off-centre."""
    y, x = np.mgrid[:SIZE, :SIZE]
    body = (x - 7.5) ** 2 + (y - 7.5) ** 2 <= 6.5**2
    bone = (x - 9.0) ** 2 + (y - 7.0) ** 2 <= 2.5**2
    hu = np.full((SIZE, SIZE), -1000, dtype=np.int16)
    hu[body] = 40
    hu[bone] = 700
    vol = np.repeat(hu[None], n_slices, axis=0)
    vol[: n_slices // 4, bone] = 40  # the bone ends: structures change with z
    return vol


def write_series(folder: Path, n_slices: int = N_SLICES, modality: str = "CT") -> list[Path]:
    """A CT series whose file names run against z (the reader must sort by position)."""
    vol = phantom(n_slices)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(n_slices):
        ds = ct_slice(study_uid=study, series_uid=series, rows=SIZE, cols=SIZE,
                      pixel_spacing=PIXEL_MM, thickness=SLICE_MM, modality=modality,
                      ipp=(-7.5, -7.5, 100.0 + SLICE_MM * k), instance=k + 1)
        ds.FrameOfReferenceUID = frame
        ds.PixelData = vol[k].tobytes()
        paths.append(write(ds, folder / f"IM{n_slices - k:05d}.dcm"))
    return paths


@pytest.fixture(scope="package")
def dicom_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("series") / "CT"
    write_series(folder)
    return folder


@pytest.fixture(scope="package")
def nifti_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom as NIfTI with a non-identity direction (x and y flipped)."""
    image = sitk.GetImageFromArray(phantom().astype(np.float32))
    image.SetSpacing((PIXEL_MM, PIXEL_MM, SLICE_MM))
    image.SetOrigin((7.5, 7.5, 100.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path_factory.mktemp("nifti") / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def make_model(folder: Path, failure: dict | None = None, seed: int = 3) -> Path:
    """A tiny untrained Bayesian U-Net (4-8 channels) and its card, as train writes them.

    The grid pads x and y (12 x 2 mm > 16 mm) and crops z (16 x 2 mm < 60 mm), so both
    directions of the crop/pad are undone on the way back.
    """
    torch.manual_seed(seed)
    arch = architecture(len(LABELS), (4, 8), (2,), 0.5, 1)
    model = build_from_arch(arch)
    card = {"site": "A", "labels": LABELS,
            "preprocessing": {"spacing_mm": [2.0, 2.0, 2.0], "roi_size": [12, 12, 16],
                              "hu_min": -200.0, "hu_max": 1000.0},
            "reference_ml": [0.5, 0.1], "fingerprint": "test", "n_train": 0, "n_val": 0,
            "training": {}}
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / tracking.MODEL_FILE, arch, card)
    if failure is not None:
        # Promotion adds the threshold to the card file only (the weights keep the trained
        # card), so the flag tests also check that predict reads the card file.
        data = json.loads((folder / "model_card.json").read_text())
        (folder / "model_card.json").write_text(json.dumps({**data, "failure": failure}))
    return folder


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "A")
