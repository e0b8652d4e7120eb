"""Activation ranges for ORT's uint8 grids, observed on the float ONNX graph over calibration batches.

Ranges come from the exported graph itself, not from the PyTorch modules, because the exporter folds
a following BatchNorm into the convolution: the node's output is the normalised activation. Each
range is the one whose uint8 grid quantizes the observed values with the least squared error (a
min/max range spends the grid's 256 levels on rare extreme values). Measurements of the effect on
accuracy and calibration time: ``docs/notes/deploy.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ohq_lightning.deploy.base import to_numpy
from ohq_lightning.deploy.onnxruntime.export import consumers_of, layer_nodes, output_anchor
from ohq_lightning.deploy.onnxruntime.session import ort_session
from ohq_lightning.quant.fake_quant import CLIP_RATIOS

__all__ = ["ActivationRange", "activation_ranges"]

_RANGE_BINS = 16384  # histogram bins per tensor: 8 per uint8 step even at the smallest clipping ratio
_PROBE_CALLS = 32  # graph calls whose outputs _probe_outputs hands over together (fewer, larger numpy calls)


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


def activation_ranges(
    onnx_model: Any, layer_names: Sequence[str], batches: Sequence[Any], *, clip: bool = True, threads: int = 1
) -> dict[str, tuple[ActivationRange, ActivationRange]]:
    """(input, output) ranges of each named layer's node for ORT's uint8 grid, from the float ONNX graph on ``batches``.

    Each range is the observed range ``[min(low, 0), max(high, 0)]`` scaled by the clipping ratio
    (one of the ratios :func:`~ohq_lightning.quant.fake_quant.mse_scale` tries, ``CLIP_RATIOS``) whose
    uint8 grid has the least squared error on a histogram of every observed value. Clipping is chosen
    by squared error, not by percentile: a lone outlier is kept until the tensor has enough values
    (about 800,000 per outlier at 8 bits) for a finer grid to pay for it. The output range of a layer
    is taken after a ``Relu``/``Clip`` that follows it; a layer split over several nodes gets the
    union of their ranges. With ``clip=False`` the ranges are the observed min/max (one pass, no
    histogram).
    """
    nodes = layer_nodes(onnx_model, layer_names)
    missing = sorted(set(layer_names) - set(nodes))
    if missing:
        raise ValueError(f"layers {missing} have no Conv/Gemm/MatMul node in the exported graph")
    readers = consumers_of(onnx_model)
    anchors = {
        id(node): output_anchor(onnx_model, node, readers).output[0] for group in nodes.values() for node in group
    }
    tensors = sorted({n.input[0] for group in nodes.values() for n in group} | set(anchors.values()))
    session = ort_session(_probe_graph(onnx_model, tensors).SerializeToString(), threads)
    low, high = _extremes(session, batches, tensors)
    if not clip:
        chosen = {name: ActivationRange(low[name], high[name]) for name in tensors}
    else:
        counts = _histograms(session, batches, tensors, low, high)
        chosen = {name: _least_error_range(low[name], high[name], counts[name]) for name in tensors}
    return _layer_ranges(nodes, anchors, chosen)


def _probe_graph(onnx_model: Any, tensors: Sequence[str]) -> Any:
    """A copy of ``onnx_model`` that also outputs ``tensors``."""
    import onnx  # deferred: onnx is heavy to import
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(onnx_model)
    present = {output.name for output in probe.graph.output}
    for name in tensors:
        if name not in present:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return probe


def _extremes(
    session: Any, batches: Sequence[Any], tensors: Sequence[str]
) -> tuple[dict[str, float], dict[str, float]]:
    """Each tensor's smallest and largest value over ``batches`` (every grid covers zero)."""
    low = dict.fromkeys(tensors, 0.0)
    high = dict.fromkeys(tensors, 0.0)
    for values in _probe_outputs(session, batches, tensors):
        for name, value in values.items():
            low[name] = min(low[name], float(value.min()))
            high[name] = max(high[name], float(value.max()))
    return low, high


def _histograms(
    session: Any, batches: Sequence[Any], tensors: Sequence[str], low: Mapping[str, float], high: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """Each tensor's histogram over its full range ``[low, high]`` (a second pass over ``batches``)."""
    counts = {name: np.zeros(_RANGE_BINS, dtype=np.int64) for name in tensors}
    for values in _probe_outputs(session, batches, tensors):
        for name, value in values.items():
            width = max(high[name] - low[name], 1e-12) / _RANGE_BINS
            index = np.clip(((value - low[name]) / width).astype(np.int64), 0, _RANGE_BINS - 1)
            counts[name] += np.bincount(index, minlength=_RANGE_BINS)
    return counts


def _layer_ranges(
    nodes: Mapping[str, list[Any]], anchors: Mapping[int, str], chosen: Mapping[str, ActivationRange]
) -> dict[str, tuple[ActivationRange, ActivationRange]]:
    """Per layer, the (input, output) range: the union over the layer's nodes of their tensors' ranges."""

    def merged(names: list[str]) -> ActivationRange:
        return ActivationRange(min(chosen[n].low for n in names), max(chosen[n].high for n in names))

    return {
        layer: (merged([n.input[0] for n in group]), merged([anchors[id(n)] for n in group]))
        for layer, group in nodes.items()
    }


def _probe_outputs(session: Any, batches: Sequence[Any], tensors: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
    """Run ``session`` on ``batches`` (in chunks of its fixed batch size) and yield the wanted tensors,
    flattened and concatenated over up to ``_PROBE_CALLS`` calls at a time."""
    input_name = session.get_inputs()[0].name
    outputs = [output.name for output in session.get_outputs()]
    pending: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    batch_size = session.get_inputs()[0].shape[0]
    calls = 0
    for batch in batches:
        array = to_numpy(batch)
        if isinstance(batch_size, int) and len(array) % batch_size:
            raise ValueError(f"calibration batches must hold a multiple of the exported batch size {batch_size}")
        chunks = [array] if not isinstance(batch_size, int) else np.split(array, len(array) // batch_size)
        for chunk in chunks:  # the exported graph has a fixed batch size
            for name, value in zip(outputs, session.run(None, {input_name: chunk.astype(np.float32)}), strict=True):
                if name in pending:
                    pending[name].append(value.ravel())
            calls += 1
            if calls % _PROBE_CALLS == 0:
                yield {name: np.concatenate(arrays) for name, arrays in pending.items()}
                pending = {name: [] for name in tensors}
    if calls % _PROBE_CALLS:
        yield {name: np.concatenate(arrays) for name, arrays in pending.items()}


def _least_error_range(low: float, high: float, counts: np.ndarray) -> ActivationRange:
    """The clipped range ``[low, high] * r`` whose uint8 grid has the least squared error over a histogram."""
    if high - low <= 0:
        return ActivationRange(low, high)
    edges = np.linspace(low, high, len(counts) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    best, best_error = ActivationRange(low, high), np.inf
    for ratio in CLIP_RATIOS:
        candidate = ActivationRange(low * ratio, high * ratio)
        scale, zero_point = candidate.qparams()
        levels = np.clip(np.round(centers / scale) + zero_point, 0, 255)
        error = float(np.dot(counts, ((levels - zero_point) * scale - centers) ** 2))
        if error < best_error:
            best, best_error = candidate, error
    return best
