"""Which code made an output: a digest of source files, for the stages' own reuse checks,
and the git commit of the working tree (with whether it is dirty), which tags every run."""

from __future__ import annotations

import hashlib
import subprocess
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


def git_commit() -> str:
    """The commit of the working tree (registry evidence, run tags); "unknown" outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def git_dirty() -> bool:
    """Whether tracked files differ from the commit; ``dvc.lock`` does not count, as
    ``dvc repro`` rewrites it after every stage (every later run would be "dirty")."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--",
             ":(top)", ":(top,exclude)dvc.lock"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(out.stdout.strip())
