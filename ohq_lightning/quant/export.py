"""The quantization a fake-quant model has learned, read out for deployment to real kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ohq_lightning.quant.fake_quant import ActivationFakeQuant, WeightFakeQuant
from ohq_lightning.quant.swap import quantized_layers

__all__ = ["LearnedQuantization", "learned_quantization"]


@dataclass(frozen=True)
class LearnedQuantization:
    """The step sizes one fake-quant layer uses, so that a deployed kernel can use the same grid.

    Attributes:
        option: the layer's option name, e.g. ``"w4a8"``.
        weight_bits: bits of the symmetric per-channel weight grid (``None`` for float options).
        weight_scale: one positive step size per output channel (1-D, float32), or ``None``.
        act_bits: bits of the per-tensor input grid (``None`` when the input stays float).
        input_scale: the input step size, or ``None`` when the quantizer was never calibrated.
        input_signed: whether the input grid is signed (``[-2^(b-1), 2^(b-1)-1]``, zero point 0) or
            unsigned (``[0, 2^b - 1]``, zero point 0); ``None`` when uncalibrated.
    """

    option: str
    weight_bits: int | None
    weight_scale: torch.Tensor | None
    act_bits: int | None
    input_scale: float | None
    input_signed: bool | None


def learned_quantization(model: nn.Module) -> dict[str, LearnedQuantization]:
    """The learned step sizes of every fake-quant layer of ``model``, by layer name.

    Step sizes are read as the forward uses them (``exp(log_scale)``, at least 1e-8), detached
    and on the CPU. A model with no plan applied gives an empty mapping.

    Example:
        >>> from ohq_lightning.quant import apply_plan
        >>> model = apply_plan(torch.nn.Sequential(torch.nn.Linear(4, 2)), {"0": "w4a8"})
        >>> learned_quantization(model)["0"].weight_scale.shape
        torch.Size([2])
    """
    found: dict[str, LearnedQuantization] = {}
    for name, layer in quantized_layers(model).items():
        weight_bits = weight_scale = act_bits = input_scale = input_signed = None
        if isinstance(layer.weight_quantizer, WeightFakeQuant):
            weight_bits = layer.weight_quantizer.bits
            weight_scale = layer.weight_quantizer.scale.detach().reshape(-1).float().cpu()
        if isinstance(layer.input_quantizer, ActivationFakeQuant):
            quantizer = layer.input_quantizer
            act_bits = quantizer.bits
            if bool(quantizer.calibrated):
                input_scale = float(quantizer.scale.detach())
                input_signed = bool(quantizer.signed)
        found[name] = LearnedQuantization(layer.option, weight_bits, weight_scale, act_bits, input_scale, input_signed)
    return found
