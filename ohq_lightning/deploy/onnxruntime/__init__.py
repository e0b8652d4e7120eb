"""The ONNX Runtime runtime: a plan as a QDQ graph on ORT's int8 CPU kernels (u8 activations, s8 weights).

``export`` (the float graph and its layers), ``ranges`` (calibrated activation ranges), ``weights``
(integer weights), ``qdq`` (the QDQ builder), ``session`` (inference sessions), ``op_graphs``
(one-op graphs for timing) and ``convert`` (plan -> :class:`DeployedModel`).
"""

from ohq_lightning.deploy.learned import input_qparams
from ohq_lightning.deploy.onnxruntime.convert import DeployedModel, convert, learned_grids, uniform
from ohq_lightning.deploy.onnxruntime.export import export_onnx, layer_nodes
from ohq_lightning.deploy.onnxruntime.op_graphs import ORT_KERNELS, layer_graph, transition_graph
from ohq_lightning.deploy.onnxruntime.qdq import QDQBuilder, quantize_onnx_layers
from ohq_lightning.deploy.onnxruntime.ranges import ActivationRange, activation_ranges
from ohq_lightning.deploy.onnxruntime.session import ORT_DISABLED_OPTIMIZERS, ort_runner, ort_session
from ohq_lightning.deploy.onnxruntime.weights import FixedQuantization, quantize_weight_per_channel

__all__ = [
    "ORT_DISABLED_OPTIMIZERS",
    "ORT_KERNELS",
    "ActivationRange",
    "DeployedModel",
    "FixedQuantization",
    "QDQBuilder",
    "activation_ranges",
    "convert",
    "export_onnx",
    "input_qparams",
    "layer_graph",
    "layer_nodes",
    "learned_grids",
    "ort_runner",
    "ort_session",
    "quantize_onnx_layers",
    "quantize_weight_per_channel",
    "transition_graph",
    "uniform",
]
