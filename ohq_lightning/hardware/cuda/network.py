"""The rest of the network (activations, adds, pooling, launches): the whole fp32 forward minus its layers.

``base_latency_ms`` is measured when the model and its example input are given, as the whole
network's eager fp32 forward on the GPU minus the sum of its layers' fp32 entries. It is measured at
fp32; how it changes when the layers around it change precision is not modelled. Without the model
it is left out (``None``) and ``meta["base"]`` says why.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ohq_lightning._util.timing import TimingSettings
from ohq_lightning.hardware.cuda.kernels import short_error
from ohq_lightning.hardware.cuda.profiling import LayerResult
from ohq_lightning.hardware.cuda.timer import Kernel, Timer
from ohq_lightning.layers import first_tensor, run_model
from ohq_lightning.plan import LayerInfo

__all__ = ["base_note", "example_batch", "measure_base", "network_kernel"]


def example_batch(example_inputs: Any) -> int | None:
    """The batch size of an example input (its first tensor's first dimension), or None."""
    if example_inputs is None:
        return None
    tensor = first_tensor(list(example_inputs.values()) if isinstance(example_inputs, dict) else example_inputs)
    if tensor is None or tensor.dim() == 0:
        return None
    return int(tensor.shape[0])


def base_note(measure: bool, model: Any, example_inputs: Any, batch: int) -> str | None:
    """Why the rest of the network will not be measured, or None when it will be."""
    if not measure:
        return "not measured (measure_base=False): the rest of the network is not modelled"
    if model is None or example_inputs is None:
        return "not measured (no model and example input given): the rest of the network is not modelled"
    example = example_batch(example_inputs)
    if example is not None and example != batch:
        return (
            f"not measured: the example input's batch ({example}) differs from batch_size ({batch}); "
            "the rest of the network is not modelled"
        )
    return None


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def network_kernel(model: Any, example_inputs: Any, device: torch.device) -> Kernel:
    """The whole model's eager fp32 forward on ``device`` (a copy: the caller's model is not moved)."""
    network = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval()
    inputs = _to_device(example_inputs, device)

    def run() -> Any:
        with torch.no_grad():
            return run_model(network, inputs)

    run()
    return Kernel("network", "model.forward (eager, fp32)", "", run)


def measure_base(
    layers: Sequence[LayerInfo],
    results: Mapping[str, LayerResult],
    model: Any,
    example_inputs: Any,
    device: torch.device,
    timer: Timer,
    timing: TimingSettings,
) -> tuple[float | None, dict[str, Any]]:
    """The rest of the network: the whole fp32 forward on the device minus its layers' fp32 entries."""
    missing = [layer.name for layer in layers if "fp32" not in results[layer.name].best]
    if missing:
        return None, {"note": f"not measured: layers {missing} have no fp32 timing"}
    try:
        network = network_kernel(model, example_inputs, device)
    except Exception as failure:  # a model that cannot be copied or moved to the device
        return None, {"note": f"not measured: the model does not run on {device}: {short_error(failure)}"}
    whole = timer([network], timing)[0].median_ms
    layer_sum = sum(results[layer.name].best["fp32"][0].median_ms * layer.calls for layer in layers)
    meta: dict[str, Any] = {"network_fp32_ms": whole, "layers_fp32_ms": layer_sum}
    if whole - layer_sum < 0:
        meta["note"] = (
            "not used: the layers timed alone take longer than the whole network, so the rest of the network "
            "cannot be told apart; it is not modelled"
        )
        return None, meta
    meta["note"] = (
        "measured: the whole network's eager fp32 forward minus its layers' fp32 entries; at other precisions "
        "the rest of the network is assumed to cost the same"
    )
    return whole - layer_sum, meta
