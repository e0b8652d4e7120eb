import numpy as np
import pytest
import torch
from conftest import make_tiny_net, same_state, state_snapshot

from ohq_lightning._util.timing import TimingSettings
from ohq_lightning.deploy import convert, measure_latency, uniform
from ohq_lightning.quant import apply_plan, quantized_layers

QUICK = TimingSettings(warmup=1, min_repeats=3, max_seconds=0.05)


@pytest.fixture
def model_and_input():
    example = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return make_tiny_net(), example


def test_uniform_fp32_reproduces_the_float_model(model_and_input):
    model, example = model_and_input
    deployed = uniform(model, "fp32", example)
    with torch.no_grad():
        assert np.allclose(deployed(example), model(example).numpy(), atol=1e-5)


def test_a_mixed_plan_runs_close_to_the_float_model(model_and_input, tmp_path):
    model, example = model_and_input
    calibration = [torch.randn(1, 3, 16, 16) for _ in range(8)] + [example]
    plan = {"stem.0": "w8a8", "dw.0": "fp32", "grouped.0": "w8a8", "fc": "w8a8"}
    deployed = convert(model, plan, example, calibration_inputs=calibration)
    with torch.no_grad():
        reference = model(example).numpy()
    error = np.abs(deployed(example) - reference).max()
    assert 0 < error < 0.1 * np.abs(reference).max()
    assert deployed.save(tmp_path / "plan.onnx").stat().st_size > 0


def test_a_model_with_a_plan_applied_is_deployed_and_left_alone(model_and_input):
    model, example = model_and_input
    apply_plan(model, {"stem.0": "w4a8"})
    before = state_snapshot(model)
    deployed = convert(model, {"stem.0": "w4a8"}, example)
    assert deployed(example).shape == (1, 10)
    assert same_state(model, before) and list(quantized_layers(model)) == ["stem.0"]


def test_measure_latency_times_each_deployed_model(model_and_input):
    model, example = model_and_input
    timings = measure_latency(
        [uniform(model, "fp32", example), uniform(model, "w8a8", example)], example, settings=QUICK, rounds=2
    )
    assert len(timings) == 2 and all(t.median_ms > 0 and t.repeats >= 6 for t in timings)
    with pytest.raises(ValueError, match="rounds"):
        measure_latency([], example, rounds=0)


def test_runner_runs_one_inference_on_the_prepared_input(model_and_input):
    model, example = model_and_input
    deployed = uniform(model, "w8a8", example)
    run = deployed.runner(example)
    (output,) = run()
    assert np.array_equal(output, deployed(example))


class _SleeplessRunner:
    """Another runtime's deployed model: anything with ``runner(example_inputs)``."""

    def __init__(self) -> None:
        self.calls = 0

    def runner(self, example_inputs: torch.Tensor):
        def run() -> torch.Tensor:
            self.calls += 1
            return example_inputs * 2

        return run


def test_measure_latency_times_any_deployed_model_with_a_runner(model_and_input):
    model, example = model_and_input
    other = _SleeplessRunner()
    timings = measure_latency([uniform(model, "fp32", example), other], example, settings=QUICK, rounds=2)
    assert len(timings) == 2 and other.calls >= 6 and timings[1].repeats >= 6
    with pytest.raises(TypeError, match="runner"):
        measure_latency([object()], example, settings=QUICK, rounds=1)


def test_a_plan_naming_unknown_layers_is_rejected(model_and_input):
    model, example = model_and_input
    with pytest.raises(ValueError, match="does not have"):
        convert(model, {"nope": "w8a8"}, example)
