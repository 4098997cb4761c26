"""The tiny hand-made cohort the stage tests share: labels, grid and one case."""

from __future__ import annotations

import numpy as np

LABELS = {"0": "background", "1": "muscle", "2": "femur"}
SPEC = {"spacing_mm": [2.0, 2.0, 2.0], "roi_size": [12, 12, 16], "hu_min": -200.0,
        "hu_max": 1000.0}
PATIENT = "PATIENT-SECRET-4711"  # a patient key that must reach no output


def tiny_case(rng: np.random.Generator, contrast: float = 0.3,
              noise: float = 0.03) -> dict[str, np.ndarray]:
    """A (1, 12, 12, 16) image in [0, 1] with a muscle block and a bone block; ``contrast``
    is the intensity step per label value, ``noise`` the Gaussian noise's SD."""
    label = np.zeros((1, 12, 12, 16), dtype=np.uint8)
    label[0, 2:10, 2:10, 2:14] = 1
    label[0, 4:7, 4:7, 4:12] = 2
    image = (0.2 + contrast * label + rng.normal(0, noise, label.shape)).astype(np.float32)
    return {"image": np.clip(image, 0, 1), "label": label}
