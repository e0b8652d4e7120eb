"""From a plan to real low-precision kernels: ONNX QDQ export for ONNX Runtime."""

from ohq_lightning.deploy.onnx_qdq import (
    ActivationRange,
    activation_ranges,
    export_onnx,
    layer_nodes,
    quantize_onnx_layers,
)

__all__ = ["ActivationRange", "activation_ranges", "export_onnx", "layer_nodes", "quantize_onnx_layers"]
