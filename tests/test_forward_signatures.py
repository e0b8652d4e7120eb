"""Models whose ``forward`` has keyword-only or defaulted arguments, called with one tensor, everywhere.

The legacy ONNX exporter fills a defaulted argument in positionally (``forward() takes 2 positional
arguments but 3 were given``, or a graph input nobody feeds) and FX makes one a graph input: every
export and trace goes through a wrapper that calls the model with exactly the example's arguments.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import same_state, state_snapshot
from torch import nn

import ohq_lightning as ohq
from ohq_lightning._util.timing import Timing, TimingSettings
from ohq_lightning.deploy import ExampleCall, deploy_plan, deploy_uniform, export_onnx, layer_nodes
from ohq_lightning.hardware import AnalyticalTarget, CPUTarget, CUDATarget
from ohq_lightning.hardware.cuda import DeviceInfo
from ohq_lightning.hardware.table import TableTarget, export_cost_table
from ohq_lightning.layers import trace_layers

QUICK = TimingSettings(warmup=1, min_repeats=3, max_repeats=5, max_seconds=0.05)
SEARCH = {"num_samples": 2, "distill_steps": 1, "progress": False, "cache_dir": False}
RUNTIMES = ("onnxruntime", "torch")
NAMES = ["stem.0", "conv", "fc"]


class KeywordOnly(nn.Module):
    """A keyword-only argument with a default, and a parameter of the root module itself."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 3).view(1, 3, 1, 1))
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 16, 3, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, *, temperature: float = 2.0) -> torch.Tensor:
        x = torch.relu(self.conv(self.stem(x * self.gain)))
        return self.fc(x.mean((2, 3))) / temperature


class PositionalDefault(KeywordOnly):
    """Positional arguments with defaults (a number and None)."""

    def forward(self, x: torch.Tensor, scale: float = 0.5, shift: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x, temperature=1.0) * scale
        return out if shift is None else out + shift


MODELS = {"keyword-only": KeywordOnly, "positional-default": PositionalDefault}


@pytest.fixture(params=list(MODELS))
def model_and_input(request):
    torch.manual_seed(0)
    model = MODELS[request.param]()
    with torch.no_grad():  # BatchNorm statistics of some data, not the init's 0/1
        model.train()
        model(torch.rand(16, 3, 16, 16))
    return model.eval(), torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def reference(model: nn.Module, example: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(example).numpy()


def close_to_float(deployed, model: nn.Module, example: torch.Tensor, integer: bool) -> None:
    """The tolerances of the deploy tests: fp32 to rounding, int8 within 10% of the output's scale."""
    expected = reference(model, example)
    output = np.asarray(deployed(example))
    assert output.shape == expected.shape
    if integer:
        assert np.abs(output - expected).max() < 0.1 * np.abs(expected).max()
    else:
        assert np.allclose(output, expected, atol=1e-5)


def untouched(model: nn.Module) -> bool:
    """The model's forward is its class's own (nothing patched on the instance)."""
    return "forward" not in vars(model) and all("forward" not in vars(m) for m in model.modules())


# --- the wrapper ------------------------------------------------------------------------------------


def test_the_wrapper_calls_the_model_with_exactly_the_examples_arguments(model_and_input):
    model, example = model_and_input
    expected = reference(model, example)
    for given in (example, (example,), [example], {"x": example}):
        call = ExampleCall(model, given)
        with torch.no_grad():
            assert np.array_equal(call(call.example_inputs).numpy(), expected)
        assert [name for name, _ in call.named_modules()][1:] == [name for name, _ in model.named_modules()][1:]
        assert call.state_dict().keys() == model.state_dict().keys()  # the user's names, no prefix
    # a keyword that is no tensor is passed as it is; a second tensor is a second input
    extra = {"temperature": 4.0} if type(model) is KeywordOnly else {"shift": torch.ones(10)}
    call = ExampleCall(model, {"x": example, **extra})
    with torch.no_grad():
        assert np.array_equal(call(call.example_inputs).numpy(), model(example, **extra).numpy())
    before = state_snapshot(model)
    graph = export_onnx(model, {"x": example, **extra})
    assert set(layer_nodes(graph, NAMES)) == set(NAMES)
    assert len(graph.graph.input) == (1 if "temperature" in extra else 2)
    assert same_state(model, before) and untouched(model)


# --- every target, then the plan deployed on every runtime ------------------------------------------


def table_target(tmp_path, model: nn.Module, example: torch.Tensor) -> TableTarget:
    layers = trace_layers(model, example).layers
    costs = AnalyticalTarget(options=("fp32", "w8a8", "w4a8")).costs(layers)
    return TableTarget(export_cost_table(costs, layers, tmp_path / "costs.csv"))


TARGETS = {
    "analytical": lambda tmp_path, model, example: "analytical",
    "table": table_target,
    "cpu-onnxruntime": lambda tmp_path, model, example: CPUTarget(
        threads=1, timing=QUICK, samples_per_layer=1.5, cache_dir=tmp_path, progress=False
    ),
    "cpu-torch": lambda tmp_path, model, example: CPUTarget(
        runtime="torch", threads=1, timing=QUICK, samples_per_layer=1.5, cache_dir=tmp_path, progress=False
    ),
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_search_on_every_target_deploys_on_every_runtime(target, model_and_input, tmp_path):
    model, example = model_and_input
    before = state_snapshot(model)
    plan = ohq.search(model, example, target=TARGETS[target](tmp_path, model, example), **SEARCH)
    assert list(plan.assignment) == NAMES  # the user's layer names: no wrapper prefix
    integer = any(not option.startswith("fp") for option in plan.assignment.values())
    for runtime in RUNTIMES:
        deployed = deploy_plan(model, plan, example, runtime=runtime)
        close_to_float(deployed, model, example, integer)
    assert same_state(model, before) and untouched(model)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("option", ["fp32", "w8a8"])
def test_uniform_deployment_on_every_runtime(runtime, option, model_and_input):
    model, example = model_and_input
    before = state_snapshot(model)
    deployed = deploy_uniform(model, option, example, runtime=runtime)
    assert set(deployed.assignment) == set(NAMES)
    close_to_float(deployed, model, example, integer=option != "fp32")
    assert same_state(model, before) and untouched(model)


def test_the_cuda_targets_network_forward_runs_here(model_and_input, tmp_path):
    """What of the cuda target runs without a GPU: its timing of the whole model's forward (the base latency)."""
    model, example = model_and_input

    def run_once(kernels, settings):
        for kernel in kernels:
            kernel.run()
        return [Timing(10.0 if kernel.name == "network" else 1.0, 0.01, 3) for kernel in kernels]

    layers = trace_layers(model, example).layers
    table = CUDATarget(options=("fp32",), timing=QUICK, cache_dir=tmp_path, progress=False).measure_on(
        layers,
        device="cpu",
        info=DeviceInfo("Scripted GPU", (9, 0), torch.__version__, "13.0", 92400),
        timer=run_once,
        model=model,
        example_inputs=example,
    )
    assert table.base_latency_ms == pytest.approx(10.0 - len(layers))
