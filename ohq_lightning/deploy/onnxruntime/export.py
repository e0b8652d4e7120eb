"""The float ONNX graph of a model, and where each quantizable layer sits in it.

The float model is exported once (``torch.onnx.export``, TorchScript exporter, opset 17), called the
way its example input calls it (:class:`~ohq_lightning.deploy.example_call.ExampleCall`: defaulted and
keyword-only arguments keep their defaults); layers are found again in the graph by the module path the
exporter writes into each node's name, which is the model's own.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ohq_lightning.deploy.example_call import ExampleCall
from ohq_lightning.layers import preserved_state

__all__ = [
    "QUANTIZABLE_OPS",
    "constant_value",
    "consumers_of",
    "export_onnx",
    "layer_nodes",
    "output_anchor",
    "scope_path",
]

#: The ONNX ops a quantizable layer becomes.
QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")


def export_onnx(model: nn.Module, example_inputs: Any, *, opset: int = 17) -> Any:
    """The float ONNX graph of ``model`` (eval mode) called with ``example_inputs``: graph input ``x``
    (inputs named by the exporter when the example holds several tensors) and output ``y``.

    ``example_inputs`` is a tensor, a tuple/list of positional arguments or a dict of keywords; the
    model is called with exactly those, its other arguments left at their defaults.
    """
    import onnx  # deferred: onnx is heavy to import

    call = ExampleCall(model, example_inputs)
    inputs = call.example_inputs
    buffer = io.BytesIO()
    with preserved_state(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            call,
            (inputs,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["x"] if isinstance(inputs, torch.Tensor) else None,
            output_names=["y"],
        )
    return onnx.load_from_string(buffer.getvalue())


def scope_path(node_name: str) -> str:
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
        if node.op_type in QUANTIZABLE_OPS:
            path = scope_path(node.name)
            if path in wanted:
                found.setdefault(path, []).append(node)
    return found


def constant_value(onnx_model: Any, name: str) -> np.ndarray | None:
    """The constant value of tensor ``name``: an initializer, or one reached through ``Identity`` nodes.

    (The exporter shares equal constants, e.g. the all-zero folded weights of an untrained residual
    branch, through ``Identity`` nodes.)
    """
    from onnx import numpy_helper  # deferred: onnx is heavy to import

    for init in onnx_model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in onnx_model.graph.node:
        if node.op_type == "Identity" and node.output[0] == name:
            return constant_value(onnx_model, node.input[0])
    return None


def consumers_of(graph: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes that read it (each once, in graph order)."""
    readers: dict[str, list[Any]] = {}
    for node in graph.graph.node:
        for tensor in dict.fromkeys(node.input):
            readers.setdefault(tensor, []).append(node)
    return readers


def output_anchor(graph: Any, node: Any, consumers: dict[str, list[Any]] | None = None) -> Any:
    """The node whose output gets the layer's output quantize/dequantize: the layer itself, or the
    ``Relu``/``Clip`` right after it when that is its only consumer (ORT folds it into the int8 kernel).

    ``consumers`` (:func:`consumers_of` the graph) saves a scan of the graph when asking for many nodes.
    """
    consumers = (consumers_of(graph) if consumers is None else consumers).get(node.output[0], [])
    graph_outputs = {value.name for value in graph.graph.output}
    if len(consumers) == 1 and consumers[0].op_type in ("Relu", "Clip") and node.output[0] not in graph_outputs:
        return consumers[0]
    return node
