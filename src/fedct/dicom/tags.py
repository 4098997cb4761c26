"""What the header scan reads and how it answers: tags, reject reasons, UIDs, ``Header``."""

from __future__ import annotations

from dataclasses import dataclass, field

# Keyword -> tag of every value the catalogue reads. PatientID is read only so that the
# caller can pseudonymise it; PatientName and PatientBirthDate only so that a file whose
# archive path spells them out is counted (``catalogue.pathids.path_holds_id``): neither is
# stored anywhere. AccessionNumber is never read at all.
SCAN_TAGS: dict[str, tuple[int, int]] = {
    "MediaStorageSOPClassUID": (0x0002, 0x0002),
    "TransferSyntaxUID": (0x0002, 0x0010),
    "SpecificCharacterSet": (0x0008, 0x0005),
    "ImageType": (0x0008, 0x0008),
    "SOPClassUID": (0x0008, 0x0016),
    "SOPInstanceUID": (0x0008, 0x0018),
    "StudyDate": (0x0008, 0x0020),
    "Modality": (0x0008, 0x0060),
    "Manufacturer": (0x0008, 0x0070),
    "InstitutionName": (0x0008, 0x0080),
    "ManufacturerModelName": (0x0008, 0x1090),
    "PatientName": (0x0010, 0x0010),
    "PatientID": (0x0010, 0x0020),
    "PatientBirthDate": (0x0010, 0x0030),
    "BodyPartExamined": (0x0018, 0x0015),
    "SliceThickness": (0x0018, 0x0050),
    "SpacingBetweenSlices": (0x0018, 0x0088),
    "KVP": (0x0018, 0x0060),
    "Exposure": (0x0018, 0x1152),
    "ConvolutionKernel": (0x0018, 0x1210),
    "StudyInstanceUID": (0x0020, 0x000D),
    "SeriesInstanceUID": (0x0020, 0x000E),
    "SeriesNumber": (0x0020, 0x0011),
    "ImagePositionPatient": (0x0020, 0x0032),
    "ImageOrientationPatient": (0x0020, 0x0037),
    "SamplesPerPixel": (0x0028, 0x0002),
    "NumberOfFrames": (0x0028, 0x0008),
    "Rows": (0x0028, 0x0010),
    "Columns": (0x0028, 0x0011),
    "PixelSpacing": (0x0028, 0x0030),
    "BitsAllocated": (0x0028, 0x0100),
}

# Without these a file cannot be placed in a series of a study (identity) nor be an image.
REQUIRED = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
            "Rows", "Columns")

# Reject reasons: a small fixed vocabulary, so that rejects can be counted by reason;
# the ``detail`` string of a rejected file says more (which tag, which modality, ...).
NOT_DICOM = "not DICOM"
TRUNCATED = "truncated"
MISSING_TAG = "missing required tag"
NOT_CT = "not CT"
DICOMDIR = "DICOMDIR"
UNREADABLE = "unreadable"
DUPLICATE = "duplicate SOPInstanceUID"  # decided by the catalogue, over all files
# A header value no CT image can have (a matrix beyond MAX_MATRIX, a thickness or pixel
# spacing that is not a positive number, pixel data of another size than the header says).
IMPLAUSIBLE = "implausible value"
REJECT_REASONS = (NOT_DICOM, TRUNCATED, MISSING_TAG, NOT_CT, DICOMDIR, UNREADABLE, DUPLICATE,
                  IMPLAUSIBLE)
# Rows and Columns of a CT image: 512 nearly always, 1024-2048 for high-resolution
# reconstructions; beyond this a header is hostile or broken (65535 x 65535 would ask
# a reader for 8 GB per slice).
MAX_MATRIX = 4096
MAX_FRAMES = 20000  # frames of one multi-frame image

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
NATIVE_TRANSFER_SYNTAXES = frozenset({IMPLICIT_VR_LE, EXPLICIT_VR_LE, EXPLICIT_VR_BE})

# Encoding: the length of an undefined-length value, the tag of Pixel Data (group << 16 |
# element).
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True, slots=True)
class Header:
    """Raw header values of one file, or why it cannot be catalogued.

    ``values`` maps a keyword of ``SCAN_TAGS`` to its text as stored (multiple values
    joined by a backslash, surrounding blanks stripped); absent or empty tags are left
    out. ``frame_positions`` holds the ImagePositionPatient of every frame (mm) of a
    multi-frame image, whose geometry lives in functional groups, else None.
    """

    path: str
    values: dict[str, str]
    reader: str  # "walk", "gdcm" or "pydicom"
    reject: str | None = None
    detail: str = ""
    frame_positions: tuple[tuple[float, float, float], ...] | None = field(default=None)
    frames_consistent: bool = True  # per-frame orientation/spacing agree (multi-frame)

    @property
    def ok(self) -> bool:
        return self.reject is None
