"""From a plan to real low-precision kernels: ONNX QDQ export for ONNX Runtime."""

from ohq_lightning.deploy.onnx_qdq import (
    ActivationRange,
    QDQBuilder,
    activation_ranges,
    export_onnx,
    layer_nodes,
    quantize_onnx_layers,
    quantize_weight_per_channel,
)
from ohq_lightning.deploy.ort import DeployedModel, convert, measure_latency, uniform

__all__ = [
    "ActivationRange",
    "DeployedModel",
    "QDQBuilder",
    "activation_ranges",
    "convert",
    "export_onnx",
    "layer_nodes",
    "measure_latency",
    "quantize_onnx_layers",
    "quantize_weight_per_channel",
    "uniform",
]
