import pytest
import torch
from conftest import same_state, state_snapshot
from timm import layers as timm_layers
from torch import nn

from ohq_lightning.layers import trace_layers


def test_finds_conv_depthwise_grouped_and_linear_with_shapes_and_macs(tiny_net, tiny_input):
    trace = trace_layers(tiny_net, tiny_input)
    by_name = {layer.name: layer for layer in trace.layers}
    assert list(by_name) == ["stem.0", "dw.0", "grouped.0", "fc"]
    assert [by_name[n].kind for n in by_name] == ["conv", "depthwise", "grouped", "linear"]
    stem = by_name["stem.0"]
    assert stem.in_shape == [1, 3, 16, 16] and stem.out_shape == [1, 8, 16, 16]
    assert stem.macs == 8 * 16 * 16 * 3 * 3 * 3
    assert by_name["dw.0"].macs == 8 * 16 * 16 * 1 * 3 * 3
    assert by_name["grouped.0"].macs == 16 * 16 * 16 * 4
    assert by_name["fc"].macs == 16 * 10 and by_name["fc"].bias_numel == 10
    assert not stem.input_nonnegative and by_name["dw.0"].input_nonnegative
    assert trace.skipped == {}


def test_macs_are_per_sample_for_a_batch(tiny_net):
    one = trace_layers(tiny_net, torch.randn(1, 3, 16, 16)).layers
    four = trace_layers(tiny_net, torch.randn(4, 3, 16, 16)).layers
    assert [layer.macs for layer in one] == [layer.macs for layer in four]
    assert four[0].in_shape == [1, 3, 16, 16]


class _Custom(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.conv1d = nn.Conv1d(1, 1, 1)
        self.custom = _Custom(1, 1, 1)
        self.unused = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        x = self.shared(torch.relu(self.shared(x)))  # one module, two calls
        x = self.conv1d(x.unsqueeze(1)).squeeze(1)
        x = self.custom(x[:, None, :, None])[:, 0, :, 0]
        return self.out(x)


def test_reports_what_it_cannot_quantize_and_counts_repeated_calls():
    model = _Mixed()
    trace = trace_layers(model, torch.randn(2, 6))
    assert trace.names() == ["shared", "out"]
    shared = trace.layers[0]
    assert shared.calls == 2 and shared.macs == 2 * 36
    assert set(trace.skipped) == {"conv1d", "custom", "unused"}
    assert "not supported" in trace.skipped["conv1d"]
    assert "own forward" in trace.skipped["custom"]
    assert "not called" in trace.skipped["unused"]


def test_timm_subclasses_are_found_by_exact_type():
    model = nn.Sequential(
        timm_layers.Conv2dSame(3, 4, 3, stride=2),
        timm_layers.StdConv2d(4, 4, 3, padding=1),
        timm_layers.ScaledStdConv2d(4, 4, 1),
        nn.Flatten(),
        timm_layers.Linear(4 * 4 * 4, 3),
    )
    trace = trace_layers(model, torch.randn(1, 3, 8, 8))
    assert trace.names() == ["0", "1", "2", "4"]
    assert trace.layers[0].type.endswith("Conv2dSame") and trace.layers[0].out_shape == [1, 4, 4, 4]


def test_model_without_quantizable_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="no quantizable layer"):
        trace_layers(nn.Sequential(nn.ReLU(), nn.Conv1d(1, 1, 1)), torch.randn(1, 1, 4))


def test_example_input_that_does_not_run_is_a_clear_error_and_changes_nothing(tiny_net):
    tiny_net.train()
    before = state_snapshot(tiny_net)
    with pytest.raises(ValueError, match="example input does not run"):
        trace_layers(tiny_net, torch.randn(1, 5, 16, 16))
    assert same_state(tiny_net, before)
    assert tiny_net.training and all(m.training for m in tiny_net.modules())
    assert not any(m._forward_hooks for m in tiny_net.modules())


def test_trace_does_not_update_batchnorm_statistics(tiny_net, tiny_input):
    tiny_net.train()
    before = state_snapshot(tiny_net)
    trace_layers(tiny_net, tiny_input)
    assert same_state(tiny_net, before) and tiny_net.training


def test_conv_geometry_and_signature_resolve_same_padding():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        timm_layers.Conv2dSame(4, 4, 3, stride=2),
        nn.Conv2d(4, 4, 3, padding="same", dilation=2, bias=False),
    )
    layers = trace_layers(model, torch.randn(1, 3, 8, 8)).layers
    assert layers[0].stride == [2, 2] and layers[0].padding == [1, 1, 1, 1]
    assert layers[1].padding == [0, 0, 1, 1]  # TF-style "same" for a 4x4 input at stride 2: pad after only
    assert layers[2].padding == [2, 2, 2, 2] and layers[2].dilation == [2, 2]
    assert layers[0].signature() == "conv2d|in=1x3x8x8|out=1x4x4x4|w=4x3x3x3|s=2x2|p=1x1x1x1|d=1x1|g=1|bias=1"
    assert layers[2].signature().endswith("|bias=0")


def test_pruned_layers_are_traced_like_unpruned_ones(tiny_net, tiny_input):
    from torch.nn.utils import prune

    from ohq_lightning.layers import float_weight, is_weight_pruned, weight_parameter
    from ohq_lightning.quant import modules as quant_modules

    plain = trace_layers(tiny_net, tiny_input)
    prune.l1_unstructured(tiny_net.stem[0], "weight", amount=0.5)
    prune.random_unstructured(tiny_net.fc, "weight", amount=0.3)
    prune.l1_unstructured(tiny_net.fc, "weight", amount=0.2)  # pruned twice: a PruningContainer
    before = state_snapshot(tiny_net)
    pruned = trace_layers(tiny_net, tiny_input)
    assert pruned.names() == plain.names() and pruned.skipped == {}
    assert [layer.to_dict() for layer in pruned.layers] == [layer.to_dict() for layer in plain.layers]
    assert same_state(tiny_net, before)
    for module in (tiny_net.stem[0], tiny_net.fc):
        assert is_weight_pruned(module) and weight_parameter(module) is module.weight_orig
        assert torch.equal(float_weight(module), module.weight_orig * module.weight_mask)
    assert not is_weight_pruned(tiny_net.dw[0]) and weight_parameter(tiny_net.dw[0]) is tiny_net.dw[0].weight
    # the helpers moved here from quant.modules; the old import path still works
    assert quant_modules.float_weight is float_weight and quant_modules.is_weight_pruned is is_weight_pruned


def test_weight_that_is_no_parameter_is_still_skipped(tiny_net, tiny_input):
    fc = tiny_net.fc
    weight = fc.weight.detach().clone()
    del fc.weight
    fc.weight = weight  # a plain tensor attribute: not trainable, not quantizable
    trace = trace_layers(tiny_net, tiny_input)
    assert "fc" not in trace.names() and trace.skipped["fc"] == "weight is not a Parameter"
