"""From a plan to real low-precision kernels: ONNX Runtime (QDQ graphs) and torch (FX int8), measured end to end.

``runtime`` holds the :class:`Runtime` protocol, the :data:`RUNTIMES` registry and the entry points
(:func:`deploy_plan`, :func:`deploy_uniform`, :func:`measure_latency`); ``onnxruntime`` and
``torch_fx`` are the two runtimes; ``base``, ``learned`` and ``example_call`` (the model called the way
its example input calls it, for every export and trace) what they share.
"""

from ohq_lightning.deploy.base import BaseDeployedModel, SupportsRunner, uniform_assignment
from ohq_lightning.deploy.example_call import ExampleCall
from ohq_lightning.deploy.learned import input_qparams
from ohq_lightning.deploy.onnxruntime import (
    ORT_DISABLED_OPTIMIZERS,
    ORT_KERNELS,
    ActivationRange,
    DeployedModel,
    FixedQuantization,
    QDQBuilder,
    activation_ranges,
    convert,
    export_onnx,
    layer_graph,
    layer_nodes,
    learned_grids,
    ort_runner,
    ort_session,
    quantize_onnx_layers,
    quantize_weight_per_channel,
    transition_graph,
    uniform,
)
from ohq_lightning.deploy.runtime import (
    RUNTIMES,
    Runtime,
    deploy_plan,
    deploy_uniform,
    get_runtime,
    measure_latency,
    register_runtime,
)
from ohq_lightning.deploy.torch_fx import (
    ENGINES,
    TorchDeployedModel,
    TorchInt8Builder,
    convert_torch,
    quantized_engine,
    uniform_torch,
)

__all__ = [
    "ENGINES",
    "ORT_DISABLED_OPTIMIZERS",
    "ORT_KERNELS",
    "RUNTIMES",
    "ActivationRange",
    "BaseDeployedModel",
    "DeployedModel",
    "ExampleCall",
    "FixedQuantization",
    "QDQBuilder",
    "Runtime",
    "SupportsRunner",
    "TorchDeployedModel",
    "TorchInt8Builder",
    "activation_ranges",
    "convert",
    "convert_torch",
    "deploy_plan",
    "deploy_uniform",
    "export_onnx",
    "get_runtime",
    "input_qparams",
    "layer_graph",
    "layer_nodes",
    "learned_grids",
    "measure_latency",
    "ort_runner",
    "ort_session",
    "quantize_onnx_layers",
    "quantize_weight_per_channel",
    "quantized_engine",
    "register_runtime",
    "transition_graph",
    "uniform",
    "uniform_assignment",
    "uniform_torch",
]
