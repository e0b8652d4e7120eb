import collections

import numpy as np
import onnx
import pytest
import torch
from conftest import fused_ops, make_tiny_net
from timm import layers as timm_layers
from torch import nn

from ohq_lightning.deploy import (
    ActivationRange,
    activation_ranges,
    export_onnx,
    layer_nodes,
    ort_session,
    quantize_onnx_layers,
)
from ohq_lightning.deploy.onnxruntime.export import scope_path
from ohq_lightning.layers import trace_layers


def test_scope_paths_follow_module_names():
    assert scope_path("/blocks/blocks.0/blocks.0.0/conv_dw/Conv") == "blocks.0.0.conv_dw"
    assert scope_path("/conv_stem/Conv") == "conv_stem"
    assert scope_path("/stem/stem.0/Conv") == "stem.0"
    assert scope_path("/layer2/layer2.0/downsample/downsample.0/Conv") == "layer2.0.downsample.0"


def test_activation_range_qparams_cover_zero():
    scale, zero = ActivationRange(0.0, 2.55).qparams()
    assert scale == pytest.approx(0.01) and zero == 0
    scale, zero = ActivationRange(-1.0, 1.0).qparams()
    assert zero in (127, 128)


@pytest.fixture
def exported():
    model = make_tiny_net()
    example = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    names = trace_layers(model, example).names()
    graph = export_onnx(model, example)
    ranges = activation_ranges(graph, names, [torch.randn(8, 3, 16, 16)])
    return model, example, names, graph, ranges


def _grid_error(values: np.ndarray, grid: ActivationRange) -> float:
    """Mean squared error of ``values`` on the uint8 grid of ``grid``."""
    scale, zero_point = grid.qparams()
    levels = np.clip(np.round(values / scale) + zero_point, 0, 255)
    return float(np.mean(((levels - zero_point) * scale - values) ** 2))


def test_input_ranges_trade_a_rare_outlier_for_a_finer_grid_when_that_lowers_the_error(exported):
    _, _, names, graph, _ = exported
    images = torch.rand(2048, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0, 0] = 20.0  # one outlier among 1.57 million values in [0, 1)
    found = activation_ranges(graph, names, [images])["stem.0"][0]
    # N = 2048 x 3 x 16 x 16 = 1,572,864 values. A grid [0, h] of step h / 255 costs every value in [0, 1)
    # (h / 255)^2 / 12 and clips the outlier by (20 - h)^2 / N: h^2 / 780,300 + (20 - h)^2 / 1,572,864 is least
    # at h = 20 / 1,572,864 / (1 / 780,300 + 1 / 1,572,864) = 6.63, where it is 1.70e-4; the full grid [0, 20]
    # costs (20 / 255)^2 / 12 = 5.13e-4, so 0.33 of it (at h = 6.0 or 7.5: 0.333 / 0.334; measured h = 6.5: 0.326)
    assert found.low == 0.0 and 6.0 <= found.high <= 7.5
    values = images.numpy().ravel()
    assert _grid_error(values, found) < 0.36 * _grid_error(values, ActivationRange(0.0, 20.0))
    assert activation_ranges(graph, names, [images], clip=False)["stem.0"][0] == ActivationRange(0.0, 20.0)
    few = images[:8].clone()  # 6,144 values: clipping the outlier would cost more than the finer grid saves
    assert activation_ranges(graph, names, [few])["stem.0"][0].high > 0.9 * 20.0


def test_every_layer_maps_to_its_onnx_node(exported):
    _, _, names, graph, _ = exported
    nodes = layer_nodes(graph, names)
    assert sorted(nodes) == sorted(names)
    assert [n.op_type for name in names for n in nodes[name]] == ["Conv", "Conv", "Conv", "Gemm"]


def test_mixed_plan_runs_on_fused_int8_kernels_and_matches_the_float_model(exported, tmp_path):
    model, example, _, graph, ranges = exported
    plan = {"stem.0": "w8a8", "dw.0": "fp32", "grouped.0": "w8a8", "fc": "w4a8"}
    quantized = quantize_onnx_layers(graph, plan, ranges)
    ops = collections.Counter(fused_ops(quantized, tmp_path))
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1 and ops["Conv"] + ops["FusedConv"] == 1
    feed = {"x": example.numpy()}
    with torch.no_grad():
        reference = model(example).numpy()
    float_out = ort_session(graph.SerializeToString(), 1).run(None, feed)[0]
    int_out = ort_session(quantized.SerializeToString(), 1).run(None, feed)[0]
    assert np.allclose(float_out, reference, atol=1e-5)
    spread = float(np.abs(reference).max())
    assert float(np.abs(int_out - reference).max()) < 0.15 * spread
    assert not np.allclose(int_out, reference, atol=1e-6)


def test_sub_8_bit_weights_sit_on_their_grid_inside_int8(exported):
    _, _, _, graph, ranges = exported
    quantized = quantize_onnx_layers(graph, {"stem.0": "w2a8"}, ranges)
    (w_q,) = [onnx.numpy_helper.to_array(i) for i in quantized.graph.initializer if i.name.endswith(".w_q")]
    assert w_q.dtype == np.int8 and w_q.min() >= -2 and w_q.max() <= 1


def test_bad_plans_are_rejected(exported):
    _, _, _, graph, ranges = exported
    with pytest.raises(ValueError, match="8-bit activations"):
        quantize_onnx_layers(graph, {"stem.0": "w8a4"}, ranges)
    with pytest.raises(ValueError, match="no Conv/Gemm/MatMul node"):
        quantize_onnx_layers(graph, {"nope": "w8a8"}, {"nope": ranges["stem.0"]})


def test_timm_same_padding_conv_exports_and_quantizes(tmp_path):
    model = nn.Sequential(timm_layers.Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 1))
    example = torch.randn(1, 3, 9, 9)
    names = trace_layers(model, example).names()
    graph = export_onnx(model, example)
    quantized = quantize_onnx_layers(graph, dict.fromkeys(names, "w8a8"), activation_ranges(graph, names, [example]))
    assert collections.Counter(fused_ops(quantized, tmp_path))["QLinearConv"] == 2


def test_weights_shared_by_the_exporter_through_identity_nodes_are_found(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with torch.no_grad():  # equal constants: the exporter keeps one and shares it through Identity nodes
        model[2].weight.zero_()
        model[4].weight.zero_()
        model[2].bias.zero_()
        model[4].bias.zero_()
    example = torch.randn(1, 3, 5, 5)
    names = trace_layers(model, example).names()
    graph = export_onnx(model, example)
    quantized = quantize_onnx_layers(graph, dict.fromkeys(names, "w8a8"), activation_ranges(graph, names, [example]))
    assert collections.Counter(fused_ops(quantized, tmp_path))["QLinearConv"] == 3
