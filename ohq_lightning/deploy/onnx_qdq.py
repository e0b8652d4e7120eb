"""Export a model to ONNX and quantize chosen layers as QDQ patterns ONNX Runtime runs on int8 kernels.

The float model is exported once (``torch.onnx.export``, TorchScript exporter, opset 17). Each
layer the plan runs in integer arithmetic then gets, in the ONNX graph:

* its weight stored as signed 8-bit per output channel (``DequantizeLinear`` with ``axis=0``);
  a ``w{b}`` option with b < 8 stores the weight on its ``b``-bit grid inside int8;
* its bias stored as int32 at scale ``input_scale x weight_scale``;
* ``QuantizeLinear -> DequantizeLinear`` (unsigned 8-bit) on its input and on its output,

which ORT's graph optimiser fuses into ``QLinearConv``/``QGemm``; between two integer layers the
redundant dequantize/quantize pair disappears, so quantize/dequantize remain exactly where the
precision changes. Layers left in float keep their float ``Conv``/``Gemm``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ohq_lightning.layers import preserved_state
from ohq_lightning.plan import Option

__all__ = ["ActivationRange", "activation_ranges", "export_onnx", "layer_nodes", "quantize_onnx_layers"]

_QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class ActivationRange:
    """Observed float range of a tensor; gives the unsigned 8-bit scale and zero point."""

    low: float
    high: float

    def qparams(self) -> tuple[float, int]:
        """``(scale, zero_point)`` of the uint8 grid covering ``[min(low, 0), max(high, 0)]``."""
        low, high = min(self.low, 0.0), max(self.high, 0.0)
        scale = max(high - low, 1e-8) / 255.0
        zero_point = int(np.clip(round(-low / scale), 0, 255))
        return scale, zero_point


def export_onnx(model: nn.Module, example_inputs: Any, *, opset: int = 17) -> Any:
    """The float ONNX graph of ``model`` (eval mode), with graph input ``x`` and output ``y``."""
    import onnx

    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    buffer = io.BytesIO()
    with preserved_state(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["x"] if len(args) == 1 else None,
            output_names=["y"],
        )
    return onnx.load_from_string(buffer.getvalue())


def _scope_path(node_name: str) -> str:
    """The module path of an exported node: ``/blocks/blocks.0/blocks.0.0/conv_dw/Conv`` -> ``blocks.0.0.conv_dw``."""
    path = ""
    for segment in node_name.strip("/").split("/")[:-1]:
        parent, _, child = segment.rpartition(".")
        if not path or segment.startswith(path + "."):  # 'blocks.0' inside 'blocks'
            path = segment
        elif parent and (path == parent or path.endswith("." + parent)):  # 'downsample.0' inside '...downsample'
            path = f"{path}.{child}"
        else:
            path = f"{path}.{segment}"
    return path


def layer_nodes(onnx_model: Any, layer_names: Sequence[str]) -> dict[str, list[Any]]:
    """The ``Conv``/``Gemm``/``MatMul`` nodes each layer became (a layer called twice has two)."""
    wanted = set(layer_names)
    found: dict[str, list[Any]] = {}
    for node in onnx_model.graph.node:
        if node.op_type in _QUANTIZABLE_OPS:
            path = _scope_path(node.name)
            if path in wanted:
                found.setdefault(path, []).append(node)
    return found


def activation_ranges(
    onnx_model: Any, layer_names: Sequence[str], batches: Sequence[Any], *, threads: int = 1
) -> dict[str, tuple[ActivationRange, ActivationRange]]:
    """Float (input, output) ranges of each named layer's node, running the float ONNX graph on ``batches``.

    Ranges come from the exported graph itself, not from the PyTorch modules, because the
    exporter folds a following BatchNorm into the convolution: the node's output is the
    normalised activation.
    """
    import onnx
    from onnx import helper

    from ohq_lightning.hardware.ort_ops import ort_session

    nodes = layer_nodes(onnx_model, layer_names)
    missing = sorted(set(layer_names) - set(nodes))
    if missing:
        raise ValueError(f"layers {missing} have no Conv/Gemm/MatMul node in the exported graph")
    probe = onnx.ModelProto()
    probe.CopyFrom(onnx_model)
    present = {output.name for output in probe.graph.output}
    tensors = sorted({name for group in nodes.values() for node in group for name in (node.input[0], node.output[0])})
    for name in tensors:
        if name not in present:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort_session(probe.SerializeToString(), threads)
    input_name = session.get_inputs()[0].name
    outputs = [output.name for output in session.get_outputs()]
    low = dict.fromkeys(tensors, np.inf)
    high = dict.fromkeys(tensors, -np.inf)
    batch_size = session.get_inputs()[0].shape[0]
    for batch in batches:
        array = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        chunks = [array] if not isinstance(batch_size, int) else np.split(array, len(array) // batch_size)
        for chunk in chunks:  # the exported graph has a fixed batch size
            for name, value in zip(outputs, session.run(None, {input_name: chunk.astype(np.float32)}), strict=True):
                if name in low:
                    low[name] = min(low[name], float(value.min()))
                    high[name] = max(high[name], float(value.max()))

    def merged(names: list[str]) -> ActivationRange:
        return ActivationRange(min(low[n] for n in names), max(high[n] for n in names))

    return {
        layer: (merged([n.input[0] for n in group]), merged([n.output[0] for n in group]))
        for layer, group in nodes.items()
    }


def _initializer(onnx_model: Any, name: str) -> np.ndarray | None:
    """The constant value of tensor ``name``: an initializer, or one reached through ``Identity`` nodes.

    (The exporter shares equal constants, e.g. the all-zero folded weights of an untrained residual
    branch, through ``Identity`` nodes.)
    """
    from onnx import numpy_helper

    for init in onnx_model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in onnx_model.graph.node:
        if node.op_type == "Identity" and node.output[0] == name:
            return _initializer(onnx_model, node.input[0])
    return None


def quantize_onnx_layers(
    onnx_model: Any,
    options: Mapping[str, str],
    ranges: Mapping[str, tuple[ActivationRange, ActivationRange]],
) -> Any:
    """A copy of ``onnx_model`` where every layer whose option is an integer option is in QDQ form.

    Args:
        onnx_model: the float graph from :func:`export_onnx`.
        options: layer name -> option name (``"w8a8"``, ``"w4a8"``, ``"fp32"``...); float options
            and layers not named stay float.
        ranges: layer name -> (input range, output range), e.g. from :func:`activation_ranges`.

    Raises:
        ValueError: a layer that is not in the graph, or an option that is not integer 8-bit-activation.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    integer = {name: Option.parse(opt) for name, opt in options.items() if not Option.parse(opt).is_float}
    for name, option in integer.items():
        if option.act_bits not in (None, 8):
            raise ValueError(f"layer {name!r}: ORT's integer kernels need 8-bit activations, not {option.name}")
    nodes = layer_nodes(model, list(integer))
    missing = sorted(set(integer) - set(nodes))
    if missing:
        raise ValueError(f"layers {missing} have no Conv/Gemm/MatMul node in the exported graph")
    new_inits: list[Any] = []
    for name, option in integer.items():
        in_range, out_range = ranges[name]
        x_scale, x_zp = in_range.qparams()
        y_scale, y_zp = out_range.qparams()
        for index, node in enumerate(nodes[name]):
            tag = f"{name}#{index}"
            weight = _initializer(model, node.input[1])
            if weight is None:
                raise ValueError(f"layer {name!r}: its weight is not a constant of the exported graph")
            transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _trans_b(node))
            w = weight.T if transposed else weight
            assert option.weight_bits is not None
            qmax = 2 ** (option.weight_bits - 1) - 1
            w_scale = np.maximum(np.abs(w.reshape(w.shape[0], -1)).max(axis=1) / qmax, 1e-12).astype(np.float32)
            w_q = np.clip(np.round(w / w_scale.reshape(-1, *[1] * (w.ndim - 1))), -qmax - 1, qmax).astype(np.int8)
            if transposed:
                w_q = w_q.T.copy()
            axis = 1 if transposed else 0
            new_inits += [
                numpy_helper.from_array(w_q, f"{tag}.w_q"),
                numpy_helper.from_array(w_scale, f"{tag}.w_scale"),
                numpy_helper.from_array(np.zeros_like(w_scale, dtype=np.int8), f"{tag}.w_zp"),
                numpy_helper.from_array(np.array(x_scale, np.float32), f"{tag}.x_scale"),
                numpy_helper.from_array(np.array(x_zp, np.uint8), f"{tag}.x_zp"),
                numpy_helper.from_array(np.array(y_scale, np.float32), f"{tag}.y_scale"),
                numpy_helper.from_array(np.array(y_zp, np.uint8), f"{tag}.y_zp"),
            ]
            pre = [
                helper.make_node("QuantizeLinear", [node.input[0], f"{tag}.x_scale", f"{tag}.x_zp"], [f"{tag}.xq"]),
                helper.make_node("DequantizeLinear", [f"{tag}.xq", f"{tag}.x_scale", f"{tag}.x_zp"], [f"{tag}.xd"]),
                helper.make_node(
                    "DequantizeLinear", [f"{tag}.w_q", f"{tag}.w_scale", f"{tag}.w_zp"], [f"{tag}.wd"], axis=axis
                ),
            ]
            inputs = [f"{tag}.xd", f"{tag}.wd"]
            if len(node.input) > 2 and node.input[2]:
                bias = _initializer(model, node.input[2])
                if bias is not None and node.op_type != "MatMul":
                    b_scale = (w_scale * x_scale).astype(np.float32)
                    b_q = np.round(bias / b_scale).astype(np.int32)
                    new_inits += [
                        numpy_helper.from_array(b_q, f"{tag}.b_q"),
                        numpy_helper.from_array(b_scale, f"{tag}.b_scale"),
                        numpy_helper.from_array(np.zeros_like(b_q), f"{tag}.b_zp"),
                    ]
                    pre.append(
                        helper.make_node(
                            "DequantizeLinear", [f"{tag}.b_q", f"{tag}.b_scale", f"{tag}.b_zp"], [f"{tag}.bd"], axis=0
                        )
                    )
                    inputs.append(f"{tag}.bd")
                else:
                    inputs.append(node.input[2])
            output = node.output[0]
            post = [
                helper.make_node("QuantizeLinear", [f"{tag}.y", f"{tag}.y_scale", f"{tag}.y_zp"], [f"{tag}.yq"]),
                helper.make_node("DequantizeLinear", [f"{tag}.yq", f"{tag}.y_scale", f"{tag}.y_zp"], [output]),
            ]
            del node.input[:]
            node.input.extend(inputs)
            node.output[0] = f"{tag}.y"
            position = list(model.graph.node).index(node)
            for offset, new in enumerate(pre):
                model.graph.node.insert(position + offset, new)
            position = list(model.graph.node).index(node)
            for offset, new in enumerate(post):
                model.graph.node.insert(position + 1 + offset, new)
    model.graph.initializer.extend(new_inits)
    used = {name for node in model.graph.node for name in node.input}
    unused = [init for init in model.graph.initializer if init.name not in used]
    for init in unused:  # the float weights and biases the QDQ copies replaced
        model.graph.initializer.remove(init)
    onnx.checker.check_model(model)
    return model


def _trans_b(node: Any) -> bool:
    return any(attr.name == "transB" and attr.i == 1 for attr in node.attribute)
