"""Header values: vendor, orientation, image type and kernel classes."""

from __future__ import annotations

import numpy as np
import pytest

from fedct import dicom
from tests.dicom.writers import AXIAL, CORONAL, SAGITTAL


@pytest.mark.parametrize(("raw", "expected"), [
    ("TOSHIBA", "CANON"), ("TOSHIBA_MEC", "CANON"), ("CANON_MEC", "CANON"),
    ("Canon Medical Systems", "CANON"), ("GE MEDICAL SYSTEMS", "GE"),
    ("GE Healthcare", "GE"), ("GE", "GE"), ("Philips", "PHILIPS"),
    ("Philips Medical Systems", "PHILIPS"), ("SIEMENS", "SIEMENS"),
    ("Siemens Healthineers", "SIEMENS"), ("  Hitachi  Medical ", "HITACHI MEDICAL"),
    ("", "UNKNOWN"), (None, "UNKNOWN"), ("GENERIC", "GENERIC"),
])
def test_vendor_normalisation(raw: str | None, expected: str) -> None:
    assert dicom.vendor(raw) == expected


def _tilted(deg: float) -> tuple[float, ...]:
    """Axial plane tilted about the x axis (a gantry tilt)."""
    t = np.radians(deg)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t)))


@pytest.mark.parametrize(("iop", "expected"), [
    (AXIAL, "axial"), (CORONAL, "coronal"), (SAGITTAL, "sagittal"),
    (_tilted(5), "axial"), (_tilted(30), "oblique"), (_tilted(80), "coronal"),
    ("1\\0\\0\\0\\1\\0", "axial"), ("garbage", "unknown"), (None, "unknown"),
    ((1, 0, 0, 1, 0, 0), "unknown"),  # degenerate: row == column
])
def test_orientation_classes(iop: object, expected: str) -> None:
    assert dicom.orientation_class(iop) == expected  # type: ignore[arg-type]


def test_orientation_tolerance_is_a_parameter() -> None:
    assert dicom.orientation_class(_tilted(12)) == "oblique"
    assert dicom.orientation_class(_tilted(12), tolerance_deg=15) == "axial"


@pytest.mark.parametrize(("image_type", "expected"), [
    ("ORIGINAL\\PRIMARY\\AXIAL", "original"), ("ORIGINAL\\PRIMARY\\LOCALIZER", "localizer"),
    ("DERIVED\\SECONDARY\\REFORMATTED", "reformat"), ("DERIVED\\SECONDARY\\AXIAL", "derived"),
    ("ORIGINAL\\PRIMARY\\TOPOGRAM", "localizer"), ("DERIVED\\SECONDARY\\MPR", "reformat"),
    (None, "unknown"),
])
def test_image_type_class(image_type: str | None, expected: str) -> None:
    assert dicom.image_type_class(image_type) == expected


@pytest.mark.parametrize(("vendor", "kernel", "expected"), [
    ("CANON", "FC13", "soft"), ("CANON", "FC30", "sharp"), ("CANON", "FC03", "soft"),
    ("SIEMENS", "Br40\\3", "soft"), ("SIEMENS", "Bf37", "soft"), ("SIEMENS", "Br64\\3", "sharp"),
    ("GE", "STANDARD", "soft"), ("GE", "BONE", "sharp"), ("GE", "SOFT", "soft"),
    ("PHILIPS", "B", "soft"), ("PHILIPS", "C", "soft"), ("PHILIPS", "YB", "sharp"),
    ("HITACHI", "X1", "unknown"), ("GE", None, "unknown"),
])
def test_kernel_class(vendor: str, kernel: str | None, expected: str) -> None:
    assert dicom.kernel_class(vendor, kernel) == expected
