"""Deploy a plan to ONNX Runtime's real kernels and measure it end to end."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ohq_lightning._util.timing import Timing, TimingSettings, time_interleaved
from ohq_lightning.deploy.onnx_qdq import (
    FixedQuantization,
    QDQBuilder,
    activation_ranges,
    export_onnx,
    input_qparams,
)
from ohq_lightning.hardware.ort_ops import ort_session
from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import Option, QuantPlan
from ohq_lightning.quant.export import learned_quantization
from ohq_lightning.quant.swap import float_copy, quantized_layers

__all__ = ["DeployedModel", "SupportsRunner", "convert", "learned_grids", "measure_latency", "uniform"]


@runtime_checkable
class SupportsRunner(Protocol):
    """A deployed model that :func:`measure_latency` can time: it hands out a zero-argument runner."""

    def runner(self, example_inputs: torch.Tensor) -> Callable[[], Any]:
        """A callable that runs one inference on ``example_inputs`` (prepared once, outside the timing)."""
        ...


@dataclass
class DeployedModel:
    """A model on ONNX Runtime's kernels: its ONNX graph, a session, and the plan it follows."""

    assignment: dict[str, str]
    onnx_model: Any
    session: Any
    threads: int
    runtime: str = "onnxruntime"

    def __call__(self, inputs: torch.Tensor | np.ndarray) -> np.ndarray:
        """Run the deployed model on one input batch (of the exported batch size); returns the output array."""
        array = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
        name = self.session.get_inputs()[0].name
        return self.session.run(None, {name: array.astype(np.float32)})[0]

    def runner(self, example_inputs: torch.Tensor | np.ndarray) -> Callable[[], Any]:
        """A zero-argument callable running one inference on ``example_inputs`` (the feed is built once)."""
        array = (
            example_inputs.detach().cpu().numpy()
            if isinstance(example_inputs, torch.Tensor)
            else np.asarray(example_inputs)
        )
        feed = {self.session.get_inputs()[0].name: np.ascontiguousarray(array, dtype=np.float32)}
        return functools.partial(self.session.run, None, feed)

    def save(self, path: str | Path) -> Path:
        """Write the ONNX graph (QDQ where the plan quantizes) to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.onnx_model.SerializeToString())
        return path


def learned_grids(model: nn.Module, plan: QuantPlan | Mapping[str, str]) -> dict[str, FixedQuantization]:
    """The grids ``model``'s fake-quant layers learned, as the QDQ builder takes them, for the integer
    layers of ``plan``.

    A layer's weight grid is taken when the plan gives it the weight bits its fake-quant layer has,
    and its input grid when the activation bits match and its input quantizer was calibrated (or
    initialised by a forward pass). Anything else (another option than the one fine-tuned, a
    quantizer never calibrated, a layer with no fake-quant twin) is left out, and the builder derives
    it as for a float model. A model with no plan applied gives an empty mapping.
    """
    assignment = dict(plan.assignment if isinstance(plan, QuantPlan) else plan)
    learned = learned_quantization(model)
    layers = quantized_layers(model)
    grids: dict[str, FixedQuantization] = {}
    for name, option_name in assignment.items():
        option = Option.parse(option_name)
        found = learned.get(name)
        if option.is_float or found is None:
            continue
        weight = bits = scale = x_qparams = None
        if found.weight_scale is not None and found.weight_bits == option.weight_bits:
            weight = layers[name].weight.detach().float().cpu().numpy()  # the float weight it fake-quantizes
            bits, scale = found.weight_bits, found.weight_scale.numpy()
        if found.input_scale is not None and found.input_signed is not None and found.act_bits == option.act_bits == 8:
            x_qparams = input_qparams(8, found.input_scale, found.input_signed)
        if weight is not None or x_qparams is not None:
            grids[name] = FixedQuantization(weight, bits, scale, x_qparams)
    return grids


def convert(
    model: nn.Module,
    plan: QuantPlan | Mapping[str, str],
    example_inputs: torch.Tensor,
    *,
    calibration_inputs: Sequence[torch.Tensor] | None = None,
    threads: int = 1,
) -> DeployedModel:
    """Deploy ``model`` following ``plan`` to ONNX Runtime.

    Layers at integer options run on ORT's int8 kernels (u8 activations, s8 per-channel weights,
    sub-8-bit weights on their grid inside int8); float layers stay float, and quantize/dequantize
    sit where the precision changes. The model is not changed.

    **A model holding fake-quant layers** (after :func:`~ohq_lightning.quant.apply_plan`,
    :func:`~ohq_lightning.quant.calibrate` and perhaps QAT) is deployed with the quantization it
    learned (:func:`learned_grids`): each layer's integer weights are ``clip(round(w / s))`` with its
    learned per-channel step sizes ``s`` (a BatchNorm the exporter folds in scales ``s``, not the
    integers), and its input is quantized with its learned step size on its learned grid (unsigned:
    uint8 with zero point 0; signed 8-bit: uint8 with zero point 128, the same grid). Only layers
    whose input quantizer was never calibrated, or that the plan puts at another option than their
    fake-quant twin, get scales derived from the float weights and ``calibration_inputs``.

    The deployed model is therefore the fake-quant model (eval mode), but not bit-exact, because:

    * **output requantization**: ORT's int8 convolutions write uint8, so every integer conv's output
      (after a ``Relu``/``Clip`` that follows it) is quantized to 8 bits, which the fake-quant model
      does not do. An output that feeds only integer layers with one common input grid is quantized
      on that grid, which they quantize to anyway (no extra error); any other (before a Hardswish,
      an add, a pooling, a float layer) gets the uint8 grid of its least-error clipped range over
      ``calibration_inputs`` (:func:`~ohq_lightning.deploy.onnx_qdq.activation_ranges`): up to half
      a step of error per element, more for the few values beyond the clip. A ``Gemm`` whose output feeds no integer
      layer writes float (no requantization);
    * **arithmetic**: ORT accumulates exactly in int32 with the bias in int32 at step
      ``input_scale * weight_scale`` and rescales in float; PyTorch adds up the fake-quantized
      values (and a float bias) in float32 in another order. A value within that difference of a
      later quantizer's rounding boundary rounds one step apart, and the step travels downstream.
      (On x86 CPUs without VNNI, ORT's u8s8 kernels can also saturate 16-bit partial sums.)

    Tolerance, measured by ``tests/test_deploy_learned.py`` on mixed w8a8/w4a8/fp32 plans after
    calibration, after scaling every learned step by 1.25 or 0.8 and after three SGD steps: the
    largest |deployed - fake-quant| was 0.2-1.1% of the largest |fake-quant output| on the tiny test
    net (held to < 2%), and 17-33% on a random-init MobileNetV3-small-0.5 at 32x32 (held to < 50%):
    that fake-quant network is itself that sensitive (a 10^-5 relative change of its input moves its
    output by 14-21%: a rounding flipped early grows through a network of high gain), so no runtime
    that is not bit-exact gets much closer. Deploying without the learned steps deviated 50-200x
    (tiny) and 25x (MobileNetV3) more once the steps had changed.

    Args:
        model: the model (plain, or with a plan applied).
        plan: a :class:`~ohq_lightning.plan.QuantPlan` or a mapping layer -> option.
        example_inputs: one input batch; it fixes the deployed graph's input shape.
        calibration_inputs: batches whose activation ranges set the int8 scales that are not learned
            (default: the example).
        threads: intra-op threads of the session.
    """
    assignment = dict(plan.assignment if isinstance(plan, QuantPlan) else plan)
    float_model = float_copy(model)
    graph = export_onnx(float_model, example_inputs)
    names = trace_layers(float_model, example_inputs).names()
    unknown = sorted(set(assignment) - set(names))
    if unknown:
        raise ValueError(f"the plan names layers the model does not have: {unknown}")
    ranges = activation_ranges(graph, names, list(calibration_inputs or [example_inputs]), threads=threads)
    deployed = QDQBuilder(graph, ranges, learned_grids(model, assignment)).build(assignment)
    return DeployedModel(assignment, deployed, ort_session(deployed.SerializeToString(), threads), threads)


def uniform(model: nn.Module, option: str, example_inputs: torch.Tensor, **kwargs: Any) -> DeployedModel:
    """Deploy ``model`` with every quantizable layer at ``option`` (``"w8a8"`` or ``"fp32"``), like :func:`convert`.

    On a fake-quant model, learned grids are used where they fit ``option`` (see :func:`learned_grids`).
    """
    from ohq_lightning.deploy.runtimes import uniform_assignment

    return convert(model, uniform_assignment(model, option, example_inputs), example_inputs, **kwargs)


def measure_latency(
    deployed: Sequence[SupportsRunner],
    example_inputs: torch.Tensor,
    *,
    settings: TimingSettings | None = None,
    rounds: int = 3,
) -> list[Timing]:
    """End-to-end latency of each deployed model, timed call by call in turn over ``rounds`` (medians).

    Any deployed model with a ``runner(example_inputs)`` method (:class:`SupportsRunner`: ONNX Runtime's
    :class:`DeployedModel`, or another runtime's) can be timed, and models of different runtimes
    side by side. Compare the results as ratios: they were measured in the same run, under the same drift.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    for d in deployed:
        if not isinstance(d, SupportsRunner):
            raise TypeError(f"measure_latency times deployed models with a runner() method, got {type(d).__name__}")
    runs = [d.runner(example_inputs) for d in deployed]
    per_round = [
        time_interleaved(runs, settings or TimingSettings(max_seconds=2.0, min_repeats=15)) for _ in range(rounds)
    ]
    results = []
    for index in range(len(deployed)):
        medians = sorted(timings[index].median_ms for timings in per_round)
        middle = medians[len(medians) // 2]
        spread = max(timings[index].spread for timings in per_round)
        results.append(Timing(middle, spread, sum(timings[index].repeats for timings in per_round)))
    return results
