"""DICOM reading for fedct.

Header scanning for the catalogue: read only headers (never pixel data) of many files
fast, say why a file cannot be catalogued, and normalise the few header values the
study sorts by (vendor, orientation, image type, kernel). One module per job:

- ``tags``: the tags read, the reject reasons, the UIDs and ``Header``;
- ``readers``: ``read_headers``, the three readers in turn (``walk``, then the gdcm
  ``scanner``, then ``pydicom_reader``) and the verdict on each file; ``read_columns``,
  the same for a chunk of files as columns, the plain files read by ``batch``;
- ``batch``: the walk over a whole chunk of files at once (numpy);
- ``walk``: the fast strict little-endian header walk;
- ``integrity``: is the file whole (the cheap tail check, the exact pydicom check);
- ``deflated``: deflated files with bounded memory (header prefix, counted rest);
- ``values``: numbers and text of header values, vendor/orientation/kernel classes;
- ``volume``: series -> 3D image with SimpleITK (imported on its own:
  ``from fedct.dicom.volume import read_volume``).

The names below are the package's interface; ``from fedct import dicom`` then
``dicom.read_headers(...)``, ``dicom.TRUNCATED``, ...
"""

from fedct.dicom.integrity import integrity, pixel_data_complete
from fedct.dicom.readers import (
    ENGINES,
    Columns,
    Engine,
    read_columns,
    read_header_pydicom,
    read_headers,
)
from fedct.dicom.tags import (
    CT_IMAGE_STORAGE,
    DEFLATED_LE,
    DICOMDIR,
    DUPLICATE,
    ENHANCED_CT_IMAGE_STORAGE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLAUSIBLE,
    IMPLICIT_VR_LE,
    LEGACY_CT_IMAGE_STORAGE,
    MAX_MATRIX,
    MEDIA_STORAGE_DIRECTORY,
    MISSING_TAG,
    NATIVE_TRANSFER_SYNTAXES,
    NOT_CT,
    NOT_DICOM,
    REJECT_REASONS,
    REQUIRED,
    SCAN_TAGS,
    TRUNCATED,
    UNREADABLE,
    Header,
)
from fedct.dicom.values import (
    ORIENTATION_TOLERANCE_DEG,
    image_type_class,
    implausible,
    kernel_class,
    normalise_kernel,
    orientation_class,
    parse_float,
    parse_floats,
    parse_int,
    slice_normal,
    vendor,
)
from fedct.dicom.walk import PARTIAL, WalkDeclined, walk_header

__all__ = [
    "CT_IMAGE_STORAGE",
    "DEFLATED_LE",
    "DICOMDIR",
    "DUPLICATE",
    "ENGINES",
    "Columns",
    "ENHANCED_CT_IMAGE_STORAGE",
    "EXPLICIT_VR_BE",
    "EXPLICIT_VR_LE",
    "IMPLAUSIBLE",
    "IMPLICIT_VR_LE",
    "LEGACY_CT_IMAGE_STORAGE",
    "MAX_MATRIX",
    "MEDIA_STORAGE_DIRECTORY",
    "MISSING_TAG",
    "NATIVE_TRANSFER_SYNTAXES",
    "NOT_CT",
    "NOT_DICOM",
    "ORIENTATION_TOLERANCE_DEG",
    "PARTIAL",
    "REJECT_REASONS",
    "REQUIRED",
    "SCAN_TAGS",
    "TRUNCATED",
    "UNREADABLE",
    "Engine",
    "Header",
    "WalkDeclined",
    "image_type_class",
    "implausible",
    "integrity",
    "kernel_class",
    "normalise_kernel",
    "orientation_class",
    "parse_float",
    "parse_floats",
    "parse_int",
    "pixel_data_complete",
    "read_columns",
    "read_header_pydicom",
    "read_headers",
    "slice_normal",
    "vendor",
    "walk_header",
]
