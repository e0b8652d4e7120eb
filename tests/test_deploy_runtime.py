"""The runtime registry: deploy_plan / deploy_uniform dispatch by name, and what the runtimes share."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import make_tiny_net

from ohq_lightning.deploy import (
    RUNTIMES,
    BaseDeployedModel,
    DeployedModel,
    Runtime,
    TorchDeployedModel,
    deploy_plan,
    deploy_uniform,
    get_runtime,
    register_runtime,
    uniform_assignment,
)
from ohq_lightning.deploy.learned import learned_input_qparams, learned_weight_scale, qparams_range
from ohq_lightning.quant import apply_plan
from ohq_lightning.quant.export import LearnedQuantization

NAMES = ["stem.0", "dw.0", "grouped.0", "fc"]


@pytest.fixture
def model_and_input():
    example = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return make_tiny_net(), example


def test_both_runtimes_are_registered_and_follow_the_protocol():
    assert list(RUNTIMES) == ["onnxruntime", "torch"]
    for name, runtime in RUNTIMES.items():
        assert isinstance(runtime, Runtime) and runtime.name == name and get_runtime(name) is runtime


@pytest.mark.parametrize(("runtime", "kind"), [("onnxruntime", DeployedModel), ("torch", TorchDeployedModel)])
def test_deploy_plan_and_deploy_uniform_dispatch_by_name(runtime, kind, model_and_input):
    model, example = model_and_input
    plan = {"stem.0": "w8a8", "fc": "fp32"}
    deployed = deploy_plan(model, plan, example, runtime=runtime)
    assert type(deployed) is kind and isinstance(deployed, BaseDeployedModel)
    assert deployed.runtime == runtime and deployed.assignment == plan
    fp32 = deploy_uniform(model, "fp32", example, runtime=runtime)
    assert fp32.assignment == dict.fromkeys(NAMES, "fp32")
    with torch.no_grad():
        reference = model(example).numpy()
    assert np.allclose(fp32(example), reference, atol=1e-4)
    assert np.allclose(fp32(example.numpy()), reference, atol=1e-4)  # an array is accepted too


def test_an_unknown_runtime_is_rejected_with_the_available_ones(model_and_input):
    model, example = model_and_input
    for call in (
        lambda: deploy_plan(model, {"fc": "w8a8"}, example, runtime="tensorrt"),
        lambda: deploy_uniform(model, "w8a8", example, runtime="tensorrt"),
    ):
        with pytest.raises(ValueError, match=r"unknown deployment runtime 'tensorrt'.*'onnxruntime', 'torch'"):
            call()


@dataclass(frozen=True)
class _EchoRuntime:
    """A runtime that hands back what it was asked to deploy."""

    name: str = "echo"

    def convert(self, model, plan, example_inputs, **kwargs):
        return ("plan", dict(plan), kwargs)

    def uniform(self, model, option, example_inputs, **kwargs):
        return ("uniform", option, kwargs)


def test_a_registered_runtime_is_dispatched_to(model_and_input):
    model, example = model_and_input
    try:
        register_runtime(_EchoRuntime())
        assert deploy_plan(model, {"fc": "w8a8"}, example, runtime="echo", threads=2) == (
            "plan",
            {"fc": "w8a8"},
            {"threads": 2},
        )
        assert deploy_uniform(model, "w4a8", example, runtime="echo") == ("uniform", "w4a8", {})
    finally:
        RUNTIMES.pop("echo", None)
    with pytest.raises(TypeError, match="convert"):
        register_runtime(object())  # type: ignore[arg-type]


def test_uniform_assignment_names_the_float_layers_of_a_fake_quant_model(model_and_input):
    model, example = model_and_input
    assert uniform_assignment(model, "w8a8", example) == dict.fromkeys(NAMES, "w8a8")
    apply_plan(model, {"stem.0": "w4a8"})
    assert uniform_assignment(model, "fp32", example) == dict.fromkeys(NAMES, "fp32")


def test_learned_grids_in_uint8_terms():
    signed = LearnedQuantization("w4a8", 4, torch.tensor([0.1, 0.2]), 8, 0.5, True)
    unsigned = LearnedQuantization("w4a8", 4, None, 8, 0.25, False)
    assert learned_input_qparams(signed) == (0.5, 128)
    assert qparams_range((0.5, 128)) == (-64.0, 63.5)  # [-128, 127] steps of 0.5
    assert learned_input_qparams(unsigned) == (0.25, 0)
    assert qparams_range((0.25, 0)) == (0.0, 63.75)  # [0, 255] steps of 0.25
    uncalibrated = LearnedQuantization("w4a8", 4, None, 8, None, None)
    assert learned_input_qparams(uncalibrated) is None
    assert learned_input_qparams(LearnedQuantization("w4a4", 4, None, 4, 0.5, False)) is None
    assert torch.equal(learned_weight_scale(signed, 4), torch.tensor([0.1, 0.2]))
    assert learned_weight_scale(signed, 8) is None and learned_weight_scale(unsigned, 4) is None
    assert learned_weight_scale(None, 4) is None
