"""A hip-to-knee phantom with labelled bones and muscles, varying per patient.

Coordinates are DICOM patient coordinates (LPS, mm): +x towards the patient's left,
+y posterior, +z superior (head). The phantom spans from just above the knee
(s = 0) to the iliac crest (s = 1), where ``s = (z - z0) / length``.

The geometry is deliberately simple (ellipses, spheres and angular sectors) but keeps
the relations a segmentation model must learn: the femur inside the thigh muscles, the
quadriceps anterior, hamstrings posterior and adductors medial to it, the gluteal
muscles and iliopsoas around the pelvis, subcutaneous fat around everything, and
intermuscular fat septa between muscle groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Label values of the ground-truth masks (0 = background: air, fat, other tissue).
STRUCTURES: dict[int, str] = {
    1: "hip_bone",
    2: "femur",
    3: "gluteus_maximus",
    4: "gluteus_medius",
    5: "iliopsoas",
    6: "quadriceps",
    7: "hamstrings",
    8: "adductors",
}
N_CLASSES = len(STRUCTURES) + 1
# Tissue codes of render_slice() beyond the labels: femoral marrow (labelled femur),
# pelvic contents and subcutaneous/intermuscular fat (both background).
MARROW, VISCERA, FAT = 252, 254, 255


@dataclass(frozen=True)
class Anatomy:
    """One patient's body: sizes in mm, attenuation in HU.

    ``muscle_hu`` is lowered by fatty infiltration (healthy ~55 HU, sarcopenic ~20);
    ``bone_density`` scales cortical and trabecular attenuation (osteoporosis < 1).
    """

    body_scale: float  # overall size factor (1.0 ~ an average adult)
    fat_mm: float  # subcutaneous fat thickness
    muscle_scale: float  # muscle cross-section factor (atrophy < 1)
    muscle_hu: float
    fat_hu: float
    bone_density: float
    leg_gap_mm: float  # extra distance between the thighs
    length_mm: float  # knee-to-iliac-crest extent covered by the scan
    texture_seed: int

    @property
    def z0(self) -> float:
        return -self.length_mm / 2.0


def sample_anatomy(rng: np.random.Generator, length_mm: float) -> Anatomy:
    """Draw one patient; the spread covers lean to obese, healthy to sarcopenic."""
    infiltration = rng.beta(2.0, 5.0)  # 0 = none, 1 = severe fatty infiltration
    return Anatomy(
        body_scale=float(rng.uniform(0.88, 1.08)),
        fat_mm=float(rng.uniform(6.0, 28.0)),
        muscle_scale=float(rng.uniform(0.85, 1.1)),
        muscle_hu=float(58.0 - 40.0 * infiltration),
        fat_hu=float(rng.normal(-100.0, 6.0)),
        bone_density=float(rng.uniform(0.75, 1.15)),
        leg_gap_mm=float(rng.uniform(0.0, 15.0)),
        length_mm=float(length_mm),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _sector(angle: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Angles (degrees, -180..180) inside [lo, hi], wrapping through 180."""
    if lo <= hi:
        return (angle >= lo) & (angle <= hi)
    return (angle >= lo) | (angle <= hi)


def _thigh(
    a: Anatomy, s: float, x: np.ndarray, y: np.ndarray, side: int, lab: np.ndarray,
    body: np.ndarray,
) -> None:
    """Paint one thigh (side -1 = patient right, +1 = left) into ``lab``/``body``."""
    b = a.body_scale
    cx = side * ((72.0 + 22.0 * s) * b + a.leg_gap_mm / 2.0)
    cy = 0.0
    rm = (46.0 + 34.0 * s) * b * a.muscle_scale  # muscle compartment radius
    ro = rm + a.fat_mm
    dx, dy = x - cx, y - cy
    r = np.hypot(dx / 1.05, dy)
    body |= r <= ro
    # Femur: shaft slanting medially towards the knee; condyles widen near s = 0.
    fx = cx + side * (4.0 - 10.0 * s) * b
    fy = -6.0 * b
    rf = 13.0 * b + 18.0 * b * max(0.0, 0.12 - s) / 0.12
    fdx, fdy = x - fx, y - fy
    rfe = np.hypot(fdx / (1.0 + 0.4 * max(0.0, 0.12 - s) / 0.12), fdy)
    medial = -side * fdx  # > 0 towards the midline
    ang = np.degrees(np.arctan2(fdy, medial))  # 0 medial, -90 anterior, 90 posterior
    muscle = (r <= rm) & (rfe > rf + 2.0)
    quad = muscle & _sector(ang, 150.0, -40.0)
    add = muscle & _sector(ang, -30.0, 60.0)
    ham = muscle & _sector(ang, 70.0, 140.0)
    if s > 0.6:
        # Gluteus maximus wraps the posterior thigh below the buttock.
        gmax = ham & (np.hypot(fdx, fdy) > 0.55 * rm)
        lab[gmax] = 3
        ham = ham & ~gmax
    lab[quad] = 6
    lab[add] = 8
    lab[ham] = 7
    lab[rfe <= rf] = 2
    lab[rfe <= rf - 4.5 * a.body_scale] = MARROW


def _pelvis(a: Anatomy, s: float, x: np.ndarray, y: np.ndarray, lab: np.ndarray,
            body: np.ndarray, other: np.ndarray) -> None:
    """Paint the pelvic region (s >= 0.7): hip bones, gluteals, iliopsoas, femoral heads."""
    b = a.body_scale
    t = (s - 0.7) / 0.3  # 0 at the lesser trochanter, 1 at the iliac crest
    ax = (150.0 + 10.0 * t) * b * (0.6 + 0.4 * a.muscle_scale)
    ay = (108.0 + 6.0 * t) * b * (0.7 + 0.3 * a.muscle_scale)
    cy = 8.0 * b
    e_in = np.hypot(x / ax, (y - cy) / ay)
    e_out = np.hypot(x / (ax + a.fat_mm), (y - cy) / (ay + a.fat_mm))
    body |= e_out <= 1.0
    inside = e_in <= 1.0
    other |= inside
    for side in (-1, 1):
        # Gluteus maximus: posterior, lateral of the midline.
        gmax = inside & (y > cy + 0.35 * ay) & (side * x > 18.0 * b)
        if s < 0.95:
            lab[gmax] = 3
        # Ilium: a plate from the sacroiliac joint to the anterior superior spine.
        if s >= 0.82:
            p0 = np.array([side * 38.0 * b, 52.0 * b])
            p1 = np.array([side * (118.0 + 12.0 * t) * b, -28.0 * b])
            d = p1 - p0
            u = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / (d @ d)
            px, py = p0[0] + u.clip(0, 1) * d[0], p0[1] + u.clip(0, 1) * d[1]
            dist = np.hypot(x - px, y - py)
            ilium = (dist <= 6.0 * b) & (u >= 0) & (u <= 1)
            # Normal pointing laterally-posterior: gluteus medius lies on that side.
            nx_, ny_ = d[1], -d[0]
            if nx_ * side < 0:
                nx_, ny_ = -nx_, -ny_
            lateral = ((x - px) * nx_ + (y - py) * ny_) > 0
            gmed = inside & lateral & (dist > 6.0 * b) & (dist <= 30.0 * b) & (u > 0.15) & (u < 1)
            lab[gmed] = 4
            # Iliacus/psoas: on the inner (medial-anterior) face of the ilium.
            ilio = (inside & ~lateral & (dist > 6.0 * b) & (dist <= 22.0 * b)
                    & (u > 0.25) & (u < 0.95))
            lab[ilio] = 5
            lab[ilium] = 1
        # Femoral head in the acetabulum, with the greater trochanter below it.
        hx, hy, hs = side * 78.0 * b, -6.0 * b, 0.79
        dz = (s - hs) * a.length_mm
        rh = 22.0 * b
        if abs(dz) < rh + 10.0 * b:
            rr = np.hypot(x - hx, y - hy)
            head_r2 = rh**2 - dz**2
            if s < 0.86:
                # Acetabulum: a bony shell around the upper head (pubis, ischium below).
                shell_r = np.sqrt(max((rh + 9.0 * b) ** 2 - dz**2, 0.0))
                acet = (rr <= shell_r) & (side * (x - hx) < 6.0 * b) & inside
                lab[acet] = 1
            if head_r2 > 0:
                lab[rr <= np.sqrt(head_r2)] = 2
        if s < 0.8:
            # Psoas descends anterior to the hip joint onto the lesser trochanter.
            px, py = side * (62.0 - 10.0 * (0.8 - s) / 0.1) * b, -40.0 * b
            lab[inside & (np.hypot((x - px) / 1.2, y - py) <= 16.0 * b)] = 5
            # Pubic rami: a bar from the acetabulum towards the symphysis.
            pubis = (np.abs(y + 34.0 * b) < 8.0 * b) & (side * x > 4.0 * b) & (side * x < 70 * b)
            lab[pubis & inside & (s > 0.72)] = 1
            shaft_x = side * (72.0 + 22.0 * s) * b + side * (4.0 - 10.0 * s) * b
            lab[np.hypot(x - shaft_x, y + 6.0 * b) <= 15.0 * b] = 2


def render_slice(a: Anatomy, z: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Label map (uint8, shape of ``x``) of the axial plane at height ``z`` (mm)."""
    s = (z - a.z0) / a.length_mm
    lab = np.zeros(x.shape, dtype=np.uint8)
    body = np.zeros(x.shape, dtype=bool)
    other = np.zeros(x.shape, dtype=bool)
    if s < 0.0 or s > 1.0:
        return lab
    if s < 0.86:
        for side in (-1, 1):
            _thigh(a, min(s, 0.75), x, y, side, lab, body)
    if s >= 0.7:
        # In the transition both descriptions overlap; the pelvis paints over.
        _pelvis(a, s, x, y, lab, body, other)
    # Encode tissue classes without labels in high values; mapped to HU in render().
    lab[(lab == 0) & other] = VISCERA
    lab[(lab == 0) & body] = FAT
    return lab


def hu_of(a: Anatomy, tissue: np.ndarray) -> np.ndarray:
    """HU of the noiseless tissue map from ``render_slice`` (before texture)."""
    hu = np.full(tissue.shape, -1000.0, dtype=np.float32)
    hu[tissue == FAT] = a.fat_hu
    hu[tissue == VISCERA] = 25.0  # pelvic contents (bowel, bladder, vessels) on average
    for k in (3, 4, 5, 6, 7, 8):
        hu[tissue == k] = a.muscle_hu
    hu[tissue == 1] = 520.0 * a.bone_density
    hu[tissue == 2] = 1250.0 * a.bone_density  # cortical bone
    hu[tissue == MARROW] = 40.0 + 120.0 * a.bone_density  # fatty-red marrow mix
    return hu


def labels_of(tissue: np.ndarray) -> np.ndarray:
    """Ground-truth labels (0..8) from the tissue map."""
    lab = tissue.copy()
    lab[lab == MARROW] = 2
    lab[lab >= VISCERA] = 0
    return lab
