"""Fake-quant modules, the plan swap, and calibration."""

from ohq_lightning.quant.export import LearnedQuantization, learned_quantization
from ohq_lightning.quant.fake_quant import ActivationFakeQuant, FloatCast, WeightFakeQuant, fake_quantize, round_ste
from ohq_lightning.quant.modules import QuantLayer
from ohq_lightning.quant.swap import apply_plan, calibrate, quantized_layers, strip_plan

__all__ = [
    "ActivationFakeQuant",
    "FloatCast",
    "LearnedQuantization",
    "QuantLayer",
    "WeightFakeQuant",
    "apply_plan",
    "calibrate",
    "fake_quantize",
    "learned_quantization",
    "quantized_layers",
    "round_ste",
    "strip_plan",
]
