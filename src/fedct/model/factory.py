"""The model of a training configuration: its architecture (saved with the weights) and
the untrained network. Every fedct model, local, pooled or federated, is built here."""

from __future__ import annotations

import torch

from fedct.config import TrainParams
from fedct.data.labels import LabelSet
from fedct.model.io import architecture, build_from_arch


def model_arch(params: TrainParams, labels: LabelSet) -> dict:
    """The architecture of ``params`` for ``labels`` (saved with the model)."""
    return architecture(labels.n_classes, params.channels, params.strides, params.dropout,
                        params.num_res_units, dropout_depth=params.dropout_depth)


def build_model(params: TrainParams, labels: LabelSet) -> torch.nn.Module:
    """A fresh network of ``model_arch(params, labels)`` (weights from torch's generator)."""
    return build_from_arch(model_arch(params, labels))
