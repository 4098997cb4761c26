"""fedct models as MLflow ``pyfunc`` models, loaded by this module: nothing is pickled.

``fedct.tracking.log_fedct_model`` logs a model folder (``model.safetensors`` +
``model_card.json``) with ``loader_module="fedct.model.pyfunc"``: MLflow stores the two
files and the module's name, and ``mlflow.pyfunc.load_model`` imports this module from
the installed fedct and calls ``_load_pyfunc`` (MLflow's name for the loader's entry
point) on the folder. The weights load through ``fedct.model.io.load_model`` (digest
checked against the card), with dropout intact for MC sampling. No mlflow import here.

What a logged model declares besides its files (its predict params and requirements) is
in :mod:`fedct.logged_model`, which tracking reads without importing torch or this
package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedct.errors import FedctError
from fedct.logged_model import default_params
from fedct.model.io import CARD_FILE, WEIGHTS_FILE, load_model


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
