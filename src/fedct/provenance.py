"""Which code made an output: a digest of source files, for the stages' own reuse checks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType


def source_digest(*modules: ModuleType) -> str:
    """SHA-256 over the source of ``modules``: a module's file, or every ``.py`` file of a
    package (recursively), in a fixed order. A checkpoint or cached output made by other
    code then no longer matches."""
    files: list[Path] = []
    for module in modules:
        path = Path(module.__file__)
        files += sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
