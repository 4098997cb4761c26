"""fedct models as MLflow ``pyfunc`` models, loaded by this module: nothing is pickled.

``fedct.tracking.log_fedct_model`` logs a model folder (``model.safetensors`` +
``model_card.json``) with ``loader_module="fedct.model.pyfunc"``: MLflow stores the two
files and the module's name, and ``mlflow.pyfunc.load_model`` imports this module from
the installed fedct and calls ``_load_pyfunc`` (MLflow's name for the loader's entry
point) on the folder. The weights load through ``fedct.model.io.load_model`` (digest
checked against the card), with dropout intact for MC sampling. No mlflow import here.

What a logged model needs besides its files is here too: the inference parameters
(``default_params``: MLflow's params schema is built from them, so that
``predict(x, params={"mc_samples": 20})`` reaches ``FedctPyfunc.predict``) and installable
requirements (``requirements``: fedct is on no package index, so its own wheel travels
with the model).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from fedct.errors import FedctError
from fedct.model.io import CARD_FILE, WEIGHTS_FILE, load_model

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


class FedctPyfunc:
    """A fedct Bayesian U-Net. ``predict``: a preprocessed image ``(X, Y, Z)`` or
    ``(1, X, Y, Z)`` (normalised as the card's ``preprocessing`` says) -> MC-dropout
    softmax samples ``(T, C, X, Y, Z)`` on the CPU; ``params`` as ``default_params``."""

    def __init__(self, folder: Path) -> None:
        self.model, self.card = load_model(Path(folder))

    def get_raw_model(self):
        """The torch module (MLflow's ``PyFuncModel.get_raw_model``)."""
        return self.model

    # No type hints: MLflow would read them as an input schema it cannot express.
    def predict(self, model_input, params=None):
        import numpy as np
        import torch

        from fedct.devices import pick_device
        from fedct.model.mc import mc_predict

        given = {k: v for k, v in (params or {}).items() if v is not None}
        unknown = set(given) - set(default_params(self.card))
        if unknown:
            raise FedctError(f"pyfunc predict: unknown params {sorted(unknown)}")
        p = {**default_params(self.card), **given}
        n = int(p["mc_samples"])
        if not 1 <= n <= 1000:
            raise FedctError(f"pyfunc predict: mc_samples {n} is not in 1..1000")
        device = pick_device(str(p["device"]))
        model = self.model.to(device)
        image = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if image.ndim == 3:
            image = image[None]
        return mc_predict(model, image.to(device), n, seed=int(p["seed"]),
                          output_device="cpu").numpy()


def _load_pyfunc(data_path: str) -> Any:
    """MLflow's entry point: the model in ``data_path`` (the logged folder, or a folder
    above it)."""
    root = Path(data_path)
    if not (root / WEIGHTS_FILE).is_file():
        found = sorted(p.parent for p in root.rglob(WEIGHTS_FILE)
                       if (p.parent / CARD_FILE).is_file())
        root = found[0] if found else root
    return FedctPyfunc(root)


def _source_root() -> Path | None:
    """The fedct source tree this module runs from (an editable install or a checkout),
    None when fedct runs from an installed wheel."""
    root = Path(__file__).resolve().parents[3]
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
