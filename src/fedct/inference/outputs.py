"""Writers of ``predict``: label map and uncertainty map (NIfTI), the per-structure JSON,
and the label map as DICOM SEG (highdicom) referencing the source series for PACS."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fedct.data.labels import LabelSet
from fedct.errors import FedctError


def write_image(image: sitk.Image, path: Path) -> Path:
    """A SimpleITK image as NIfTI (geometry kept; LPS -> RAS by the NIfTI writer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(image, str(path), useCompression=True)
    except RuntimeError as exc:
        raise FedctError(f"{path}: cannot write ({str(exc).strip().splitlines()[-1]})") from exc
    return path


def write_json(report: dict[str, Any], path: Path) -> Path:
    """Strict JSON (no NaN / Infinity: the report holds None or "inf" instead)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, allow_nan=False))
    return path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedct")
    except PackageNotFoundError:
        return "unknown"


# Type 2 attributes (present, may be empty) of the patient and study modules that
# highdicom copies from the first source image; exports and test files sometimes omit them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
          "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def _with_type2(datasets: Sequence[Any]) -> list[Any]:
    """The source headers with absent Type 2 attributes of the first one set empty."""
    first = copy.deepcopy(datasets[0])
    for keyword in _TYPE2:
        if keyword not in first:
            setattr(first, keyword, "")
    return [first, *datasets[1:]]


def write_seg(seg: sitk.Image, datasets: Sequence[Any], labels: LabelSet, path: Path,
              model_name: str) -> Path | None:
    """The label map as a binary DICOM SEG, one segment per predicted structure.

    ``seg`` is on the source series' grid with its slices in the order of ``datasets``
    (``fedct.inference.inputs``), so frame ``k`` of the label array belongs to
    ``datasets[k]``. Segments are numbered 1..M in label order and labelled with the
    card's structure names. The SEG copies the patient and study modules of the source
    (PACS files it with the study). Returns None (no file) when nothing was predicted.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    array = sitk.GetArrayFromImage(seg)  # (slices, rows, columns)
    if array.shape[0] != len(datasets):
        raise ValueError(f"label map has {array.shape[0]} slices, source series "
                         f"{len(datasets)}")
    if not datasets[0].get("FrameOfReferenceUID"):
        raise FedctError(f"{getattr(datasets[0], 'filename', 'source series')}: no "
                         "FrameOfReferenceUID, which a DICOM SEG must reference")
    present = [int(k) for k in np.unique(array) if k > 0]
    if not present:
        return None
    numbers = np.zeros(labels.n_classes, dtype=np.uint8 if len(present) < 256 else np.uint16)
    numbers[present] = np.arange(1, len(present) + 1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="fedct Bayesian U-Net (MC dropout)", version=_version(),
        family=codes.cid7162.ArtificialIntelligence)
    # The card names structures but carries no codes: the generic SNOMED CT concept
    # "Anatomical structure" types every segment; the label says which one it is.
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=labels.names[k][:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.AnatomicalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_id=labels.names[k][:64],
            tracking_uid=hd.UID())
        for i, k in enumerate(present)]
    out = hd.seg.Segmentation(
        source_images=_with_type2(datasets), pixel_array=numbers[array],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fedct",
        manufacturer_model_name=model_name[:64], software_versions=_version(),
        device_serial_number="none", series_description="fedct segmentation",
        content_label="FEDCT", content_description="MC-dropout Bayesian U-Net")
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save_as(path)
    return path
