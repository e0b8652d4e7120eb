"""Deploy a plan to ONNX Runtime's real kernels and measure it end to end."""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ohq_lightning.deploy.onnx_qdq import QDQBuilder, activation_ranges, export_onnx
from ohq_lightning.hardware.ort_ops import ort_session
from ohq_lightning.hardware.timing import Timing, TimingSettings, time_interleaved
from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import QuantPlan
from ohq_lightning.quant.swap import quantized_layers, strip_plan

__all__ = ["DeployedModel", "convert", "measure_latency", "uniform"]


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

    def save(self, path: str | Path) -> Path:
        """Write the ONNX graph (QDQ where the plan quantizes) to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.onnx_model.SerializeToString())
        return path


def _float_copy(model: nn.Module) -> nn.Module:
    """The model with every fake-quant layer replaced by the float layer it wraps (a copy if needed)."""
    if not quantized_layers(model):
        return model
    return strip_plan(copy.deepcopy(model))


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
    sit where the precision changes. A model holding fake-quant layers is deployed from its float
    weights (a copy is stripped; the model is not changed).

    Args:
        model: the model (plain, or with a plan applied).
        plan: a :class:`~ohq_lightning.plan.QuantPlan` or a mapping layer -> option.
        example_inputs: one input batch; it fixes the deployed graph's input shape.
        calibration_inputs: batches whose activation ranges set the int8 scales (default: the example).
        threads: intra-op threads of the session.
    """
    assignment = dict(plan.assignment if isinstance(plan, QuantPlan) else plan)
    float_model = _float_copy(model)
    graph = export_onnx(float_model, example_inputs)
    names = trace_layers(float_model, example_inputs).names()
    unknown = sorted(set(assignment) - set(names))
    if unknown:
        raise ValueError(f"the plan names layers the model does not have: {unknown}")
    ranges = activation_ranges(graph, names, list(calibration_inputs or [example_inputs]), threads=threads)
    deployed = QDQBuilder(graph, ranges).build(assignment)
    return DeployedModel(assignment, deployed, ort_session(deployed.SerializeToString(), threads), threads)


def uniform(model: nn.Module, option: str, example_inputs: torch.Tensor, **kwargs: Any) -> DeployedModel:
    """Deploy ``model`` with every quantizable layer at ``option`` (``"w8a8"`` or ``"fp32"``), like :func:`convert`."""
    names = trace_layers(_float_copy(model), example_inputs).names()
    return convert(model, dict.fromkeys(names, option), example_inputs, **kwargs)


def measure_latency(
    deployed: Sequence[DeployedModel],
    example_inputs: torch.Tensor,
    *,
    settings: TimingSettings | None = None,
    rounds: int = 3,
) -> list[Timing]:
    """End-to-end latency of each deployed model, timed call by call in turn over ``rounds`` (medians).

    Compare the results as ratios: they were measured in the same run, under the same drift.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    feeds = [{d.session.get_inputs()[0].name: example_inputs.detach().cpu().numpy()} for d in deployed]
    runs = [functools.partial(d.session.run, None, feed) for d, feed in zip(deployed, feeds, strict=True)]
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
