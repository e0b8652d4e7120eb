"""Checks every sensitivity scorer makes of its model and layers (internal to :mod:`ohq_lightning.sensitivity`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ohq_lightning.plan import LayerInfo
from ohq_lightning.quant.swap import quantized_layers

__all__ = ["check_float_model", "find_layers", "layer_names", "weighted_float_layers"]


def layer_names(layers: Sequence[LayerInfo] | Sequence[str]) -> list[str]:
    """The names of ``layers``, given as ``LayerInfo`` or as names."""
    return [layer.name if isinstance(layer, LayerInfo) else str(layer) for layer in layers]


def check_float_model(model: nn.Module, who: str) -> None:
    """Refuse a model holding fake-quant layers: scores are of the float model (``who`` says whose, in the error)."""
    quantized = sorted(quantized_layers(model))
    if quantized:
        raise ValueError(f"the model has fake-quant layers {quantized}: strip_plan(model) first: {who} the float model")


def find_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Name -> module for each of ``names``; a name the model lacks is a ``ValueError``."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"the model has no layers named {missing}")
    return {name: modules[name] for name in names}


def weighted_float_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The layers a weight-based baseline scores: float model, every name found, each with a weight tensor."""
    check_float_model(model, "baselines score")
    modules = find_layers(model, names)
    not_weighted = [name for name in names if not isinstance(getattr(modules[name], "weight", None), torch.Tensor)]
    if not_weighted:
        raise ValueError(f"layers {not_weighted} have no weight tensor to quantize")
    return modules
