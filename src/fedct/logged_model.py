"""What a logged fedct model declares besides its files, without torch or mlflow.

A fedct model is logged to MLflow (``fedct.tracking.log_fedct_model``) as a ``pyfunc``
model whose loader is :data:`LOADER_MODULE` (``fedct.model.pyfunc``, which needs torch).
Logging it needs two more things, both here so that tracking reads them without importing
the model package (which would put ``src/fedct/model`` among the DVC deps of every stage
that logs to MLflow):

- the inference parameters of ``FedctPyfunc.predict`` with their defaults
  (``default_params``): MLflow's params schema is built from them, so that
  ``predict(x, params={"mc_samples": 20})`` reaches the model;
- installable requirements (``requirements``): fedct is on no package index, so its own
  wheel travels with the model.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from fedct.errors import FedctError

#: MLflow's loader of a logged fedct model (imported from the installed fedct on load).
LOADER_MODULE = "fedct.model.pyfunc"
WHEELS_DIR = "wheels"  # beside the weights in the logged model's data folder
PINNED = ("torch", "monai", "safetensors", "numpy")


def card_mc_samples(card: dict) -> int:
    """T of MC dropout the model was calibrated with: the failure threshold's, else the
    card's, else 10."""
    failure = card.get("failure") or {}
    return int(failure.get("mc_samples") or card.get("mc_samples") or 10)


def default_params(card: dict) -> dict[str, int | str]:
    """The inference parameters of ``FedctPyfunc.predict`` with their defaults:
    ``mc_samples`` (T, the card's), ``device`` (a torch device name) and ``seed``."""
    return {"mc_samples": card_mc_samples(card), "device": "cpu", "seed": 0}


def _source_root() -> Path | None:
    """The fedct source tree this module runs from (an editable install or a checkout),
    None when fedct runs from an installed wheel."""
    root = Path(__file__).resolve().parents[2]  # src/fedct/logged_model.py
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "fedct"' in pyproject.read_text():
        return root
    return None


@functools.cache
def _wheel() -> tuple[str, bytes] | None:
    """fedct's wheel, built once per process from a copy of the source tree (the tree is
    left as it is: setuptools writes build/ and egg-info where it builds); None from an
    installed wheel, whose files are not a source tree."""
    root = _source_root()
    if root is None:
        return None
    with tempfile.TemporaryDirectory(prefix="fedct-wheel-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(root / "src", src / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for f in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / f).is_file():
                shutil.copy(root / f, src / f)
        out = Path(tmp) / "dist"
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                               "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
                              capture_output=True, text=True, timeout=300)
        wheels = sorted(out.glob("fedct-*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise FedctError("could not build fedct's wheel for the logged model: "
                             + (proc.stderr.strip().splitlines() or ["no wheel"])[-1])
        return wheels[0].name, wheels[0].read_bytes()


def _pin(name: str) -> str:
    return f"{name}=={metadata.version(name).split('+')[0]}"  # 2.13.0+cpu -> 2.13.0


def requirements(data_dir: Path) -> list[str]:
    """pip requirements of a logged model whose data folder is ``data_dir`` (its name is
    the folder's name under the model's ``data/``): the installed versions of fedct's
    inference dependencies, and fedct itself as its wheel, written to
    ``data_dir/wheels/`` and named by a path relative to the model's folder (MLflow
    installs a model's requirements from that folder). Without a source tree to build
    from: ``fedct==<version>``, to install from the wheel fedct was installed from."""
    reqs = [_pin(name) for name in PINNED]
    wheel = _wheel()
    if wheel is None:
        return [*reqs, _pin("fedct")]
    name, data = wheel
    (data_dir / WHEELS_DIR).mkdir(exist_ok=True)
    (data_dir / WHEELS_DIR / name).write_bytes(data)
    return [*reqs, f"./data/{data_dir.name}/{WHEELS_DIR}/{name}"]
