import importlib
import sys

import numpy as np
import pytest
import torch
from conftest import fused_ops
from timm import layers as timm_layers
from torch import nn

from ohq_lightning.deploy import layer_graph, ort_runner, transition_graph
from ohq_lightning.layers import trace_layers


@pytest.fixture
def layers():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        timm_layers.Conv2dSame(8, 16, 3, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    return trace_layers(model, torch.randn(1, 3, 16, 16)).layers


@pytest.mark.parametrize("kernel", ["fp32", "int8"])
def test_layer_graphs_run_with_the_layer_shapes(layers, kernel):
    for layer in layers:
        model, feed = layer_graph(layer, kernel)
        (output,) = ort_runner(model, feed, threads=1)()
        assert list(output.shape) == layer.out_shape, layer.name
        assert output.dtype == (np.float32 if kernel == "fp32" else np.uint8)


def test_int8_graphs_fuse_into_integer_kernels(layers, tmp_path):
    conv_ops = fused_ops(layer_graph(layers[0], "int8")[0], tmp_path)
    assert "QLinearConv" in conv_ops and "Conv" not in conv_ops
    linear_ops = fused_ops(layer_graph(layers[-1], "int8")[0], tmp_path)
    assert linear_ops == ["QGemm"]


@pytest.mark.parametrize("direction", ["quantize", "dequantize"])
def test_transition_graphs(direction):
    (output,) = ort_runner(*transition_graph([1, 8, 4, 4], direction), threads=1)()
    assert output.shape == (1, 8, 4, 4)
    assert output.dtype == (np.uint8 if direction == "quantize" else np.float32)
    with pytest.raises(ValueError, match="direction"):
        transition_graph([1, 8], "sideways")


def test_unknown_kernel_is_rejected(layers):
    with pytest.raises(ValueError, match="kernel"):
        layer_graph(layers[0], "int4")


def test_the_old_module_still_works_and_says_where_its_names_moved(monkeypatch):
    from ohq_lightning import deploy

    monkeypatch.delitem(sys.modules, "ohq_lightning.hardware.ort_ops", raising=False)
    with pytest.warns(DeprecationWarning, match=r"moved to ohq_lightning\.deploy"):
        old = importlib.import_module("ohq_lightning.hardware.ort_ops")
    assert old.ort_session is deploy.ort_session and old.ort_runner is deploy.ort_runner
    assert old.layer_graph is deploy.layer_graph and old.transition_graph is deploy.transition_graph
    assert old.ORT_KERNELS == ("fp32", "int8") and old.ORT_DISABLED_OPTIMIZERS == deploy.ORT_DISABLED_OPTIMIZERS
