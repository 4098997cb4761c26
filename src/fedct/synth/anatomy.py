"""A hip-and-thigh phantom of adult proportions with individual, labelled muscles.

Coordinates are DICOM patient coordinates (LPS, mm): +x towards the patient's left,
+y posterior, +z superior. The iliac crest lies at z = 0; the knee ~500 mm below it
(``Anatomy.length_mm``). Structure positions come from ``shapes`` (level by level);
this module draws one patient (frame size, subcutaneous fat, muscle bulk, fatty
infiltration, hip osteoarthritis on one side, a hip prosthesis) and paints axial
planes as *tissue codes*: labels 1..10 are the labelled structures, higher codes are
tissue that carries no label (fat, viscera, vessels, unlabelled muscle, metal liner).
Muscles compete for space; where two different muscles meet, a fat plane of the
patient's width separates them, so boundaries are defined by intensity as in real CT.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedct.synth import shapes as sh

STRUCTURES: dict[int, str] = {
    1: "pelvis", 2: "femur", 3: "gluteus_maximus", 4: "gluteus_medius_minimus",
    5: "iliopsoas", 6: "rectus_femoris", 7: "vasti", 8: "hamstrings", 9: "adductors",
    10: "sartorius",
}
N_CLASSES = len(STRUCTURES) + 1
# SNOMED CT codes of the structures for the labels file (fedct.data.labels), which types
# the segments of predict's DICOM SEG. Pelvis and femur are the concepts pydicom's code
# dictionary (from the DICOM standard) names "Pelvis" (bone structure of pelvis) and
# "Femur"; gluteus maximus and iliopsoas are the codes TotalSegmentator's DICOM SEG mapping
# uses. The other labels are muscle groups or muscles whose code fedct could not confirm
# from such a source: they carry "Skeletal muscle", true of each, rather than a guess.
_SKELETAL_MUSCLE = ("SCT", "127954009", "Skeletal muscle")
STRUCTURE_CODES: dict[str, tuple[str, str, str]] = {
    "pelvis": ("SCT", "118645006", "Pelvis"),
    "femur": ("SCT", "71341001", "Femur"),
    "gluteus_maximus": ("SCT", "181674001", "Gluteus maximus muscle"),
    "iliopsoas": ("SCT", "68455001", "Iliopsoas muscle"),
    **{name: _SKELETAL_MUSCLE for name in ("gluteus_medius_minimus", "rectus_femoris", "vasti",
                                           "hamstrings", "adductors", "sartorius")},
}
PELVIS, FEMUR = 1, 2  # codes 1 and 2 are cortical bone of these structures
MUSCLE_LABELS = tuple(range(3, 11))
# Unlabelled tissue codes (label 0) and bone interiors (labelled with their bone).
(PELVIS_MARROW, FEMUR_MARROW, METAL_FEMUR, METAL_CUP, FAT, VISCERA, OTHER_MUSCLE, ARTERY,
 VEIN, VERTEBRA, SOFT, POLY) = range(20, 32)
LABEL_OF = {PELVIS_MARROW: PELVIS, FEMUR_MARROW: FEMUR, METAL_FEMUR: FEMUR, METAL_CUP: PELVIS}
METAL = (METAL_FEMUR, METAL_CUP)
# Keyframe muscles are drawn this much larger and compete for the overlap: the deep
# fascia is then nearly filled, as in a healthy thigh (fat planes cut the overlaps).
MUSCLE_FILL = 1.45

# Patient populations: (frame, fat mm, muscle bulk, infiltration beta(a, b), OA
# probability, OA severity range, prosthesis probability, bone density range).
POPULATIONS: dict[str, dict] = {
    "general": dict(frame=(0.92, 1.08), fat=(6.0, 30.0), bulk=(0.85, 1.1), infil=(1.5, 12.0),
                    oa=0.2, severity=(0.1, 0.5), prosthesis=0.0, density=(0.8, 1.15)),
    # Older hip-osteoarthritis patients of an orthopaedic centre: atrophy and fatty
    # infiltration of the gluteals and thigh muscles, worst on the affected side, and
    # total hip arthroplasty in many (Uemura et al.; Hiasa et al. 2019 cohorts).
    "orthopaedic_oa": dict(frame=(0.9, 1.05), fat=(8.0, 35.0), bulk=(0.7, 0.95),
                           infil=(6.0, 6.0), oa=1.0, severity=(0.5, 1.0), prosthesis=0.5,
                           density=(0.65, 0.95)),
    # A trauma/vascular referral population: larger patients (dose and noise rise).
    "large": dict(frame=(0.98, 1.1), fat=(20.0, 50.0), bulk=(0.9, 1.15), infil=(2.0, 8.0),
                  oa=0.2, severity=(0.1, 0.5), prosthesis=0.0, density=(0.8, 1.15)),
}


@dataclass(frozen=True)
class Anatomy:
    """One patient: sizes in mm; attenuation at 120 kVp in HU (see ``physics``)."""

    frame: float  # skeletal size (1.0 ~ an average adult, knee to crest ~500 mm)
    fat_mm: float  # subcutaneous fat thickness
    muscle_scale: float  # muscle cross-section factor (atrophy < 1)
    infiltration: float  # fatty infiltration of muscle, 0 none .. 1 severe
    oa_side: int  # hip with osteoarthritis: -1 right, +1 left, 0 none
    oa_severity: float  # 0..1: atrophy and extra infiltration on that side
    prosthesis_side: int  # metal total hip arthroplasty: -1 right, +1 left, 0 none
    muscle_hu: float  # healthy muscle
    fat_hu: float
    bone_density: float  # scales cortical and trabecular attenuation (osteoporosis < 1)
    leg_gap_mm: float  # extra distance between the thighs
    shape_seed: int
    texture_seed: int

    @property
    def length_mm(self) -> float:
        """Knee to iliac crest."""
        return 500.0 * self.frame

    @property
    def fat_plane_mm(self) -> float:
        """Width of the fat planes between muscles (wider with fatty infiltration)."""
        return 1.5 + 3.0 * self.infiltration

    def side_infiltration(self, side: int) -> float:
        extra = 0.35 * self.oa_severity if side == self.oa_side else 0.0
        return float(min(1.0, self.infiltration + extra))

    def cortical_hu(self) -> float:
        return 1000.0 + 800.0 * (self.bone_density - 0.65) / 0.5

    def marrow_hu(self) -> float:
        return 100.0 + 200.0 * (self.bone_density - 0.65) / 0.5


def sample_anatomy(rng: np.random.Generator, population: str = "general") -> Anatomy:
    """Draw one patient of ``population`` (a key of ``POPULATIONS``)."""
    p = POPULATIONS[population]
    oa = rng.random() < p["oa"]
    side = int(rng.choice([-1, 1]))
    return Anatomy(
        frame=float(rng.uniform(*p["frame"])),
        fat_mm=float(rng.uniform(*p["fat"])),
        muscle_scale=float(rng.uniform(*p["bulk"])),
        infiltration=float(rng.beta(*p["infil"])),
        oa_side=side if oa else 0,
        oa_severity=float(rng.uniform(*p["severity"])) if oa else 0.0,
        prosthesis_side=side if (oa and rng.random() < p["prosthesis"]) else 0,
        muscle_hu=float(rng.normal(54.0, 3.0)),
        fat_hu=float(rng.normal(-100.0, 5.0)),
        bone_density=float(rng.uniform(*p["density"])),
        leg_gap_mm=float(rng.uniform(0.0, 15.0)),
        shape_seed=int(rng.integers(0, 2**31 - 1)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


@lru_cache(maxsize=64)
def _wobbles(shape_seed: int) -> np.ndarray:
    """Per muscle part and side: 2- and 3-lobe amplitudes, phases and phase drift."""
    rng = np.random.default_rng(shape_seed)
    n = len(sh.MUSCLES)
    return np.stack([rng.uniform(0, 0.09, (n, 2)), rng.uniform(0, 2 * np.pi, (n, 2)),
                     rng.uniform(0, 0.9, (n, 2)), rng.uniform(0, 2 * np.pi, (n, 2)),
                     rng.uniform(-0.015, 0.015, (n, 2))], axis=-1)


class _Plane:
    """The pixel grid of one axial plane; pieces are evaluated in their bounding box."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray):
        self.xs, self.ys = xs, ys
        self.X, self.Y = np.meshgrid(xs, ys)

    def box(self, cx: float, cy: float, rx: float, ry: float | None = None):
        ry = rx if ry is None else ry
        r0, r1 = np.searchsorted(self.ys, (cy - ry, cy + ry))
        c0, c1 = np.searchsorted(self.xs, (cx - rx, cx + rx))
        b = (slice(int(r0), int(r1)), slice(int(c0), int(c1)))
        return b, self.X[b], self.Y[b]


# A bone piece: (box, signed distance in the box, marrow mask in the box).
Piece = tuple[tuple[slice, slice], np.ndarray, np.ndarray]


def _ellipsoid(P: _Plane, lvl: float, c, k: float, cortex: float = 2.0) -> list[Piece]:
    """The plane's section of an ellipsoid (x, y, d, ax, ay, ad) x k."""
    x, y, d, ax, ay, ad = (v * k for v in c)
    f = 1.0 - ((lvl - d) / ad) ** 2
    if f <= 0:
        return []
    b, X, Y = P.box(x, y, ax + 2, ay + 2)
    sd = sh.ellipse_sd(X, Y, x, y, ax * np.sqrt(f), ay * np.sqrt(f), 0.0)
    return [(b, sd, sd <= -cortex)]


def _femur(a: Anatomy, d: float, P: _Plane, side: int, k: float
           ) -> tuple[list[Piece], list[Piece]]:
    """Bone pieces and prosthesis stem pieces of one femur at level ``d``."""
    lvl, pieces, stem = d * k, [], []
    hx, hy, hd, hr = sh.HEAD
    cx, cy, cz, r = side * hx * k, hy * k, hd * k, hr * k
    if abs(lvl - cz) < r:
        b, X, Y = P.box(cx, cy, r + 2)
        dist3 = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2 + (lvl - cz) ** 2)
        pieces.append((b, dist3 - r, dist3 <= r - 2.0))
    (p0, p1, nr) = sh.NECK
    a3 = np.array([side * p0[0] * k, p0[1] * k, p0[2] * k])
    b3 = np.array([side * p1[0] * k, p1[1] * k, p1[2] * k])
    if min(a3[2], b3[2]) - nr * k < lvl < max(a3[2], b3[2]) + nr * k:
        seg = b3 - a3
        b, X, Y = P.box((a3[0] + b3[0]) / 2, (a3[1] + b3[1]) / 2,
                        abs(seg[0]) / 2 + nr * k + 2, abs(seg[1]) / 2 + nr * k + 2)
        u = (((X - a3[0]) * seg[0] + (Y - a3[1]) * seg[1] + (lvl - a3[2]) * seg[2])
             / (seg @ seg)).clip(0, 1)
        nd = np.sqrt((X - a3[0] - u * seg[0]) ** 2 + (Y - a3[1] - u * seg[1]) ** 2
                     + (lvl - a3[2] - u * seg[2]) ** 2)
        pieces.append((b, nd - nr * k, nd <= nr * k - 2.0))
        if a.prosthesis_side == side:
            stem.append((b, nd - 6.0 * k, nd <= 6.0 * k))
    for troch in (sh.GREATER_TROCH, sh.LESSER_TROCH):
        pieces += _ellipsoid(P, lvl, (side * troch[0], *troch[1:]), k)
    shaft = sh.at_level(sh.SHAFT, d)
    if shaft is not None:
        sx, sy, ro, cortex = shaft
        b, X, Y = P.box(side * sx * k, sy * k, ro * k + 2)
        rr = np.hypot(X - side * sx * k, Y - sy * k)
        pieces.append((b, rr - ro * k, rr <= (ro - cortex) * k))
        if a.prosthesis_side == side and d < hd + 150:
            # Femoral stem down the medullary canal, tapering from 7 to 3 mm radius.
            rs = max(7.0 - 4.0 * (d - 140) / (hd + 10), 3.0) * k
            stem.append((b, rr - rs, rr <= rs))
    return pieces, stem


def _pelvis(d: float, P: _Plane, side: int, k: float) -> list[Piece]:
    """Bone pieces of one hip bone at level ``d``."""
    lvl, pieces = d * k, []
    wing = sh.wing_at(d)
    if wing is not None:
        pts, thick = wing
        curve = sh.bezier(*[p * np.array([side, 1.0]) * k for p in pts], n=9)
        lo, hi = curve.min(axis=0) - thick * k, curve.max(axis=0) + thick * k
        b, X, Y = P.box(*(lo + hi) / 2, *(hi - lo) / 2)
        w = sh.polyline_distance(X, Y, curve) - thick * k / 2
        pieces.append((b, w, w <= -1.5))
    hx, hy, hd, hr = sh.HEAD
    dz = lvl - hd * k
    if -(hr + 10) * k < dz < 0.9 * hr * k:
        b, X, Y = P.box(side * hx * k, hy * k, (hr + 12) * k)
        dist3 = np.sqrt((X - side * hx * k) ** 2 + (Y - hy * k) ** 2 + dz**2)
        shell = np.maximum((hr + 2.0) * k - dist3, dist3 - (hr + 10.0) * k)
        shell = np.where(side * (X - side * hx * k) < 8.0 * k, shell, np.inf)
        pieces.append((b, shell, shell <= -2.0))
    for (d0, d1), p, q, thick in sh.BARS:
        if d0 <= d <= d1:
            pts = np.array([[side * p[0], p[1]], [side * q[0], q[1]]], dtype=float) * k
            lo, hi = pts.min(axis=0) - thick * k, pts.max(axis=0) + thick * k
            b, X, Y = P.box(*(lo + hi) / 2, *(hi - lo) / 2)
            w = sh.polyline_distance(X, Y, pts) - thick * k / 2
            pieces.append((b, w, w <= -2.0))
    t = sh.ISCHIAL_TUBEROSITY
    return pieces + _ellipsoid(P, lvl, (side * t[0], *t[1:]), k)


def _midline_ellipse(keys, d, X, Y, k):
    p = sh.at_level(keys, d)
    if p is None:
        return None
    return sh.ellipse_sd(X, Y, p[0] * k, p[1] * k, p[2] * k, p[3] * k, 0.0)


def _paint(tissue: np.ndarray, pieces: list[Piece], outer: int, inner: int) -> None:
    """Union of bone pieces: every outline first, then every interior (no inner walls)."""
    for b, sd, _ in pieces:
        tissue[b][sd <= 0] = outer
    for b, sd, marrow in pieces:
        tissue[b][(sd <= 0) & marrow] = inner


def _muscles(a: Anatomy, d: float, P: _Plane, k: float, gap: float, inside: np.ndarray,
             tissue: np.ndarray) -> None:
    """Paint the muscles: each competitor (a label, or an unlabelled muscle) keeps its
    lowest signed distance; a pixel is muscle when it lies inside its best competitor
    by more than a fat plane's width beyond the second best."""
    shape = tissue.shape
    best = np.full(shape, np.inf, dtype=np.float32)
    second = np.full(shape, np.inf, dtype=np.float32)
    code = np.zeros(shape, dtype=np.uint8)
    sds: dict[int, list] = {}
    wob = _wobbles(a.shape_seed)
    for i, (label, _name, keys) in enumerate(sh.MUSCLES):
        p = sh.at_level(keys, d)
        if p is None:
            continue
        key = label if label else 100 + i
        for j, side in enumerate((-1, 1)):
            bulk = a.muscle_scale
            if side == a.oa_side and label in (3, 4, 5, 6, 7):
                bulk *= 1.0 - 0.3 * a.oa_severity
            x, y, ax, ay, ang = p
            cx = side * (x * k + (gap if x > 60 else 0.0))
            ax, ay = ax * k * bulk * MUSCLE_FILL, ay * k * bulk * MUSCLE_FILL
            ang = ang if side > 0 else 180.0 - ang
            w = wob[i, j]
            # Bounding box of the rotated ellipse, with room for the wobble.
            ca, sa = np.cos(np.radians(ang)), np.sin(np.radians(ang))
            rx = float(np.hypot(ax * ca, ay * sa)) * 1.15 + 3.0
            ry = float(np.hypot(ax * sa, ay * ca)) * 1.15 + 3.0
            b, X, Y = P.box(cx, y * k, rx, ry)
            sd = sh.ellipse_sd(X, Y, cx, y * k, ax, ay, ang,
                               (w[0], w[1] + w[4] * d, 0.6 * w[0], w[3] - w[4] * d))
            sds.setdefault(key, []).append((b, sd))
    for key, parts in sds.items():
        # Parts of one competitor merge (no fat plane inside the vasti or iliopsoas).
        r0, r1 = min(b[0].start for b, _ in parts), max(b[0].stop for b, _ in parts)
        c0, c1 = min(b[1].start for b, _ in parts), max(b[1].stop for b, _ in parts)
        own = np.full((r1 - r0, c1 - c0), np.inf, dtype=np.float32)
        for b, sd in parts:
            sub = (slice(b[0].start - r0, b[0].stop - r0), slice(b[1].start - c0, b[1].stop - c0))
            own[sub] = np.minimum(own[sub], sd)
        u = (slice(r0, r1), slice(c0, c1))
        bu, su = best[u], second[u]
        better = own < bu
        second[u] = np.where(better, bu, np.minimum(su, own))
        code[u] = np.where(better, np.uint8(min(key, 255)), code[u])
        best[u] = np.where(better, own, bu)
    with np.errstate(invalid="ignore"):
        muscle = inside & (best < 0) & (second - best > 2.0 * a.fat_plane_mm)
    tissue[muscle] = np.where(code[muscle] >= 100, OTHER_MUSCLE, code[muscle])


def render_slice(a: Anatomy, z: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Tissue codes (uint8, (len(ys), len(xs))) of the axial plane at ``z`` (mm).

    ``xs`` and ``ys`` are the increasing column (x) and row (y) coordinates in mm.
    """
    k = a.frame
    d = -z / k  # anatomical level: mm below the crest of an average adult
    P = _Plane(xs, ys)
    tissue = np.zeros((len(ys), len(xs)), dtype=np.uint8)
    # Thighs move apart with the patient's leg gap, fully so below the gluteal fold.
    gap = a.leg_gap_mm / 2 * float(np.clip((d - 150.0) / 60.0, 0.0, 1.0))
    env_scale = k * (0.55 + 0.45 * a.muscle_scale)
    comp = np.full(tissue.shape, np.inf, dtype=np.float32)
    shells = []
    p = sh.at_level(sh.PELVIS_ENVELOPE, d)
    if p is not None:
        shells.append((0.0, p))
    p = sh.at_level(sh.THIGH_ENVELOPE, d)
    if p is not None:
        shells += [(side * (p[0] * k + gap), p) for side in (-1, 1)]
    for cx, p in shells:
        ax, ay = p[2] * env_scale, p[3] * env_scale
        b, X, Y = P.box(cx, p[1] * k, ax + a.fat_mm + 4, ay + a.fat_mm + 4)
        comp[b] = np.minimum(comp[b], sh.ellipse_sd(X, Y, cx, p[1] * k, ax, ay, 0.0))
    if not shells:
        return tissue
    tissue[comp <= a.fat_mm] = FAT
    inside = comp <= 0
    p = sh.at_level(sh.VISCERA, d)
    if p is not None:
        b, X, Y = P.box(0.0, p[1] * k, p[2] * k + 2, p[3] * k + 2)
        visc = sh.ellipse_sd(X, Y, 0.0, p[1] * k, p[2] * k, p[3] * k, 0.0) <= 0
        tissue[b][visc & inside[b]] = VISCERA
    _muscles(a, d, P, k, gap, inside, tissue)
    # Femoral vessels in a fat sheath.
    v = sh.at_level(sh.ARTERY, d)
    if v is not None:
        for side in (-1, 1):
            ax_, ay_ = side * (v[0] * k + (gap if v[0] > 60 else 0)), v[1] * k
            vx, vy = ax_ + side * sh.VEIN_OFFSET[0] * k, ay_ + sh.VEIN_OFFSET[1] * k
            b, X, Y = P.box((ax_ + vx) / 2, (ay_ + vy) / 2, 12.0 * k + 4)
            ra, rv = np.hypot(X - ax_, Y - ay_), np.hypot(X - vx, Y - vy)
            sub, ins = tissue[b], inside[b]
            sub[ins & ((ra <= sh.ARTERY_R * k + 2.5) | (rv <= sh.VEIN_R * k + 2.5))] = FAT
            sub[ins & (rv <= sh.VEIN_R * k)] = VEIN
            sub[ins & (ra <= sh.ARTERY_R * k)] = ARTERY
    # Bones over everything.
    for keys, code in ((sh.VERTEBRA, VERTEBRA), (sh.SACRUM, PELVIS)):
        p = sh.at_level(keys, d)
        if p is not None:
            b, X, Y = P.box(0.0, p[1] * k, p[2] * k + 2, p[3] * k + 2)
            sd = sh.ellipse_sd(X, Y, 0.0, p[1] * k, p[2] * k, p[3] * k, 0.0)
            tissue[b][sd <= 0] = code
            tissue[b][sd <= -2.0] = PELVIS_MARROW if code == PELVIS else VERTEBRA
    P = _Plane(xs, ys)
    for side in (-1, 1):
        _paint(tissue, _pelvis(d, P, side, k), PELVIS, PELVIS_MARROW)
        pieces, stem = _femur(a, d, P, side, k)
        _paint(tissue, pieces, FEMUR, FEMUR_MARROW)
        if a.prosthesis_side == side:
            _prosthesis(d, P, side, k, tissue, stem)
    return tissue


def _prosthesis(d: float, P: _Plane, side: int, k: float, tissue: np.ndarray,
                stem: list[Piece]) -> None:
    """Total hip arthroplasty: metal head in a polyethylene liner and metal cup; stem."""
    hx, hy, hd, hr = sh.HEAD
    dz = (d - hd) * k
    if abs(dz) < (hr + 4.0) * k:
        b, X, Y = P.box(side * hx * k, hy * k, (hr + 5.0) * k)
        dist3 = np.sqrt((X - side * hx * k) ** 2 + (Y - hy * k) ** 2 + dz**2)
        sub = tissue[b]
        medial = side * (X - side * hx * k) < 8.0 * k
        sub[(dist3 <= (hr + 4.0) * k) & (dist3 > (hr + 1.0) * k) & medial] = METAL_CUP
        sub[(dist3 <= (hr + 1.0) * k) & (dist3 > 14.0 * k)] = POLY
        sub[dist3 <= 14.0 * k] = METAL_FEMUR
    for b, sd, _ in stem:
        tissue[b][sd <= 0] = METAL_FEMUR


def labels_of(tissue: np.ndarray) -> np.ndarray:
    """Ground-truth labels (0..10) from a tissue-code map."""
    lab = np.where(tissue <= len(STRUCTURES), tissue, 0).astype(np.uint8)
    for code, label in LABEL_OF.items():
        lab[tissue == code] = label
    return lab
