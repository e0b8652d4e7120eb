"""Quantize chosen layers of a float ONNX graph as QDQ patterns that ONNX Runtime runs on int8 kernels.

Each layer the plan runs in integer arithmetic gets, in the ONNX graph:

* its weight stored as signed 8-bit per output channel (``DequantizeLinear`` with ``axis=0``);
  a ``w{b}`` option with b < 8 stores the weight on its ``b``-bit grid inside int8;
* its bias stored as int32 at scale ``input_scale x weight_scale``;
* ``QuantizeLinear -> DequantizeLinear`` (unsigned 8-bit) on its input and on its output (after a
  ``Relu``/``Clip`` that follows it), except the output of a ``Gemm`` that does not feed integer
  layers, which stays float (ORT's ``QGemm`` writes float: no requantization, one op fewer),

which ORT's graph optimiser fuses into ``QLinearConv``/``QGemm``; between two integer layers the
redundant dequantize/quantize pair disappears, so quantize/dequantize remain exactly where the
precision changes. Layers left in float keep their float ``Conv``/``Gemm``.

Scales come from one of two places. By default the weights get MSE-optimal per-channel step sizes
(:func:`~ohq_lightning.deploy.quantize_weight_per_channel`) and the activations the uint8 grid of
their least-error clipped range (:func:`~ohq_lightning.deploy.activation_ranges`). A layer given a
:class:`~ohq_lightning.deploy.FixedQuantization` (e.g. the step sizes a fake-quant model learned)
uses its weight grid and its input grid instead, and a layer whose output feeds only integer layers
that agree on one input grid quantizes its output on that grid, so the output quantization adds no
rounding of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ohq_lightning.deploy.onnxruntime.export import constant_value, consumers_of, layer_nodes, output_anchor
from ohq_lightning.deploy.onnxruntime.ranges import ActivationRange
from ohq_lightning.deploy.onnxruntime.weights import FixedQuantization, fixed_weight, quantize_weight_per_channel
from ohq_lightning.plan import Option

__all__ = ["QDQBuilder", "quantize_onnx_layers"]

QParams = tuple[float, int]


class QDQBuilder:
    """Builds QDQ variants of one float ONNX graph, quantizing each layer's weights only once.

    Args:
        onnx_model: the float graph (:func:`~ohq_lightning.deploy.export_onnx`).
        ranges: layer name -> (input range, output range) observed on the float graph
            (:func:`~ohq_lightning.deploy.activation_ranges`); they set every grid that ``fixed`` does not.
        fixed: layer name -> :class:`~ohq_lightning.deploy.FixedQuantization`: a weight grid used when
            the option's weight bits match, and an input grid. A layer whose output feeds only integer
            layers with one common input grid quantizes its output on that grid; other outputs use
            their range.

    Example:
        >>> builder = QDQBuilder(graph, ranges)  # doctest: +SKIP
        >>> int8 = builder.build({"conv1": "w8a8", "fc": "w4a8"})  # doctest: +SKIP
    """

    def __init__(
        self,
        onnx_model: Any,
        ranges: Mapping[str, tuple[ActivationRange, ActivationRange]],
        fixed: Mapping[str, FixedQuantization] | None = None,
    ) -> None:
        self.graph = onnx_model
        self.ranges = dict(ranges)
        self.fixed = dict(fixed or {})
        self._weights: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._biases: dict[str, np.ndarray | None] = {}
        nodes = list(onnx_model.graph.node)
        # indexes of the float graph (never modified), so that a build is linear in the graph's size
        self._index = {output: position for position, node in enumerate(nodes) for output in node.output}
        self._consumers = consumers_of(onnx_model)
        self._graph_outputs = {value.name for value in onnx_model.graph.output}
        self._skeleton = _skeleton(onnx_model)

    def build(self, options: Mapping[str, str], *, check: bool = True) -> Any:
        """A copy of the graph where every layer with an integer option is in QDQ form.

        Args:
            options: layer name -> option name (``"w8a8"``, ``"w4a8"``, ``"fp32"``...); float options
                and layers not named stay float.
            check: run ``onnx.checker.check_model`` on the result. A caller building many mixes of one
                graph (the cpu target) checks the build that rewrites every layer and skips the rest:
                a mix only leaves some of the same rewrites out.

        Raises:
            ValueError: a layer not in the graph or without ranges, or an option ORT's integer kernels
                cannot run (activations other than 8 bits, or weight-only options, which run in float).
        """
        import onnx  # deferred: onnx is heavy to import

        integer = self._integer_options(options)
        original = layer_nodes(self.graph, list(integer))
        missing = sorted(set(integer) - set(original))
        if missing:
            raise ValueError(f"layers {missing} have no Conv/Gemm/MatMul node in the exported graph")
        rewrites: dict[int, _Rewrite] = {}
        for name, option in integer.items():
            assert option.weight_bits is not None
            x_qparams = self._input_qparams(name)
            for index, node in enumerate(original[name]):
                y_qparams = self._output_qparams(node, integer, original)  # decided on the unmodified graph
                if y_qparams is None and node.op_type != "Gemm":  # ORT's QGemm can write float: no requantization
                    y_qparams = self.ranges[name][1].qparams()
                position = self._index[node.output[0]]
                rewrites[position] = self._rewrite(f"{name}#{index}", node, option.weight_bits, x_qparams, y_qparams)
        model = _rewritten_copy(self.graph, self._skeleton, rewrites)
        if check:
            onnx.checker.check_model(model)
        return model

    def _integer_options(self, options: Mapping[str, str]) -> dict[str, Option]:
        """The layers of ``options`` at integer options, checked: 8-bit activations and known ranges."""
        integer = {name: Option.parse(opt) for name, opt in options.items() if not Option.parse(opt).is_float}
        for name, option in integer.items():
            if option.act_bits != 8:
                raise ValueError(
                    f"layer {name!r}: {option.name} cannot run on ORT's integer kernels, which take 8-bit "
                    "activations (weight-only options run in float: leave them out)"
                )
        missing_ranges = sorted(set(integer) - set(self.ranges))
        if missing_ranges:
            raise ValueError(f"no activation ranges for layers {missing_ranges}")
        return integer

    def _weight(self, tag: str, node: Any, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The layer's int8 weights, step sizes and DequantizeLinear axis at ``bits`` (computed once per layer)."""
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _trans_b(node))
        key = (tag, bits)
        if key not in self._weights:
            weight = constant_value(self.graph, node.input[1])
            if weight is None:
                raise ValueError(f"layer {tag!r}: its weight is not a constant of the exported graph")
            weight = weight.T if transposed else weight
            fixed = self.fixed.get(tag)
            learned = None
            if fixed is not None and fixed.weight is not None and fixed.weight_bits == bits:
                assert fixed.weight_scale is not None
                learned = fixed_weight(tag, weight, fixed.weight, fixed.weight_scale, bits)
            w_q, w_scale = learned if learned is not None else quantize_weight_per_channel(weight, bits)
            self._weights[key] = (w_q.T.copy() if transposed else w_q, w_scale)
        w_q, w_scale = self._weights[key]
        return w_q, w_scale, 1 if transposed else 0

    def _bias(self, node: Any) -> np.ndarray | None:
        """The node's constant bias (its third input), read once per node."""
        if len(node.input) < 3 or not node.input[2]:
            return None
        if node.input[2] not in self._biases:
            self._biases[node.input[2]] = constant_value(self.graph, node.input[2])
        return self._biases[node.input[2]]

    def _input_qparams(self, name: str) -> QParams:
        fixed = self.fixed.get(name)
        if fixed is not None and fixed.input_qparams is not None:
            return fixed.input_qparams
        return self.ranges[name][0].qparams()

    def _anchor_index(self, position: int) -> int:
        """The position of the node whose output carries the layer's output quantization (see ``output_anchor``)."""
        node = self.graph.graph.node[position]
        return self._index[output_anchor(self.graph, node, self._consumers).output[0]]

    def _output_qparams(
        self, node: Any, integer: Mapping[str, Option], nodes: Mapping[str, list[Any]]
    ) -> QParams | None:
        """The input grid shared by every consumer of ``node``'s (anchored) output, when all of them are
        integer layers of this build that agree on one grid; else ``None`` (use the observed range)."""
        output = output_anchor(self.graph, node, self._consumers).output[0]
        if output in self._graph_outputs:
            return None
        layer_at = {self._index[n.output[0]]: name for name, group in nodes.items() for n in group}
        grids = set()
        for consumer in self._consumers.get(output, []):
            name = layer_at.get(self._index[consumer.output[0]]) if consumer.output else None
            if name is None or name not in integer or list(consumer.input).index(output) != 0:
                return None
            grids.add(self._input_qparams(name))
        return grids.pop() if len(grids) == 1 else None

    def _rewrite(self, tag: str, node: Any, bits: int, x_qparams: QParams, y_qparams: QParams | None) -> _Rewrite:
        """How ``node`` becomes QDQ: the nodes before it, its new inputs, and (unless ``y_qparams`` is
        ``None``, which leaves its output in float) the output quantization after its anchor."""
        from onnx import helper, numpy_helper  # deferred: onnx is heavy to import

        x_scale, x_zp = x_qparams
        w_q, w_scale, axis = self._weight(tag.rsplit("#", 1)[0], node, bits)
        inits = [
            numpy_helper.from_array(w_q, f"{tag}.w_q"),
            numpy_helper.from_array(w_scale, f"{tag}.w_scale"),
            numpy_helper.from_array(np.zeros_like(w_scale, dtype=np.int8), f"{tag}.w_zp"),
            numpy_helper.from_array(np.array(x_scale, np.float32), f"{tag}.x_scale"),
            numpy_helper.from_array(np.array(x_zp, np.uint8), f"{tag}.x_zp"),
        ]
        pre = [
            helper.make_node("QuantizeLinear", [node.input[0], f"{tag}.x_scale", f"{tag}.x_zp"], [f"{tag}.xq"]),
            helper.make_node("DequantizeLinear", [f"{tag}.xq", f"{tag}.x_scale", f"{tag}.x_zp"], [f"{tag}.xd"]),
            _dequantize(f"{tag}.w", f"{tag}.wd", axis=axis),
        ]
        inputs = [f"{tag}.xd", f"{tag}.wd"]
        bias = self._bias(node)
        if bias is not None and node.op_type != "MatMul":
            inits += _bias_initializers(tag, bias, (w_scale * x_scale).astype(np.float32))
            pre.append(_dequantize(f"{tag}.b", f"{tag}.bd", axis=0))
            inputs.append(f"{tag}.bd")
        elif len(node.input) > 2:
            inputs.append(node.input[2])
        anchor = self._anchor_index(self._index[node.output[0]])
        post: list[Any] = []
        if y_qparams is not None:
            post, y_inits = _requantize_output(tag, self.graph.graph.node[anchor], y_qparams)
            inits += y_inits
        return _Rewrite(tag, pre, inputs, anchor, post, inits)


@dataclass
class _Rewrite:
    """One layer node in QDQ form: ``pre`` nodes before it, its new ``inputs``, and ``post`` (its output
    quantization, if any) after the node at position ``anchor``, whose output becomes ``{tag}.y``; the
    new ``initializers``."""

    tag: str
    pre: list[Any]
    inputs: list[str]
    anchor: int
    post: list[Any]
    initializers: list[Any]


def _skeleton(graph: Any) -> Any:
    """A copy of ``graph`` without its nodes and initializers (what every build starts from)."""
    import onnx  # deferred: onnx is heavy to import

    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(graph)
    del skeleton.graph.node[:]
    del skeleton.graph.initializer[:]
    return skeleton


def _rewritten_copy(graph: Any, skeleton: Any, rewrites: Mapping[int, _Rewrite]) -> Any:
    """A copy of ``graph`` (built on its ``skeleton``) with the rewrites (by node position) applied, in one
    pass over its nodes; the float weights and biases the QDQ copies replaced are dropped."""
    import onnx  # deferred: onnx is heavy to import

    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    after = {rewrite.anchor: rewrite for rewrite in rewrites.values() if rewrite.post}
    nodes: list[Any] = []
    for position, original in enumerate(graph.graph.node):
        rewrite, anchored = rewrites.get(position), after.get(position)
        if rewrite is None and anchored is None:
            nodes.append(original)
            continue
        node = onnx.NodeProto()
        node.CopyFrom(original)
        if rewrite is not None:
            nodes += rewrite.pre
            del node.input[:]
            node.input.extend(rewrite.inputs)
        nodes.append(node)
        if anchored is not None:
            node.output[0] = f"{anchored.tag}.y"
            nodes += anchored.post
    model.graph.node.extend(nodes)
    used = {tensor for node in nodes for tensor in node.input}
    model.graph.initializer.extend(init for init in graph.graph.initializer if init.name in used)
    model.graph.initializer.extend(init for rewrite in rewrites.values() for init in rewrite.initializers)
    return model


def _bias_initializers(tag: str, bias: np.ndarray, b_scale: np.ndarray) -> list[Any]:
    """The int32 bias at step ``b_scale`` (``input_scale x weight_scale``), its steps and zero points."""
    from onnx import numpy_helper  # deferred: onnx is heavy to import

    limits = np.iinfo(np.int32)
    b_q = np.clip(np.round(bias / b_scale), limits.min, limits.max).astype(np.int32)
    return [
        numpy_helper.from_array(b_q, f"{tag}.b_q"),
        numpy_helper.from_array(b_scale, f"{tag}.b_scale"),
        numpy_helper.from_array(np.zeros_like(b_q), f"{tag}.b_zp"),
    ]


def _requantize_output(tag: str, anchor: Any, y_qparams: QParams) -> tuple[list[Any], list[Any]]:
    """``QuantizeLinear -> DequantizeLinear`` after ``anchor`` (whose output becomes ``{tag}.y``), ending
    in the anchor's output tensor: the two nodes, and their steps and zero points."""
    from onnx import helper, numpy_helper  # deferred: onnx is heavy to import

    y_scale, y_zp = y_qparams
    post = [
        helper.make_node("QuantizeLinear", [f"{tag}.y", f"{tag}.y_scale", f"{tag}.y_zp"], [f"{tag}.yq"]),
        helper.make_node("DequantizeLinear", [f"{tag}.yq", f"{tag}.y_scale", f"{tag}.y_zp"], [anchor.output[0]]),
    ]
    inits = [
        numpy_helper.from_array(np.array(y_scale, np.float32), f"{tag}.y_scale"),
        numpy_helper.from_array(np.array(y_zp, np.uint8), f"{tag}.y_zp"),
    ]
    return post, inits


def quantize_onnx_layers(
    onnx_model: Any,
    options: Mapping[str, str],
    ranges: Mapping[str, tuple[ActivationRange, ActivationRange]],
    fixed: Mapping[str, FixedQuantization] | None = None,
) -> Any:
    """A copy of ``onnx_model`` where every layer with an integer option is in QDQ form (see :class:`QDQBuilder`).

    ``ranges`` maps layer name -> (input range, output range), e.g. from
    :func:`~ohq_lightning.deploy.activation_ranges`; ``fixed`` optionally gives layers their own weight
    and input grids.
    """
    return QDQBuilder(onnx_model, ranges, fixed).build(options)


def _dequantize(prefix: str, output: str, *, axis: int) -> Any:
    """``DequantizeLinear(prefix_q, prefix_scale, prefix_zp) -> output`` along ``axis``."""
    from onnx import helper  # deferred: onnx is heavy to import

    return helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_scale", f"{prefix}_zp"], [output], axis=axis)


def _trans_b(node: Any) -> bool:
    return any(attr.name == "transB" and attr.i == 1 for attr in node.attribute)
