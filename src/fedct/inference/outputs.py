"""Writers of ``predict``: label map and uncertainty map (NIfTI), the per-structure JSON,
and the label map as DICOM SEG (highdicom) referencing the source series for PACS.

The SEG says what it is where a PACS user looks: the series description names the model's
registry name and version and warns of a failure flag or a model that is not the
champion; the content description holds the failure score; AlgorithmName/AlgorithmVersion
are the registry's name and version; each segment is typed by its structure's standard
code from the labels file (``fedct.data.labels``)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SegProvenance:
    """Which model made a SEG and what it thought of the case.

    ``model``: the registry name (or ``fedct-<site>`` for a model outside the registry);
    ``version``: the registry version, or None outside the registry; ``champion``: whether
    that version is the one the champion alias names; ``failure``: predict's failure
    entry (``flag`` True/False/None, ``score`` and ``threshold`` as numbers, "inf" or None).
    """

    model: str
    version: str | None
    champion: bool
    failure: Mapping[str, Any]

    @property
    def algorithm_version(self) -> str:
        return self.version if self.version is not None else "unregistered"

    def series_description(self) -> str:
        """LO (64 characters): model, version and the warnings a reader must see first."""
        warn = [w for w, on in (("FAILURE FLAGGED", self.failure.get("flag") is True),
                                ("NOT CHAMPION", not self.champion)) if on]
        tail = (f" v{self.version}" if self.version else " unregistered") + " seg" + (
            f" [{', '.join(warn)}]" if warn else "")
        return self.model[:64 - len(tail)] + tail  # a long name is cut, not the rest

    def content_description(self) -> str:
        """LO (64 characters): the failure flag with its score and threshold."""
        flag = self.failure.get("flag")
        word = {True: "FLAGGED", False: "not flagged", None: "unflagged"}[flag]
        score, threshold = _number(self.failure.get("score")), _number(
            self.failure.get("threshold"))
        rule = {True: ">=", False: "<"}.get(flag, "vs")
        text = f"failure {word}: score {score} {rule} threshold {threshold}"
        return text[:64]


def _number(v: object) -> str:
    if v is None:
        return "none"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_seg(seg: sitk.Image, datasets: Sequence[Any], labels: LabelSet, path: Path,
              provenance: SegProvenance) -> Path | None:
    """The label map as a binary DICOM SEG, one segment per predicted structure.

    ``seg`` is on the source series' grid with its slices in the order of ``datasets``
    (``fedct.inference.inputs``), so frame ``k`` of the label array belongs to
    ``datasets[k]``. Segments are numbered 1..M in label order, labelled with the
    card's structure names and typed with their codes (``LabelSet.code``). The SEG copies
    the patient and study modules of the source (PACS files it with the study) and
    describes the model and the failure flag (``SegProvenance``). Returns None (no file)
    when nothing was predicted.
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
        name=provenance.model[:64], version=provenance.algorithm_version[:64],
        family=codes.cid7162.ArtificialIntelligence,
        source="fedct MC-dropout Bayesian U-Net")
    # Every structure is an anatomical structure (the category); the type is its own code.
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=labels.names[k][:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=hd.sr.CodedConcept(
                value=labels.code(k)[1], scheme_designator=labels.code(k)[0],
                meaning=labels.code(k)[2]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_id=labels.names[k][:64],
            tracking_uid=hd.UID())
        for i, k in enumerate(present)]
    out = hd.seg.Segmentation(
        source_images=_with_type2(datasets), pixel_array=numbers[array],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fedct",
        manufacturer_model_name=provenance.model[:64], software_versions=_version(),
        device_serial_number="none", series_description=provenance.series_description(),
        content_label="FEDCT", content_description=provenance.content_description())
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save_as(path)
    return path
