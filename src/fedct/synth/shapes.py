"""Where each structure of the hip and thigh lies, level by level (adult proportions).

Levels are ``d``, mm below the iliac crest of an average adult (knee joint at d ~ 500);
a patient's frame size stretches them. In-plane positions are for the patient's left
side: ``x`` mm lateral of the midline, ``y`` mm posterior (negative = anterior), as in
DICOM LPS; the right side mirrors them. Muscles and the body envelope are ellipses
``(d, x, y, ax, ay, angle)`` whose centre, semi-axes (mm) and orientation (degrees of
``ax`` from +x) are interpolated linearly between keyframes; a structure exists only
between its first and last keyframe. Values follow standard cross-sectional anatomy
(e.g. femoral head centre ~105 mm below the crest, lesser trochanter ~170 mm, ischial
tuberosity ~160 mm; femoral heads ~180 mm apart).
"""

from __future__ import annotations

import numpy as np

Key = tuple[float, float, float, float, float, float]

# Muscle parts: (label, tissue name, keyframes). Several parts may share a label (the
# vasti; psoas + iliacus); label 0 marks muscles that exist but are not labelled.
# fmt: off
MUSCLES: tuple[tuple[int, str, tuple[Key, ...]], ...] = (
    (3, "gluteus_maximus", ((15, 75, 105, 31, 12, 20), (50, 95, 112, 69, 28, 25),
                            (100, 118, 92, 69, 38, 45), (150, 132, 68, 56, 38, 60),
                            (200, 148, 38, 31, 22, 70), (235, 150, 28, 10, 8, 70))),
    (4, "gluteus_medius_minimus", ((0, 150, 40, 19, 35, 80), (30, 160, 22, 28, 60, 78),
                                   (70, 150, 8, 30, 55, 72), (105, 152, -2, 20, 35, 75),
                                   (128, 150, 6, 8, 10, 80))),
    (5, "psoas", ((0, 42, 22, 18, 15, 60), (60, 55, 5, 18, 15, 45), (100, 72, -42, 16, 13, 20),
                  (140, 88, -40, 14, 12, 0), (168, 105, 4, 9, 9, 0), (180, 110, 10, 3, 3, 0))),
    (5, "iliacus", ((10, 98, 32, 30, 9, -50), (40, 92, 12, 40, 12, -55),
                    (75, 84, -12, 28, 13, -60), (100, 80, -34, 14, 11, -30),
                    (118, 82, -38, 4, 4, 0))),
    (6, "rectus_femoris", ((78, 110, -40, 5, 5, 0), (100, 112, -50, 9, 8, 0),
                           (150, 118, -64, 14, 11, 0), (250, 110, -62, 20, 14, 0),
                           (380, 95, -47, 16, 10, 0), (440, 92, -40, 6, 4, 0))),
    (7, "vastus_lateralis", ((132, 152, 10, 8, 10, 90), (170, 152, 0, 16, 30, 80),
                             (250, 151, -10, 22, 40, 70), (380, 134, -10, 18, 30, 70),
                             (450, 120, -5, 8, 12, 70))),
    (7, "vastus_intermedius", ((158, 126, -24, 12, 8, 0), (250, 121, -32, 22, 14, 0),
                               (400, 100, -30, 20, 12, 0), (450, 95, -25, 10, 6, 0))),
    (7, "vastus_medialis", ((180, 106, -18, 6, 8, 45), (260, 96, -32, 14, 18, 45),
                            (380, 80, -26, 24, 22, 45), (450, 76, -16, 20, 16, 45))),
    (8, "hamstrings", ((150, 62, 64, 8, 8, 0), (175, 72, 66, 14, 12, 30),
                       (220, 86, 60, 22, 18, 30), (300, 100, 46, 30, 22, 20),
                       (400, 95, 36, 26, 20, 0), (450, 95, 36, 15, 12, 0))),
    (9, "adductors", ((138, 35, -52, 8, 8, 0), (160, 46, -36, 18, 15, 30),
                      (200, 70, -14, 30, 24, 40), (260, 80, 6, 35, 30, 50),
                      (340, 76, 12, 28, 25, 50), (420, 80, 22, 12, 12, 50),
                      (440, 85, 26, 3, 3, 0))),
    (10, "sartorius", ((45, 122, -48, 5, 4, 0), (70, 117, -60, 9, 7, 0),
                       (120, 120, -76, 12, 8, 20), (200, 108, -84, 14, 9, 30),
                       (300, 86, -64, 15, 10, 60), (420, 66, -16, 14, 11, 80),
                       (450, 66, 0, 10, 9, 90))),
    (0, "tensor_fasciae_latae", ((60, 140, -32, 6, 6, 0), (120, 152, -38, 10, 8, 60),
                                 (200, 162, -22, 8, 6, 80), (230, 162, -16, 3, 3, 80))),
    (0, "gracilis", ((150, 22, -42, 8, 6, 0), (300, 46, 20, 10, 10, 0), (450, 60, 36, 8, 8, 0))),
    (0, "obturator_internus", ((100, 62, 10, 8, 20, 90), (140, 56, 16, 10, 24, 90),
                               (160, 55, 30, 5, 8, 90))),
)
# Deep fascia (everything inside is muscle, bone, vessels, viscera or intermuscular fat):
# a pelvic envelope centred on the midline and one envelope per thigh.
PELVIS_ENVELOPE: tuple[Key, ...] = (
    (-25, 0, 22, 158, 108, 0), (60, 0, 18, 172, 115, 0), (120, 0, 12, 178, 112, 0),
    (180, 0, 10, 155, 100, 0), (205, 0, 8, 95, 72, 0), (228, 0, 8, 30, 30, 0))
THIGH_ENVELOPE: tuple[Key, ...] = (
    (165, 106, 0, 68, 76, 0), (250, 102, 0, 70, 72, 0), (450, 86, 5, 54, 56, 0))
# Pelvic contents (bowel, bladder): fill the envelope where no muscle is.
VISCERA: tuple[Key, ...] = (
    (-25, 0, 0, 88, 56, 0), (60, 0, -8, 72, 50, 0), (110, 0, -22, 48, 38, 0),
    (140, 0, -25, 28, 22, 0), (155, 0, -25, 5, 5, 0))
# Femoral (external iliac above the groin) artery centreline (d, x, y); the vein lies
# medial and slightly posterior.
ARTERY: tuple[tuple[float, float, float], ...] = (
    (20, 36, -8), (80, 56, -38), (130, 70, -64), (200, 84, -58), (300, 80, -32),
    (400, 82, 10), (450, 86, 26))
ARTERY_R, VEIN_R, VEIN_OFFSET = 4.0, 5.5, (-9.0, 3.0)

# Bones. Femur: head sphere, neck cylinder, greater/lesser trochanter ellipsoids, shaft
# along a polyline with a level-dependent outer radius and cortex thickness.
HEAD = (90.0, -12.0, 105.0, 24.0)  # x, y, d, radius
NECK = ((90.0, -12.0, 105.0), (128.0, 2.0, 142.0), 15.0)
GREATER_TROCH = (140.0, 8.0, 125.0, 16.0, 22.0, 24.0)  # x, y, d, semi-axes x, y, d
LESSER_TROCH = (112.0, 15.0, 172.0, 9.0, 9.0, 10.0)
SHAFT = ((140, 130, 4, 22.0, 2.5), (200, 127, 2, 15.5, 5.0), (300, 116, -3, 13.5, 6.0),
         (420, 103, -6, 15.0, 4.0), (460, 100, -6, 20.0, 2.5))  # d, x, y, r_out, cortex
# Iliac wing: a curved plate through three control points (quadratic Bezier) per level,
# from the sacroiliac joint (P0) round the lateral wall (P1) to the anterior spine (P2).
WING = ((0, (40, 70), (150, 60), (130, -20), 10.0), (40, (45, 65), (150, 45), (125, -45), 6.0),
        (70, (55, 55), (125, 30), (105, -30), 8.0), (92, (66, 44), (100, 20), (95, -20), 14.0))
SACRUM = ((30, 0, 70, 50, 24), (80, 0, 85, 38, 18), (120, 0, 96, 18, 10))  # d, x, y, ax, ay
VERTEBRA = ((-25, 0, 10, 27, 19), (30, 0, 16, 25, 18))
# Bars (segments with a thickness), each existing between two levels: pubic rami,
# ischial ramus and the posterior column down to the ischial tuberosity.
BARS = (((110, 140), (80, -30), (8, -60), 16.0), ((135, 168), (10, -52), (55, 38), 10.0),
        ((110, 168), (76, 34), (62, 56), 18.0))
ISCHIAL_TUBEROSITY = (60.0, 56.0, 162.0, 18.0, 14.0, 14.0)
# fmt: on


_TABLES: dict[int, tuple[list[float], np.ndarray]] = {}


def at_level(keys: tuple[Key, ...] | tuple, d: float) -> np.ndarray | None:
    """Keyframe values linearly interpolated at level ``d``; None outside the range."""
    table = _TABLES.get(id(keys))
    if table is None:  # the tables above are module constants: convert them once
        table = _TABLES[id(keys)] = ([float(k[0]) for k in keys],
                                     np.array([k[1:] for k in keys], dtype=float))
    ds, cols = table
    if d < ds[0] or d > ds[-1]:
        return None
    i = min(int(np.searchsorted(ds, d, side="right")), len(ds) - 1)
    if i == 0:
        return cols[0].copy()
    w = (d - ds[i - 1]) / (ds[i] - ds[i - 1])
    return (1 - w) * cols[i - 1] + w * cols[i]


def bezier(p0, p1, p2, n: int = 16) -> np.ndarray:
    """(n, 2) points of the quadratic Bezier curve through control points p0..p2."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=float) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def wing_at(d: float):
    """Control points and thickness of the iliac wing at level ``d`` (or None)."""
    ds = [w[0] for w in WING]
    if d < ds[0] or d > ds[-1]:
        return None
    pts = [np.array([np.interp(d, ds, [np.asarray(w[j], dtype=float)[c] for w in WING])
                     for c in range(2)]) for j in (1, 2, 3)]
    return pts, float(np.interp(d, ds, [w[4] for w in WING]))


def polyline_distance(x: np.ndarray, y: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance (mm) from each point to the polyline through ``pts`` (n, 2)."""
    best = np.full(x.shape, np.inf)
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:], strict=True):
        dx, dy = bx - ax, by - ay
        u = (((x - ax) * dx + (y - ay) * dy) / max(dx * dx + dy * dy, 1e-9)).clip(0.0, 1.0)
        best = np.minimum(best, np.hypot(x - ax - u * dx, y - ay - u * dy))
    return best


def ellipse_sd(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float,
               angle_deg: float, wobble: tuple[float, float, float, float] = (0, 0, 0, 0)
               ) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to a rotated, wobbly ellipse.

    ``wobble = (a2, phase2, a3, phase3)`` deforms the outline by 2- and 3-lobed
    harmonics (relative amplitude), so muscles are blobs rather than exact ellipses.
    """
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    ax, ay = max(ax, 0.5), max(ay, 0.5)
    r = np.sqrt((u / ax) ** 2 + (v / ay) ** 2) + 1e-9
    if wobble[0] or wobble[2]:
        # cos(k theta + phase) from the polar angle's cosine and sine (no trigonometry
        # per pixel): multiple-angle formulas.
        c1, s1 = u / ax / r, v / ay / r
        c2, s2 = c1 * c1 - s1 * s1, 2.0 * c1 * s1
        c3, s3 = c1 * (4.0 * c1 * c1 - 3.0), s1 * (3.0 - 4.0 * s1 * s1)
        r = r / (1.0 + wobble[0] * (c2 * np.cos(wobble[1]) - s2 * np.sin(wobble[1]))
                 + wobble[2] * (c3 * np.cos(wobble[3]) - s3 * np.sin(wobble[3])))
    grad = np.sqrt((u / ax**2) ** 2 + (v / ay**2) ** 2) / r + 1e-9
    return (r - 1.0) / grad
