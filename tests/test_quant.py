import copy

import pytest
import torch
from conftest import make_tiny_net, same_state, state_snapshot
from timm import layers as timm_layers
from torch import nn
from torch.nn.utils import prune

from ohq_lightning.quant import (
    ActivationFakeQuant,
    QuantLayer,
    WeightFakeQuant,
    apply_plan,
    calibrate,
    learned_quantization,
    quantized_layers,
    strip_plan,
)
from ohq_lightning.quant.modules import float_weight, is_weight_pruned
from ohq_lightning.quant.swap import deployable_copy

PLAN = {"stem.0": "w8a8", "dw.0": "w4a8", "grouped.0": "w2a8", "fc": "fp32"}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_fake_quant_uses_at_most_2_to_the_bits_levels_per_channel(bits):
    weight = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(bits))
    quantizer = WeightFakeQuant(weight, bits)
    quantized = quantizer(weight).detach()
    for channel in range(weight.shape[0]):
        levels = torch.round(quantized[channel] / quantizer.scale[channel]).unique()
        assert levels.numel() <= 2**bits
        assert levels.min() >= -(2 ** (bits - 1)) and levels.max() <= 2 ** (bits - 1) - 1
    error = (quantized - weight).pow(2).mean()
    # a Gaussian's MSE-optimal uniform grid of 4 / 8 / 16 / 256 levels leaves about 0.119 / 0.037 / 0.012 / 3.5e-5
    # of its power (Max 1960); the 2-bit grid [-2, 1] is lopsided, so more (measured: 0.151 / 0.041 / 0.0084 / 3.6e-5)
    assert error < weight.pow(2).mean() * {2: 0.2, 3: 0.06, 4: 0.02, 8: 1e-4}[bits]


def test_weight_fake_quant_rounds_to_its_grid_and_clips_at_its_ends():
    quantizer = WeightFakeQuant(torch.ones(1, 5), 4)
    quantizer.set_scale(0.25)
    weight = torch.tensor([[0.26, -1.0, 0.74, 3.0, -3.0]])
    # w / 0.25 = [1.04, -4, 2.96, 12, -12] -> round [1, -4, 3, 12, -12] -> clamp to the w4 grid [-8, 7]
    # [1, -4, 3, 7, -8] -> times 0.25 = [0.25, -1.0, 0.75, 1.75, -2.0]
    torch.testing.assert_close(quantizer(weight).detach(), torch.tensor([[0.25, -1.0, 0.75, 1.75, -2.0]]))


def test_lower_bits_give_larger_weight_error():
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    errors = [float((WeightFakeQuant(weight, b)(weight).detach() - weight).pow(2).mean()) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]


def test_activation_quant_is_unsigned_for_nonnegative_input_and_signed_otherwise():
    positive = torch.rand(4, 100)
    quantizer = ActivationFakeQuant(4)
    quantizer.calibrate_from(positive)
    assert not bool(quantizer.signed)
    assert torch.round(quantizer(positive) / quantizer.scale).unique().numel() <= 16
    signed = ActivationFakeQuant(4)
    signed.calibrate_from(torch.randn(4, 100))
    assert bool(signed.signed)


def test_straight_through_gradients_reach_weights_inputs_and_step_sizes():
    layer = QuantLayer(nn.Linear(5, 3), "w4a8")
    x = torch.randn(8, 5, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.module.weight.grad is not None and layer.module.weight.grad.abs().sum() > 0
    assert layer.weight_quantizer.log_scale.grad is not None
    assert layer.input_quantizer.log_scale.grad is not None


def _step_size_moves(optimizer_class, lr: float, steps: int = 5) -> torch.Tensor:
    """Relative change of every weight step size after ``steps`` steps of ``optimizer_class`` on a conv
    whose step sizes are near 1e-3 (typical of trained weights)."""
    torch.manual_seed(0)
    layer = QuantLayer(nn.Conv2d(16, 32, 3), "w8a8")
    with torch.no_grad():
        layer.module.weight.mul_(0.02)
    layer.weight_quantizer = WeightFakeQuant(layer.module.weight, 8)  # step sizes of the scaled-down weight
    before = layer.weight_quantizer.scale.detach().clone()
    optimizer = optimizer_class(layer.parameters(), lr=lr)
    for _ in range(steps):
        loss = layer(torch.randn(4, 16, 8, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return layer.weight_quantizer.scale.detach() / before - 1


def test_adam_moves_step_sizes_by_relative_amounts():
    moves = _step_size_moves(torch.optim.AdamW, lr=3e-4)
    assert float(moves.abs().max()) < 5 * 3e-4 * 1.05  # about lr per step, relative, whatever the size
    assert float(moves.abs().max()) > 0


def test_sgd_steps_on_step_sizes_stay_finite_and_bounded_under_huge_gradients():
    layer = QuantLayer(nn.Linear(5, 3), "w4a8")
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    before = layer.weight_quantizer.scale.detach().clone()
    (layer(torch.randn(8, 5)).sum() * 1e12).backward()
    optimizer.step()
    after = layer.weight_quantizer.scale.detach()
    assert torch.isfinite(after).all()
    assert float((after / before).log().abs().max()) <= 0.5 + 1e-6  # at most a factor exp(lr)


def test_checkpoints_with_linear_step_sizes_still_load():
    layer = QuantLayer(nn.Linear(5, 3), "w4a8")
    layer.input_quantizer.calibrate_from(torch.rand(8, 5))
    state = layer.state_dict()
    legacy = {k.replace("log_scale", "scale"): (v.exp() if k.endswith("log_scale") else v) for k, v in state.items()}
    fresh = QuantLayer(nn.Linear(5, 3), "w4a8")
    fresh.load_state_dict(legacy)
    assert torch.allclose(fresh.weight_quantizer.scale, layer.weight_quantizer.scale)
    assert torch.allclose(fresh.input_quantizer.scale, layer.input_quantizer.scale)


def test_apply_plan_keeps_the_original_parameters_and_strip_restores_the_model(tiny_net, tiny_input):
    reference = tiny_net(tiny_input)
    weights = {name: module.weight for name, module in tiny_net.named_modules() if hasattr(module, "weight")}
    apply_plan(tiny_net, PLAN)
    swapped = quantized_layers(tiny_net)
    assert sorted(swapped) == ["dw.0", "grouped.0", "stem.0"]  # fp32 leaves the layer as it is
    assert isinstance(tiny_net.fc, nn.Linear)
    for name, layer in swapped.items():
        assert layer.module.weight is weights[name] and layer.option == PLAN[name]
    assert not torch.allclose(tiny_net(tiny_input), reference)
    strip_plan(tiny_net)
    assert not quantized_layers(tiny_net)
    assert torch.equal(tiny_net(tiny_input), reference)
    assert tiny_net.stem[0].weight is weights["stem.0"]


@pytest.mark.parametrize("before", [True, False])
def test_an_optimizer_built_before_or_after_the_swap_trains_the_swapped_weights(before, tiny_input):
    model = make_tiny_net().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1) if before else None
    start = {name: model.get_submodule(name).weight.detach().clone() for name in PLAN}
    apply_plan(model, PLAN)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 16, 16)).logsumexp(dim=1).mean().backward()
    optimizer.step()
    for name in PLAN:
        layer = model.get_submodule(name)
        weight = layer.module.weight if isinstance(layer, QuantLayer) else layer.weight
        assert not torch.equal(weight.detach(), start[name]), name


def test_bad_plans_are_rejected_before_anything_changes(tiny_net):
    before = state_snapshot(tiny_net)
    for plan, message in [
        ({"stem.0": "w4a8", "nope": "w8a8"}, "does not have"),
        ({"stem.0": "w4a8", "fc": "w9a8"}, "between 2 and 8"),
        ({"stem.0": "w4a8", "stem.1": "w8a8"}, "cannot be quantized"),
    ]:
        with pytest.raises(ValueError, match=message):
            apply_plan(tiny_net, plan)
        assert not quantized_layers(tiny_net) and same_state(tiny_net, before)
    apply_plan(tiny_net, {"fc": "w8a8"})
    with pytest.raises(ValueError, match="already quantized"):
        apply_plan(tiny_net, {"fc": "w4a8"})


def test_a_module_shared_under_two_names_is_swapped_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    apply_plan(model, {"0": "w4a8"})
    assert model[0] is model[2] and isinstance(model[0], QuantLayer)
    strip_plan(model)
    assert model[0] is shared and model[2] is shared


@pytest.mark.parametrize(
    "make",
    [
        lambda: timm_layers.Conv2dSame(3, 4, 3, stride=2),
        lambda: timm_layers.StdConv2d(3, 4, 3, padding=1),
        lambda: timm_layers.ScaledStdConv2d(3, 4, 3, padding=1),
    ],
)
def test_timm_subclasses_keep_computing_what_they_computed(make):
    torch.manual_seed(0)
    module = make()
    x = torch.randn(2, 3, 9, 9)
    reference = module(x)
    model = nn.Sequential(module)
    apply_plan(model, {"0": "w8"})  # 8-bit weights only: close to the float layer
    out = model(x)
    assert out.shape == reference.shape
    assert torch.allclose(out, reference, atol=0.01 * reference.abs().max().item())  # measured: at most 0.0043
    strip_plan(model)
    assert torch.equal(model(x), reference)


def test_calibrate_sets_activation_ranges_from_batches(tiny_net):
    apply_plan(tiny_net, {"stem.0": "w8a8", "dw.0": "w8a4"})
    batches = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    assert calibrate(tiny_net, batches, progress=False) == 3
    stem, dw = tiny_net.stem[0].input_quantizer, tiny_net.dw[0].input_quantizer
    assert bool(stem.calibrated) and bool(stem.signed)
    assert bool(dw.calibrated) and not bool(dw.signed)  # after ReLU
    assert 0 < float(dw.scale.detach()) < 1


def test_bf16_option_rounds_through_bfloat16():
    layer = QuantLayer(nn.Linear(4, 4), "bf16")
    x = torch.randn(3, 4)
    expected = nn.functional.linear(x.bfloat16().float(), layer.module.weight.bfloat16().float(), layer.module.bias)
    assert torch.allclose(layer(x), expected)


def test_forward_keyword_arguments_pass_through():
    class KeywordNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, *, scale=1.0):
            return self.fc(x) * scale

    model = KeywordNet()
    apply_plan(model, {"fc": "w4a8"})
    x = torch.randn(3, 4)
    assert torch.allclose(model(x, scale=2.0), 2 * model(x))


def test_a_given_activation_sign_is_kept_at_calibration():
    signed = ActivationFakeQuant(4, signed=True)
    signed.calibrate_from(torch.rand(4, 100))
    assert bool(signed.signed) and signed.int_range == (-8, 7)
    unsigned = ActivationFakeQuant(4, signed=False)
    unsigned.calibrate_from(torch.randn(4, 100))
    assert not bool(unsigned.signed) and unsigned(torch.randn(4, 100)).min() >= 0
    layer = QuantLayer(nn.Linear(4, 2), "w8a8", input_signed=True)
    calibrate(nn.Sequential(layer), [torch.rand(3, 4)], progress=False)
    assert bool(layer.input_quantizer.signed)


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_mse_scale_puts_the_scales_along_the_given_dimension(dim):
    from ohq_lightning.quant.fake_quant import mse_scale

    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    scale = mse_scale(x, 4, signed=True, dim=dim)
    expected_shape = [1, 1, 1]
    expected_shape[dim] = x.shape[dim]
    assert list(scale.shape) == expected_shape
    moved = mse_scale(x.movedim(dim, 0).contiguous(), 4, signed=True, dim=0)
    assert torch.equal(scale, moved.movedim(0, dim))


def test_strip_plan_can_strip_only_the_named_layers(tiny_net, tiny_input):
    reference = tiny_net(tiny_input)
    apply_plan(tiny_net, {"stem.0": "w8a8", "fc": "w4a8"})
    strip_plan(tiny_net, ["fc"])
    assert sorted(quantized_layers(tiny_net)) == ["stem.0"]
    assert isinstance(tiny_net.fc, nn.Linear)
    with pytest.raises(ValueError, match="not a fake-quant layer"):
        strip_plan(tiny_net, ["stem.0", "dw.0"])
    assert sorted(quantized_layers(tiny_net)) == ["stem.0"]  # checked before anything changes
    strip_plan(tiny_net, ["stem.0"])
    assert not quantized_layers(tiny_net) and torch.equal(tiny_net(tiny_input), reference)


def test_strip_plan_by_name_reaches_a_shared_layer_under_any_of_its_names():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    apply_plan(model, {"0": "w4a8"})
    strip_plan(model, ["2"])
    assert model[0] is shared and model[2] is shared


def test_a_wrapper_that_fails_to_build_leaves_the_model_as_it_was(tiny_net, monkeypatch):
    from ohq_lightning.quant import modules

    built = []

    def failing(weight, bits):
        if built:
            raise RuntimeError("cannot build")
        built.append(bits)
        return WeightFakeQuant(weight, bits)

    monkeypatch.setattr(modules, "WeightFakeQuant", failing)  # the second QuantLayer fails to build
    before = state_snapshot(tiny_net)
    with pytest.raises(RuntimeError, match="cannot build"):
        apply_plan(tiny_net, {"stem.0": "w8a8", "fc": "w4a8"})
    assert built == [8] and not quantized_layers(tiny_net) and same_state(tiny_net, before)


@pytest.mark.parametrize("pruned", ["before wrapping", "after wrapping"])
def test_a_quant_layer_around_a_pruned_conv_quantizes_the_pruned_weight(pruned):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    if pruned == "before wrapping":
        prune.l1_unstructured(conv, "weight", amount=0.5)
    layer = QuantLayer(conv, "w4a8")
    if pruned == "after wrapping":
        prune.l1_unstructured(conv, "weight", amount=0.5)
    assert is_weight_pruned(conv)
    zero = conv.weight_mask == 0
    assert int(zero.sum()) == 108
    with torch.no_grad():
        conv.weight_orig.mul_(0.5)  # the trained parameter moves on; the stale ``conv.weight`` does not
    masked = conv.weight_orig * conv.weight_mask
    assert torch.equal(layer.weight, masked) and not isinstance(layer.weight, nn.Parameter)
    quantized = layer.quantized_weight()
    assert bool((quantized[zero] == 0).all()) and int((quantized == 0).sum()) >= 108
    # w4 is the signed grid [-2**3, 2**3 - 1] = [-8, 7] with one step size s per output channel:
    # q = clamp(round(w / s), -8, 7) * s
    step = layer.weight_quantizer.scale.detach()
    assert step.shape == (8, 1, 1, 1)
    assert torch.equal(quantized, torch.clamp(torch.round(masked / step), -8, 7) * step)

    x = torch.randn(2, 3, 6, 6)
    out = layer(x)
    # the first forward calibrates the input quantizer on ``x``; randn has negative values, so its grid is
    # the signed a8 one, [-2**7, 2**7 - 1] = [-128, 127]: x_q = clamp(round(x / s), -128, 127) * s
    assert bool(layer.input_quantizer.signed)
    step = layer.input_quantizer.scale.detach()
    x_quantized = torch.clamp(torch.round(x / step), -128, 127) * step
    expected = nn.functional.conv2d(x_quantized, quantized, conv.bias, padding=1)
    torch.testing.assert_close(out, expected)  # the forward computes with exactly the quantized pruned weight
    out.square().sum().backward()
    grad = conv.weight_orig.grad
    assert grad is not None and bool((grad[zero] == 0).all()) and bool((grad[~zero] != 0).any())
    assert layer.weight_quantizer.log_scale.grad is not None

    stripped = strip_plan(nn.Sequential(layer))[0]
    assert stripped is conv and is_weight_pruned(conv)  # the pruned conv, as it was
    with torch.no_grad():
        torch.testing.assert_close(conv(x), nn.functional.conv2d(x, masked, conv.bias, padding=1))


def test_a_pruned_model_takes_a_plan_calibrates_trains_and_deploys_its_masked_weights(tiny_net, tiny_input):
    prune.l1_unstructured(tiny_net.stem[0], "weight", amount=0.5)
    model = apply_plan(tiny_net, PLAN)
    layer = model.stem[0]
    prune.l1_unstructured(model.dw[0].module, "weight", amount=0.3)  # pruned after the swap too
    calibrate(model, [torch.randn(4, 3, 16, 16)], progress=False)
    assert set(learned_quantization(model)) == {"stem.0", "dw.0", "grouped.0"}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert any(p is layer.module.weight_orig for group in optimizer.param_groups for p in group["params"])
    model.train()
    model(torch.randn(4, 3, 16, 16)).logsumexp(dim=1).mean().backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="deepcopy"):  # a plain copy fails after a training forward
        copy.deepcopy(model)

    model.eval()
    kept, stripped = deployable_copy(model), deployable_copy(model, strip=True)
    assert sorted(quantized_layers(kept)) == sorted(quantized_layers(model)) and not quantized_layers(stripped)
    for name in ("stem.0", "dw.0"):
        masked = float_weight(model.get_submodule(name).module).detach()
        for conv in (kept.get_submodule(name).module, stripped.get_submodule(name)):
            assert isinstance(conv.weight, nn.Parameter) and not is_weight_pruned(conv)
            assert torch.equal(conv.weight, masked)  # pruning made permanent: the masked values
    assert is_weight_pruned(model.stem[0].module) and is_weight_pruned(model.dw[0].module)  # the model is unchanged
    with torch.no_grad():
        torch.testing.assert_close(kept(tiny_input), model(tiny_input))
        torch.testing.assert_close(stripped(tiny_input), strip_plan(model)(tiny_input))  # the pruned float model


def test_removing_the_pruning_after_the_wrap_leaves_a_plain_quant_layer():
    conv = nn.Linear(6, 4)
    layer = QuantLayer(conv, "w8a8")
    prune.random_unstructured(conv, "weight", amount=0.5)
    zero = conv.weight_mask == 0
    prune.remove(conv, "weight")
    assert not is_weight_pruned(conv) and isinstance(conv.weight, nn.Parameter)
    assert bool((layer.quantized_weight()[zero] == 0).all())
    layer(torch.randn(3, 6)).sum().backward()
    assert conv.weight.grad is not None
