"""From a plan to real low-precision kernels: ONNX Runtime (QDQ graphs) and torch (FX int8), measured end to end."""

from ohq_lightning.deploy.onnx_qdq import (
    ActivationRange,
    FixedQuantization,
    QDQBuilder,
    activation_ranges,
    export_onnx,
    input_qparams,
    layer_nodes,
    quantize_onnx_layers,
    quantize_weight_per_channel,
)
from ohq_lightning.deploy.ort import DeployedModel, SupportsRunner, convert, learned_grids, measure_latency, uniform
from ohq_lightning.deploy.runtimes import RUNTIMES, deploy_plan, deploy_uniform

__all__ = [
    "RUNTIMES",
    "ActivationRange",
    "DeployedModel",
    "FixedQuantization",
    "QDQBuilder",
    "SupportsRunner",
    "activation_ranges",
    "convert",
    "deploy_plan",
    "deploy_uniform",
    "export_onnx",
    "input_qparams",
    "layer_nodes",
    "learned_grids",
    "measure_latency",
    "quantize_onnx_layers",
    "quantize_weight_per_channel",
    "uniform",
]
