"""One-operation ONNX graphs in the patterns ONNX Runtime deploys, for timing on this device.

* ``fp32``: a float ``Conv`` (or ``Gemm``/``MatMul`` for a linear layer).
* ``int8``: the QDQ pattern with unsigned 8-bit activations and signed 8-bit per-channel weights
  (u8s8, the fast combination on x86): ``uint8 -> DequantizeLinear -> Conv(DequantizeLinear(W))
  -> QuantizeLinear -> uint8``, which ORT's graph optimiser fuses into its integer kernel
  (``QLinearConv``/``QGemm``). Input and output stay uint8, so the timing is the kernel alone;
  entering and leaving int8 are timed separately as transitions.
* ``quantize`` / ``dequantize``: one ``QuantizeLinear`` (float -> uint8) or ``DequantizeLinear``
  at an activation shape: the cost of a precision change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ohq_lightning.deploy.onnxruntime.weights import quantize_weight_per_channel
from ohq_lightning.plan import LayerInfo

__all__ = ["ORT_KERNELS", "layer_graph", "transition_graph"]

ORT_KERNELS = ("fp32", "int8")
_OPSET = 17


def _onnx() -> tuple[Any, Any, Any, Any]:
    try:  # deferred: onnx is heavy to import
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as error:  # pragma: no cover - onnx is a dependency
        raise ImportError("the onnxruntime runtime needs the 'onnx' and 'onnxruntime' packages") from error
    return onnx, TensorProto, helper, numpy_helper


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], initializers: list[Any]) -> Any:
    onnx, _, helper, _ = _onnx()
    graph = helper.make_graph(nodes, "ohq_op", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@dataclass
class _Operands:
    """The tensors around a layer's core op: its initializers, the nodes before it, and the names it reads."""

    x: str
    w: str
    bias: str | None
    x_type: int
    y_type: int
    feed: np.ndarray
    core_out: str
    inits: list[Any] = field(default_factory=list)
    pre_nodes: list[Any] = field(default_factory=list)


def layer_graph(layer: LayerInfo, kernel: str, *, seed: int = 0) -> tuple[Any, dict[str, np.ndarray]]:
    """The ONNX graph of one layer at ``kernel`` (``"fp32"`` or ``"int8"``) and an input feed for it."""
    if kernel not in ORT_KERNELS:
        raise ValueError(f"unknown ONNX Runtime kernel {kernel!r}; use one of {ORT_KERNELS}")
    _, _, helper, _ = _onnx()
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(layer.weight_shape).astype(np.float32) * 0.05
    conv = layer.kind != "linear"
    linear_2d = not conv and len(layer.in_shape) == 2
    make = _float_operands if kernel == "fp32" else _int8_operands
    ops = make(layer, weight, rng, conv=conv, linear_2d=linear_2d)
    core_inputs = [ops.x, ops.w] + ([ops.bias] if ops.bias is not None else [])
    if conv:
        attrs = {
            "kernel_shape": layer.weight_shape[2:],
            "strides": layer.stride,
            "pads": layer.padding,
            "dilations": layer.dilation,
            "group": layer.groups,
        }
        core = [helper.make_node("Conv", core_inputs, [ops.core_out], **attrs)]
    elif linear_2d:
        core = [helper.make_node("Gemm", core_inputs, [ops.core_out], transB=1)]
    else:
        core = [helper.make_node("MatMul", [ops.x, ops.w], [ops.core_out])]
    post = [] if kernel == "fp32" else [helper.make_node("QuantizeLinear", ["y_f", "y_scale", "y_zp"], ["y"])]
    model = _model(
        ops.pre_nodes + core + post,
        [helper.make_tensor_value_info("x", ops.x_type, layer.in_shape)],
        [helper.make_tensor_value_info("y", ops.y_type, layer.out_shape)],
        ops.inits,
    )
    return model, {"x": ops.feed}


def _float_operands(
    layer: LayerInfo, weight: np.ndarray, rng: np.random.Generator, *, conv: bool, linear_2d: bool
) -> _Operands:
    """Float weight (transposed for ``MatMul``) and zero bias, a float input."""
    _, tp, _, numpy_helper = _onnx()
    has_bias = layer.bias_numel > 0
    ops = _Operands("x", "w", "b" if has_bias else None, tp.FLOAT, tp.FLOAT, np.empty(0), "y")
    ops.inits.append(numpy_helper.from_array(weight if conv or linear_2d else weight.T.copy(), "w"))
    if has_bias:
        ops.inits.append(numpy_helper.from_array(np.zeros(layer.weight_shape[0], np.float32), "b"))
    ops.feed = rng.standard_normal(layer.in_shape).astype(np.float32)
    return ops


def _int8_operands(
    layer: LayerInfo, weight: np.ndarray, rng: np.random.Generator, *, conv: bool, linear_2d: bool
) -> _Operands:
    """u8 input and s8 per-channel weight behind DequantizeLinear (int32 bias for Conv/Gemm), a uint8 input."""
    _, tp, helper, numpy_helper = _onnx()
    out_features = layer.weight_shape[0]
    w_q, w_scale = quantize_weight_per_channel(weight, 8)
    axis = 0
    if not conv and not linear_2d:  # MatMul takes W as [in, out]: per-column scales
        w_q, axis = w_q.T.copy(), 1
    x_scale = np.float32(0.05)
    ops = _Operands("x_f", "w_f", None, tp.UINT8, tp.UINT8, np.empty(0), "y_f")
    ops.inits += [
        numpy_helper.from_array(w_q, "w_q"),
        numpy_helper.from_array(w_scale.astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(out_features, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(x_scale, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y_zp"),
    ]
    ops.pre_nodes = [
        helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zp"], ["x_f"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_f"], axis=axis),
    ]
    if layer.bias_numel > 0 and (conv or linear_2d):
        ops.inits += [
            numpy_helper.from_array(np.zeros(out_features, np.int32), "b_q"),
            numpy_helper.from_array((w_scale * x_scale).astype(np.float32), "b_scale"),
            numpy_helper.from_array(np.zeros(out_features, np.int32), "b_zp"),
        ]
        ops.pre_nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b_f"], axis=0))
        ops.bias = "b_f"
    ops.feed = rng.integers(0, 256, size=layer.in_shape, dtype=np.uint8)
    return ops


def transition_graph(shape: list[int], direction: str) -> tuple[Any, dict[str, np.ndarray]]:
    """One ``QuantizeLinear`` (``direction="quantize"``) or ``DequantizeLinear`` at ``shape``."""
    _, tp, helper, numpy_helper = _onnx()
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zero = numpy_helper.from_array(np.array(128, np.uint8), "z")
    rng = np.random.default_rng(0)
    if direction == "quantize":
        node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
        types, feed = (tp.FLOAT, tp.UINT8), rng.standard_normal(shape).astype(np.float32)
    elif direction == "dequantize":
        node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"])
        types, feed = (tp.UINT8, tp.FLOAT), rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        raise ValueError(f"direction must be 'quantize' or 'dequantize', got {direction!r}")
    model = _model(
        [node],
        [helper.make_tensor_value_info("x", types[0], shape)],
        [helper.make_tensor_value_info("y", types[1], shape)],
        [scale, zero],
    )
    return model, {"x": feed}
