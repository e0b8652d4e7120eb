"""The model ONNX Runtime runs is the fake-quant model the user calibrated and fine-tuned.

Each case deploys a mixed w8a8 / w4a8 / fp32 plan of a fake-quant model and compares ORT's outputs
with the fake-quant model's (eval mode): after calibration, after multiplying the learned step sizes
and after a few optimizer steps. A deployment that re-derived the scales from the float weights and
calibration ranges (the old behaviour, reproduced by deploying the stripped float model) moves far
away once the steps change; the learned deployment stays within the tolerance stated in
:func:`~ohq_lightning.deploy.convert`.
"""

from __future__ import annotations

import collections
import copy

import lightning.pytorch as pl
import numpy as np
import onnx
import pytest
import timm
import torch
from conftest import fused_ops, make_tiny_net
from torch import nn
from torch.nn import functional as F

from ohq_lightning.deploy import DeployedModel, activation_ranges, convert, export_onnx, learned_grids, uniform
from ohq_lightning.layers import trace_layers
from ohq_lightning.quant import apply_plan, calibrate, learned_quantization, quantized_layers, strip_plan

#: largest |deployed - fake-quant| over the test inputs, as a fraction of the largest |fake-quant output|
TINY_TOLERANCE = 0.02
#: the same for the random-init MobileNetV3: its fake-quant model alone moves by 5-20% of its largest
#: output when its input moves by one part in 10^5 (a rounding step flipped early travels through a
#: network of high gain), so a runtime that is not bit-exact cannot come much closer
MOBILENET_TOLERANCE = 0.5
#: the deployment that ignores the learned steps must be at least this many times farther away
DISCRIMINATION = 4.0


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Torch on one thread: on a shared 2-core machine its thread pool made these tests 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_PLAN = {"stem.0": "w8a8", "dw.0": "fp32", "grouped.0": "w4a8", "fc": "w8a8"}
CHAINED_PLAN = {"stem.0": "w4a8", "dw.0": "w8a8", "grouped.0": "fp32", "fc": "w4a8"}


def _inputs(count: int, shape: tuple[int, ...], seed: int, signed: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(count, *shape, generator=generator)
    return x * 2 - 1 if signed else x


def _outputs(deployed: DeployedModel, inputs: torch.Tensor) -> np.ndarray:
    return np.concatenate([deployed(x[None]) for x in inputs])


def _fake_quant_outputs(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(inputs).numpy()


def _max_deviation(deployed: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(deployed - reference).max() / np.abs(reference).max())


def _multiply_steps(model: nn.Module) -> None:
    """Move every learned step size by a fifth, up or down in turn."""
    with torch.no_grad():
        for index, layer in enumerate(quantized_layers(model).values()):
            factor = 1.25 if index % 2 else 0.8
            layer.weight_quantizer.set_scale(layer.weight_quantizer.scale * factor)
            layer.input_quantizer.set_scale(layer.input_quantizer.scale / factor)


def _train(model: nn.Module, inputs: torch.Tensor, steps: int = 3, lr: float = 1e-3) -> float:
    """A few SGD steps of quantization-aware training (weights and step sizes; BatchNorm statistics frozen).

    Returns the largest relative change of a step size.
    """
    scales = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("quantizer.log_scale")}
    labels = torch.arange(len(inputs)) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.eval()
    for _ in range(steps):
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = dict(model.named_parameters())
    return max(float((params[n].detach() - s).exp().sub(1).abs().max()) for n, s in scales.items())


def _deviations(model: nn.Module, plan: dict[str, str], calibration: list[torch.Tensor], tests: torch.Tensor):
    """(learned deployment, deployment re-deriving the scales) outputs against the fake-quant outputs."""
    reference = _fake_quant_outputs(model, tests)
    learned = _outputs(convert(model, plan, tests[:1], calibration_inputs=calibration), tests)
    derived = _outputs(
        convert(strip_plan(copy.deepcopy(model)), plan, tests[:1], calibration_inputs=calibration), tests
    )
    return learned, derived, reference


def _mobilenet(size: int) -> nn.Module:
    """A random-init MobileNetV3 whose BatchNorm statistics are those of the test inputs' distribution."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        for batch in _inputs(64, (3, size, size), seed=5, signed=False).split(16):
            model(batch)
    return model.eval()


def _cyclic_plan(names: list[str]) -> dict[str, str]:
    return {name: ("w8a8", "w4a8", "fp32")[index % 3] for index, name in enumerate(names)}


@pytest.mark.parametrize(("plan", "signed"), [(TINY_PLAN, False), (CHAINED_PLAN, True)], ids=["unsigned", "chained"])
def test_tiny_net_deployment_matches_the_fake_quant_model(plan, signed, tmp_path):
    model = make_tiny_net()
    calibration = list(_inputs(16, (3, 16, 16), seed=1, signed=signed).split(4))
    tests = _inputs(16, (3, 16, 16), seed=2, signed=signed)
    apply_plan(model, plan)
    calibrate(model, calibration, progress=False)

    learned, derived, reference = _deviations(model, plan, calibration, tests)
    assert _max_deviation(learned, reference) < TINY_TOLERANCE

    _multiply_steps(model)
    learned, derived, reference = _deviations(model, plan, calibration, tests)
    assert _max_deviation(learned, reference) < TINY_TOLERANCE
    assert _max_deviation(derived, reference) > DISCRIMINATION * TINY_TOLERANCE

    assert _train(model, calibration[0]) > 1e-3
    learned, derived, reference = _deviations(model, plan, calibration, tests)
    assert _max_deviation(learned, reference) < TINY_TOLERANCE
    assert _max_deviation(derived, reference) > DISCRIMINATION * _max_deviation(learned, reference)

    deployed = convert(model, plan, tests[:1], calibration_inputs=calibration)
    ops = collections.Counter(fused_ops(deployed.onnx_model, tmp_path))
    integer = [name for name, option in plan.items() if option != "fp32"]
    assert ops["QLinearConv"] + ops["QGemm"] == len(integer)  # still ORT's int8 kernels


def test_mobilenet_deployment_matches_the_fake_quant_model():
    model = _mobilenet(32)
    shape = (3, 32, 32)
    plan = _cyclic_plan(trace_layers(model, torch.zeros(1, *shape)).names())
    assert set(plan.values()) == {"w8a8", "w4a8", "fp32"}
    calibration = list(_inputs(16, shape, seed=1, signed=False).split(4))
    tests = _inputs(16, shape, seed=2, signed=False)
    apply_plan(model, plan)
    calibrate(model, calibration, progress=False)

    learned, _, reference = _deviations(model, plan, calibration, tests)
    assert _max_deviation(learned, reference) < MOBILENET_TOLERANCE

    _multiply_steps(model)
    learned, derived, reference = _deviations(model, plan, calibration, tests)
    assert _max_deviation(learned, reference) < MOBILENET_TOLERANCE
    assert _max_deviation(derived, reference) > DISCRIMINATION * _max_deviation(learned, reference)

    assert _train(model, calibration[0]) > 1e-3
    learned, derived, reference = _deviations(model, plan, calibration, tests)
    assert _max_deviation(learned, reference) < MOBILENET_TOLERANCE
    assert _max_deviation(derived, reference) > DISCRIMINATION * _max_deviation(learned, reference)


def _initializers(graph) -> dict[str, np.ndarray]:
    return {init.name: onnx.numpy_helper.to_array(init) for init in graph.graph.initializer}


@pytest.mark.parametrize("which", ["tiny", "mobilenet"])
def test_integer_weights_and_input_grids_are_the_learned_ones(which):
    if which == "tiny":
        model, shape, plan = make_tiny_net(), (3, 16, 16), dict(CHAINED_PLAN)
    else:
        model, shape = _mobilenet(32), (3, 32, 32)
        plan = _cyclic_plan(trace_layers(model, torch.zeros(1, *shape)).names())
    apply_plan(model, plan)
    calibrate(model, list(_inputs(8, shape, seed=1, signed=True).split(4)), progress=False)
    _multiply_steps(model)
    learned = learned_quantization(model)
    layers = quantized_layers(model)
    inits = _initializers(convert(model, plan, _inputs(1, shape, seed=2, signed=True)).onnx_model)
    checked = 0
    for name, option in plan.items():
        if option == "fp32":
            continue
        found = learned[name]
        step = found.weight_scale.reshape(-1, *[1] * (layers[name].weight.dim() - 1))
        qmin, qmax = -(2 ** (found.weight_bits - 1)), 2 ** (found.weight_bits - 1) - 1
        ints = torch.clamp(torch.round(layers[name].weight.detach() / step), qmin, qmax).numpy()
        assert np.array_equal(inits[f"{name}#0.w_q"], ints), name  # the BatchNorm went into the scale
        assert inits[f"{name}#0.x_scale"] == np.float32(found.input_scale), name
        assert int(inits[f"{name}#0.x_zp"]) == (128 if found.input_signed else 0), name
        checked += 1
    assert checked == sum(option != "fp32" for option in plan.values())
    plain = "fc" if which == "tiny" else "conv_head"  # no BatchNorm folded in: the very step sizes
    assert np.array_equal(inits[f"{plain}#0.w_scale"], learned[plain].weight_scale.numpy())


def test_an_output_feeding_integer_layers_is_quantized_on_their_grid_and_the_last_gemm_stays_float():
    model = make_tiny_net()
    apply_plan(model, CHAINED_PLAN)
    calibrate(model, [_inputs(4, (3, 16, 16), seed=1, signed=True)], progress=False)
    _multiply_steps(model)
    graph = convert(model, CHAINED_PLAN, _inputs(1, (3, 16, 16), seed=2, signed=True)).onnx_model
    inits = _initializers(graph)
    # stem.0 -> BatchNorm -> ReLU -> dw.0: the ReLU's output is quantized on dw.0's learned input grid
    assert inits["stem.0#0.y_scale"] == inits["dw.0#0.x_scale"]
    assert inits["stem.0#0.y_zp"] == inits["dw.0#0.x_zp"]
    # the classifier writes float logits (ORT's QGemm with float output): no requantization
    assert "fc#0.y_scale" not in inits
    assert not any(node.input[0] == "fc#0.y" for node in graph.graph.node if node.op_type == "QuantizeLinear")


def test_layers_never_calibrated_or_at_another_option_fall_back_to_derived_scales():
    model = make_tiny_net()
    example = _inputs(1, (3, 16, 16), seed=2, signed=False)
    apply_plan(model, {"stem.0": "w4a8", "fc": "w8a8"})
    calibrate(model, [_inputs(4, (3, 16, 16), seed=1, signed=False)], progress=False)
    quantized_layers(model)["fc"].input_quantizer.calibrated.fill_(False)  # as if never calibrated
    grids = learned_grids(model, {"stem.0": "w8a8", "fc": "w8a8", "dw.0": "w8a8"})
    assert grids["stem.0"].weight is None and grids["stem.0"].input_qparams is not None  # 4-bit weights learned
    assert grids["fc"].weight is not None and grids["fc"].input_qparams is None
    assert "dw.0" not in grids  # no fake-quant twin

    deployed = uniform(model, "w8a8", example)
    inits = _initializers(deployed.onnx_model)
    assert inits["stem.0#0.w_q"].max() > 7  # re-derived on the 8-bit grid, not the learned 4-bit one
    float_model = strip_plan(copy.deepcopy(model))
    graph = export_onnx(float_model, example)
    ranges = activation_ranges(graph, trace_layers(float_model, example).names(), [example])
    assert inits["fc#0.x_scale"] == np.float32(ranges["fc"][0].qparams()[0])


class _TinyModule(pl.LightningModule):
    """The tiny test net as a LightningModule on random 16x16 images."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_tiny_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_callback_exports_the_fine_tuned_quantization(tmp_path):
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from ohq_lightning.callback import OHQCallback
    from ohq_lightning.deploy import ort_session

    images = _inputs(32, (3, 16, 16), seed=3, signed=True)
    loader = DataLoader(TensorDataset(images, torch.arange(32) % 10), batch_size=8)
    plan = {"net.stem.0": "w8a8", "net.dw.0": "w4a8", "net.fc": "w8a8"}
    module = _TinyModule()
    callback = OHQCallback(plan=plan, progress=False, export_onnx="plan.onnx")
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
    )
    module.train()
    trainer.fit(module, loader)
    learned = learned_quantization(module)
    assert sorted(learned) == sorted(plan)
    graph = onnx.load(tmp_path / "plan.onnx")
    inits = _initializers(graph)
    for name, found in learned.items():
        assert inits[f"{name}#0.x_scale"] == np.float32(found.input_scale), name
    session = ort_session(graph.SerializeToString(), 1)
    deployed = np.concatenate([session.run(None, {"x": x[None].numpy()})[0] for x in images])
    assert _max_deviation(deployed, _fake_quant_outputs(module, images)) < TINY_TOLERANCE
