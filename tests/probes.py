"""Functions run inside worker processes by tests: this module imports nothing, so a
worker that runs them imports nothing because of them."""

from __future__ import annotations

import sys

HEAVY = ("torch", "monai", "mlflow", "pandas", "matplotlib", "pydicom")


def heavy_modules() -> list[str]:
    """The HEAVY modules this process has imported."""
    return sorted(m for m in HEAVY if m in sys.modules)


def fedct_modules() -> list[str]:
    return sorted(m for m in sys.modules if m.startswith("fedct."))
