"""When a multi-round federation stops: a plateau of the server's validation metric.

A round improves on the best so far when its value is higher by more than ``min_delta``
(``federate.min_delta``): at the schedule's small end rate the mean validation Dice drifts
by a few 1e-4 a round, which is no plateau's end.

The server's metric is the mean over clients of each client's validation Dice of the merged
model (``val_dice_mean`` of a round's history record): the clients' validation splits, no
held-out site. A federation stops after ``patience`` completed rounds without a higher value
than the best so far (0: it runs every round up to the cap), and keeps the best round's model,
as a local model keeps its best validation checkpoint (``fedct.training.loop``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def best_round(values: Sequence[float], min_delta: float = 0.0) -> int | None:
    """The 1-based round of the last improvement: a finite value above the best so far by
    more than ``min_delta`` (0: any higher value; the first of equals); None if none."""
    best, best_val = None, -math.inf
    for i, v in enumerate(values, start=1):
        if v is not None and math.isfinite(float(v)) and float(v) > best_val + min_delta:
            best, best_val = i, float(v)
    return best


def plateau_reached(values: Sequence[float], patience: int, min_delta: float = 0.0) -> bool:
    """True once ``patience`` rounds have passed since the best round (``patience`` > 0).

    Rounds without a finite value (no client returned a validation Dice) count as rounds
    without improvement; with no finite value at all, the federation never stops early."""
    if patience <= 0:
        return False
    best = best_round(values, min_delta)
    return best is not None and len(values) - best >= patience
