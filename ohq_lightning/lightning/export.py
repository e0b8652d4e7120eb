"""The end of a fit with ``OHQCallback(export_onnx=...)``: the plan deployed to ONNX Runtime and measured."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ohq_lightning.deploy import convert, measure_latency, uniform
from ohq_lightning.plan import QuantPlan
from ohq_lightning.quant.swap import deployable_copy

__all__ = ["deploy_and_measure"]


def deploy_and_measure(
    module: torch.nn.Module, plan: QuantPlan, example: torch.Tensor, calibration_inputs: Iterable[Any], path: Path
) -> dict[str, float]:
    """Deploy ``plan`` to ONNX Runtime's kernels, write it to ``path``, and time it; returns the metrics.

    The deployed model's end-to-end latency is timed beside uniform FP32 and uniform INT8 builds of
    the same model, call by call in turn (``ohq/onnx_ms``, ``ohq/onnx_fp32_ms``, ``ohq/onnx_int8_ms``):
    the plan's speed measured, not assumed. A pruned model deploys its masked weights
    (:func:`~ohq_lightning.quant.swap.deployable_copy`). The activation ranges of the INT8 build
    come from ``calibration_inputs`` (their tensors; ``example`` if none is one).
    """
    model = deployable_copy(module).cpu()  # pruning made permanent: pruned weights hold their masked values
    example = example.detach().cpu()
    batches = [batch.detach().cpu() for batch in calibration_inputs if isinstance(batch, torch.Tensor)] or [example]
    deployed = convert(model, plan, example, calibration_inputs=batches)
    deployed.save(path)
    baselines = [uniform(model, "fp32", example), uniform(model, "w8a8", example, calibration_inputs=batches)]
    ohq_ms, fp32_ms, int8_ms = (t.median_ms for t in measure_latency([deployed, *baselines], example))
    return {"ohq/onnx_ms": ohq_ms, "ohq/onnx_fp32_ms": fp32_ms, "ohq/onnx_int8_ms": int8_ms}
