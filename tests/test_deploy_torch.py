"""Deployment to torch's int8 CPU kernels (FX graph mode): fidelity to the fake-quant model, precision, grids."""

import random

import numpy as np
import pytest
import torch
from conftest import make_tiny_net, same_state, state_snapshot
from torch import nn

from ohq_lightning._util.timing import time_callable
from ohq_lightning.deploy import TorchInt8Builder, convert_torch, uniform_torch
from ohq_lightning.quant import apply_plan, calibrate, learned_quantization

# Deployed outputs differ from the fake-quant model's by what the int8 graph rounds and the fake-quant
# model keeps in float: every int8 layer's output is requantized (the fake-quant model quantizes only
# layer inputs), pooling averages uint8 values, and the last layer's output is uint8. On these nets that
# stays below 3% of the largest output.
TOLERANCE = 0.03

PLANS = [
    {"stem.0": "w8a8", "dw.0": "w8a8", "grouped.0": "w8a8", "fc": "w8a8"},
    {"stem.0": "w4a8", "dw.0": "fp32", "grouped.0": "w2a8", "fc": "w8a8"},
    {"stem.0": "fp32", "dw.0": "w4a8", "grouped.0": "fp32", "fc": "w4a8"},
]


@pytest.fixture
def example():
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def calibration():
    return [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) for seed in range(1, 5)]


def fake_quant_model(plan, calibration):
    model = apply_plan(make_tiny_net(), plan)
    calibrate(model, calibration, progress=False)
    return model


def quantized_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized") or "quantized" in type(module).__module__


class ResidualSE(nn.Module):
    """Residual adds, ReLU, Hardswish, pooling and a squeeze-excite multiply between six layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv_a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish())
        self.conv_b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.se_reduce = nn.Conv2d(8, 4, 1)
        self.se_expand = nn.Conv2d(4, 8, 1)
        self.gate = nn.Hardsigmoid()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.conv_b(self.conv_a(x))
        scale = self.gate(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        x = torch.relu(x + y * scale)
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def residual():
    torch.manual_seed(0)
    model = ResidualSE()
    with torch.no_grad():
        model.train()
        for _ in range(4):
            model(torch.randn(8, 3, 12, 12))
    return model.eval(), torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def test_uniform_fp32_reproduces_the_float_model(example):
    model = make_tiny_net()
    deployed = uniform_torch(model, "fp32", example)
    assert deployed.runtime == "torch" and deployed.engine == "x86" and deployed.threads == 1
    assert not any(quantized_module(m) for m in deployed.module.modules())
    with torch.no_grad():
        assert np.allclose(deployed(example), model(example).numpy(), atol=1e-5)  # BatchNorm folded: float rounding


@pytest.mark.parametrize("plan", PLANS, ids=["int8", "mix-a", "mix-b"])
def test_the_deployed_model_matches_the_fake_quant_model(plan, example, calibration):
    model = fake_quant_model(plan, calibration)
    deployed = convert_torch(model, plan, example)
    with torch.no_grad():
        reference = model(example).numpy()
    error = np.abs(deployed(example) - reference).max()
    assert error <= TOLERANCE * np.abs(reference).max()
    assert deployed.assignment == plan


def test_float_layers_stay_float_modules_and_integer_layers_run_int8(example, calibration):
    plan = PLANS[1]
    deployed = convert_torch(fake_quant_model(plan, calibration), plan, example)
    for name, option in plan.items():
        module = deployed.module.get_submodule(name)
        assert quantized_module(module) == (option != "fp32"), (name, type(module))
    assert isinstance(deployed.module.get_submodule("dw.0")[0], nn.Conv2d)  # float ConvReLU2d, BatchNorm folded
    code = deployed.module.code
    # int8 stem -> float dw -> int8 grouped, pool, flatten, fc: quantize at the input and before grouped,
    # dequantize before dw and at the output, nowhere else
    assert code.count("quantize_per_tensor(") == 2 and code.count(".dequantize()") == 2


@pytest.mark.parametrize("bits", [4, 2])
def test_sub_8_bit_weights_land_on_their_grid(bits, example, calibration):
    plan = {"stem.0": f"w{bits}a8", "dw.0": "w8a8", "grouped.0": f"w{bits}a8", "fc": f"w{bits}a8"}
    for model in (make_tiny_net(), fake_quant_model(plan, calibration)):  # calibrated, then learned steps
        deployed = convert_torch(model, plan, example, calibration_inputs=calibration)
        for name in ("stem.0", "grouped.0", "fc"):
            integers = deployed.module.get_submodule(name).weight().int_repr()
            per_channel = integers.reshape(integers.shape[0], -1)
            assert int(per_channel.abs().max()) <= 2 ** (bits - 1)  # the grid, mirrored where BatchNorm flips sign
            assert max(len(torch.unique(row)) for row in per_channel) <= 2**bits


def test_learned_step_sizes_are_used(example, calibration):
    plan = {"stem.0": "w8a8", "dw.0": "w8a8", "grouped.0": "w8a8", "fc": "w4a8"}
    model = fake_quant_model(plan, calibration)
    with torch.no_grad():  # as if fine-tuned: steps moved away from where calibration put them
        model.fc.weight_quantizer.set_scale(model.fc.weight_quantizer.scale * 1.3)
        model.stem[0].input_quantizer.set_scale(model.stem[0].input_quantizer.scale * 0.7)
    learned = learned_quantization(model)
    deployed = convert_torch(model, plan, example)
    fc = deployed.module.get_submodule("fc").weight()  # a linear layer: no BatchNorm folded into it
    assert torch.allclose(fc.q_per_channel_scales().float(), learned["fc"].weight_scale, rtol=1e-6)
    with torch.no_grad():
        assert torch.allclose(fc.dequantize(), model.fc.quantized_weight(), atol=1e-6)  # the fake-quant weight
    step = deployed.module._ohq_stem_0_input_scale_0
    zero_point = int(deployed.module._ohq_stem_0_input_zero_point_0)
    assert float(step) == pytest.approx(learned["stem.0"].input_scale, rel=1e-5)
    assert zero_point == (128 if learned["stem.0"].input_signed else 0)  # the signed grid on torch's uint8


def test_a_model_with_a_plan_is_deployed_from_its_float_weights_and_left_alone(example, calibration):
    model = fake_quant_model(PLANS[0], calibration)
    before = state_snapshot(model)
    convert_torch(model, PLANS[0], example)
    assert same_state(model, before)
    plain = make_tiny_net()
    before = state_snapshot(plain)
    uniform_torch(plain, "w8a8", example)
    assert same_state(plain, before) and type(plain.stem[0]) is nn.Conv2d


def test_elementwise_ops_follow_their_largest_input(residual):
    model, example = residual
    names = ["stem.0", "conv_a.0", "conv_b.0", "se_reduce", "se_expand", "fc"]
    int8 = uniform_torch(model, "w8a8", example)
    code = int8.module.code
    # uniform int8 is one int8 graph: quantized add, mul and Hardswish, one quantize in, one dequantize out
    assert code.count("quantize_per_tensor(") == 1 and code.count(".dequantize()") == 1
    assert "quantized.add" in code and "quantized.mul" in code
    builder = TorchInt8Builder(model, example)
    # squeeze-excite convs and fc in float: the excite multiply follows its large int8 input (the small
    # float gate is quantized instead), and so does the residual add after it
    nodes = builder.int8_nodes({"stem.0", "conv_a.0", "conv_b.0"})
    assert {"mean", "mul", "add"} <= nodes and not {"gate", "fc"} & nodes
    # the residual add reads two tensors of one size: it follows the one computed last (the main branch)
    assert "add" not in builder.int8_nodes({"stem.0"}) and "add" in builder.int8_nodes({"conv_b.0"})
    assert "mul" not in builder.int8_nodes({"se_reduce", "se_expand"})  # an int8 gate on a float activation
    with torch.no_grad():
        reference = model(example).numpy()
    rng = random.Random(0)
    for _ in range(12):  # any mix converts and runs (FX lowering pitfalls would show up here)
        plan = {name: rng.choice(["w8a8", "fp32"]) for name in names}
        output = convert_torch(model, plan, example)(example)
        assert np.abs(output - reference).max() <= 0.1 * np.abs(reference).max()


def test_runner_runs_one_inference(example):
    deployed = uniform_torch(make_tiny_net(), "w8a8", example)
    run = deployed.runner(example)
    assert run().shape == (1, 10)
    assert time_callable(run).median_ms > 0


def test_timm_models_trace_with_their_norm_act_and_linear_layers():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=4).eval()
    example = torch.randn(1, 3, 32, 32)
    deployed = uniform_torch(model, "w8a8", example)
    code = deployed.module.code
    assert "batch_norm" not in code  # BatchNormAct2d folded into the convolutions
    assert code.count("quantize_per_tensor(") == 1 and code.count(".dequantize()") == 1
    assert quantized_module(deployed.module.get_submodule("classifier"))  # timm's Linear on the int8 kernel
    assert deployed(example).shape == (1, 4)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.branch = Branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(self.conv(x))


class Branch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_an_untraceable_model_is_a_clear_error(example):
    with pytest.raises(
        ValueError, match=r"cannot deploy DataDependent: torch.fx could not trace it, in module 'branch'"
    ):
        convert_torch(DataDependent(), {"conv": "w8a8"}, example)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"nope": "w8a8"}, "does not have"),
        ({"stem.0": "w8a4"}, "cannot run on torch's CPU kernels"),
        ({"stem.0": "bf16"}, "cannot run on torch's CPU kernels"),
    ],
)
def test_bad_plans_are_rejected(plan, message, example):
    with pytest.raises(ValueError, match=message):
        convert_torch(make_tiny_net(), plan, example)


def test_unknown_engines_and_inputs_are_rejected(example):
    with pytest.raises(ValueError, match="unknown quantized engine"):
        convert_torch(make_tiny_net(), {}, example, engine="tpu")
    with pytest.raises(ValueError, match="one input tensor"):
        convert_torch(make_tiny_net(), {}, (example, example))


@pytest.mark.skipif("qnnpack" not in torch.backends.quantized.supported_engines, reason="no qnnpack in this build")
def test_the_qnnpack_engine_builds_and_runs(example, calibration):
    engine = torch.backends.quantized.engine
    plan = PLANS[1]
    model = fake_quant_model(plan, calibration)
    deployed = convert_torch(model, plan, example, engine="qnnpack")
    with torch.no_grad():
        reference = model(example).numpy()
    assert deployed.engine == "qnnpack"
    assert np.abs(deployed(example) - reference).max() <= TOLERANCE * np.abs(reference).max()
    assert torch.backends.quantized.engine == engine  # restored after building and running
