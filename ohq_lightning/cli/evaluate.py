"""FP32, uniform INT8 and the OHQ plan, deployed on this device's real kernels: accuracy, size and latency."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ohq_lightning._util.progress import progress_bar
from ohq_lightning._util.timing import TimingSettings
from ohq_lightning.deploy import RUNTIMES, deploy_plan, measure_latency
from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import LayerInfo, Option, QuantPlan
from ohq_lightning.quant import apply_plan, calibrate, quantized_layers, strip_plan

__all__ = ["deployed_accuracy", "evaluate_plan", "model_size_bytes", "torch_accuracy"]


def model_size_bytes(model: nn.Module, layers: Sequence[LayerInfo], assignment: Mapping[str, str]) -> int:
    """Bytes of the model's parameters: planned layers' weights packed at their bits, everything else FP32.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 2, bias=False))
        >>> info = trace_layers(net, torch.zeros(1, 4)).layers
        >>> model_size_bytes(net, info, {"0": "fp32"}), model_size_bytes(net, info, {"0": "w4a8"})
        (32, 4)
    """
    quantizable = {layer.name: layer for layer in layers}
    float_copy = strip_plan(copy.deepcopy(model)) if quantized_layers(model) else model
    modules = dict(float_copy.named_modules())
    planned_numel = sum(modules[name].weight.numel() for name in quantizable if name in modules)
    other = sum(p.numel() for p in float_copy.parameters()) - planned_numel
    planned = sum(quantizable[name].weight_bytes(Option.parse(assignment.get(name, "fp32"))) for name in quantizable)
    return round(planned + 4 * other)


@torch.no_grad()
def torch_accuracy(model: nn.Module, loader: DataLoader, num_classes: int, *, progress: bool = True) -> float:
    """Top-1 accuracy of ``model`` (eval mode, on the CPU) over ``loader`` (torchmetrics)."""
    from torchmetrics.classification import MulticlassAccuracy

    metric = MulticlassAccuracy(num_classes=num_classes, average="micro")
    model = model.eval().cpu()
    for x, y in progress_bar(loader, desc="evaluating (PyTorch)", enabled=progress):
        metric.update(model(x), y)
    return float(metric.compute())


def deployed_accuracy(
    deployed: Any, loader: DataLoader, num_classes: int, *, desc: str, progress: bool = True
) -> float:
    """Top-1 accuracy of a deployed model (called one image at a time: its graph has batch size 1)."""
    from torchmetrics.classification import MulticlassAccuracy

    metric = MulticlassAccuracy(num_classes=num_classes, average="micro")
    total = len(loader.dataset)  # type: ignore[arg-type]
    with progress_bar(None, desc=desc, enabled=progress, total=total) as bar:
        for x, y in loader:
            logits = np.concatenate([deployed(image.unsqueeze(0)) for image in x])
            metric.update(torch.from_numpy(logits), y)
            bar.update(len(y))
    return float(metric.compute())


def evaluate_plan(
    float_model: nn.Module,
    quantized_model: nn.Module,
    plan: QuantPlan,
    *,
    example: torch.Tensor,
    test_loader: DataLoader,
    calibration: Sequence[torch.Tensor],
    num_classes: int,
    runtime: str = "onnxruntime",
    threads: int = 1,
    timing: TimingSettings | None = None,
    rounds: int = 3,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Deploy FP32, uniform INT8 (post-training, calibrated) and the plan; measure each the same way.

    The plan is deployed from ``quantized_model`` (the fine-tuned fake-quant model, so its learned
    step sizes where the runtime takes them); the baselines from ``float_model``. Latency is timed
    end to end, the three models call by call in turn over ``rounds`` rounds, in the same runtime
    and with the same threads. Predicted latencies are the search's (``plan.meta["uniform"]`` for the
    baselines) when its target predicts latency.

    Returns:
        ``{"fp32": {...}, "int8": {...}, "ohq": {...}}``, each with ``accuracy`` (deployed),
        ``size_bytes``, ``latency_ms`` (measured median), ``latency_spread`` and ``predicted_latency_ms``;
        ``ohq`` also has ``fake_quant_accuracy`` (the fine-tuned model in PyTorch) and
        ``calibration_only_accuracy`` (the same plan applied to ``float_model`` and calibrated on
        ``calibration``, without fine-tuning: what the fine-tuning bought).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown deployment runtime {runtime!r}; available: {list(RUNTIMES)}")

    layers = trace_layers(float_model, example).layers
    names = [layer.name for layer in layers]
    assignments = {
        "fp32": dict.fromkeys(names, "fp32"),
        "int8": dict.fromkeys(names, "w8a8"),
        "ohq": {name: plan.assignment.get(name, "fp32") for name in names},
    }
    common = {"calibration_inputs": list(calibration), "threads": threads}
    deployed = {
        "fp32": deploy_plan(float_model, assignments["fp32"], example, runtime=runtime, **common),
        "int8": deploy_plan(float_model, assignments["int8"], example, runtime=runtime, **common),
        "ohq": deploy_plan(quantized_model, assignments["ohq"], example, runtime=runtime, **common),
    }
    timings = measure_latency(list(deployed.values()), example, settings=timing, rounds=rounds)
    uniform = plan.meta.get("uniform") or {}
    predicted = {
        "fp32": (uniform.get("fp32") or {}).get("latency_ms"),
        "int8": (uniform.get("w8a8") or {}).get("latency_ms"),
        "ohq": plan.predicted.get("latency_ms"),
    }
    results: dict[str, dict[str, Any]] = {}
    for (key, model), timed in zip(deployed.items(), timings, strict=True):
        source = quantized_model if key == "ohq" else float_model
        results[key] = {
            "accuracy": deployed_accuracy(model, test_loader, num_classes, desc=f"evaluating {key}", progress=progress),
            "size_bytes": model_size_bytes(source, layers, assignments[key]),
            "latency_ms": timed.median_ms,
            "latency_spread": timed.spread,
            "predicted_latency_ms": predicted[key],
            "runtime": runtime,
            "threads": threads,
        }
    results["ohq"]["fake_quant_accuracy"] = torch_accuracy(quantized_model, test_loader, num_classes, progress=progress)
    calibrated = apply_plan(copy.deepcopy(float_model), plan)
    calibrate(calibrated, calibration, progress=progress)
    results["ohq"]["calibration_only_accuracy"] = torch_accuracy(
        calibrated, test_loader, num_classes, progress=progress
    )
    results["fp32"]["torch_accuracy"] = torch_accuracy(float_model, test_loader, num_classes, progress=progress)
    return results
