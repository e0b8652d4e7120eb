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

from collections.abc import Callable
from typing import Any

import numpy as np

from ohq_lightning.plan import LayerInfo

__all__ = ["ORT_DISABLED_OPTIMIZERS", "ORT_KERNELS", "layer_graph", "ort_runner", "ort_session", "transition_graph"]

ORT_KERNELS = ("fp32", "int8")
#: ORT would otherwise quantize a float layer it finds between a dequantize and a quantize on its own,
#: running layers in int8 that the plan leaves in float.
ORT_DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)
_OPSET = 17


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as error:  # pragma: no cover - onnx is a dependency
        raise ImportError("the onnxruntime runtime needs the 'onnx' and 'onnxruntime' packages") from error
    return onnx, TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, initializers) -> Any:
    onnx, _, helper, _ = _onnx()
    graph = helper.make_graph(nodes, "ohq_op", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def layer_graph(layer: LayerInfo, kernel: str, *, seed: int = 0) -> tuple[Any, dict[str, np.ndarray]]:
    """The ONNX graph of one layer at ``kernel`` (``"fp32"`` or ``"int8"``) and an input feed for it."""
    if kernel not in ORT_KERNELS:
        raise ValueError(f"unknown ONNX Runtime kernel {kernel!r}; use one of {ORT_KERNELS}")
    _, tp, helper, numpy_helper = _onnx()
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(layer.weight_shape).astype(np.float32) * 0.05
    has_bias = layer.bias_numel > 0
    out_features = layer.weight_shape[0]
    conv = layer.kind != "linear"
    linear_2d = not conv and len(layer.in_shape) == 2
    inits = []
    if kernel == "fp32":
        x_name, w_name, b_name = "x", "w", "b"
        inits.append(numpy_helper.from_array(weight if conv or linear_2d else weight.T.copy(), "w"))
        if has_bias:
            inits.append(numpy_helper.from_array(np.zeros(out_features, np.float32), "b"))
        pre_nodes = []
        x_type, y_type = tp.FLOAT, tp.FLOAT
        feed = rng.standard_normal(layer.in_shape).astype(np.float32)
        core_out = "y"
    else:
        from ohq_lightning.deploy.onnx_qdq import quantize_weight_per_channel

        w_q, w_scale = quantize_weight_per_channel(weight, 8)
        axis = 0
        if not conv and not linear_2d:  # MatMul takes W as [in, out]: per-column scales
            w_q, axis = w_q.T.copy(), 1
        x_scale = np.float32(0.05)
        inits += [
            numpy_helper.from_array(w_q, "w_q"),
            numpy_helper.from_array(w_scale.astype(np.float32), "w_scale"),
            numpy_helper.from_array(np.zeros(out_features, np.int8), "w_zp"),
            numpy_helper.from_array(np.array(x_scale, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
            numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "y_zp"),
        ]
        pre_nodes = [
            helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zp"], ["x_f"]),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_f"], axis=axis),
        ]
        if has_bias and (conv or linear_2d):
            inits += [
                numpy_helper.from_array(np.zeros(out_features, np.int32), "b_q"),
                numpy_helper.from_array((w_scale * x_scale).astype(np.float32), "b_scale"),
                numpy_helper.from_array(np.zeros(out_features, np.int32), "b_zp"),
            ]
            pre_nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b_f"], axis=0))
            b_name = "b_f"
        else:
            has_bias = False
        x_name, w_name = "x_f", "w_f"
        x_type, y_type = tp.UINT8, tp.UINT8
        feed = rng.integers(0, 256, size=layer.in_shape, dtype=np.uint8)
        core_out = "y_f"
    if conv:
        attrs = {
            "kernel_shape": layer.weight_shape[2:],
            "strides": layer.stride,
            "pads": layer.padding,
            "dilations": layer.dilation,
            "group": layer.groups,
        }
        core = [helper.make_node("Conv", [x_name, w_name] + ([b_name] if has_bias else []), [core_out], **attrs)]
    elif linear_2d:
        core = [helper.make_node("Gemm", [x_name, w_name] + ([b_name] if has_bias else []), [core_out], transB=1)]
    else:
        core = [helper.make_node("MatMul", [x_name, w_name], [core_out])]
    post = [] if kernel == "fp32" else [helper.make_node("QuantizeLinear", ["y_f", "y_scale", "y_zp"], ["y"])]
    model = _model(
        pre_nodes + core + post,
        [helper.make_tensor_value_info("x", x_type, layer.in_shape)],
        [helper.make_tensor_value_info("y", y_type, layer.out_shape)],
        inits,
    )
    return model, {"x": feed}


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


def ort_session(model_bytes: bytes, threads: int, *, spinning: bool = False) -> Any:
    """An ``InferenceSession`` on the CPU with the settings that matter here.

    All graph optimisations are on (fusions, blocked layouts), except :data:`ORT_DISABLED_OPTIMIZERS`.

    Intra-op worker threads do not spin-wait between runs unless ``spinning`` is set. Every timing
    here runs several sessions in turn (a graph and its reference, or the builds being compared),
    and a session's spinning workers take cores from the next one: at 2 threads, MobileNetV3-small
    timed alternately with a second session took 1.3-2.8x its time alone, erratically, with spinning
    and the same time as alone without it. A deployment that serves one model alone can turn it
    back on (``spinning=True``): it was about 20% faster there (3.2 ms against 4.1 ms). At 1 thread
    there are no workers, and the setting changes nothing.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(
        model_bytes,
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS),
    )


def ort_runner(model: Any, feed: dict[str, np.ndarray], threads: int) -> Callable[[], object]:
    """A no-argument callable that runs ``model`` once on ``feed`` in a fresh session."""
    session = ort_session(model.SerializeToString(), threads)
    return lambda: session.run(None, feed)
