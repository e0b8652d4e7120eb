"""One entry point for every deployment runtime: ``deploy_plan(model, plan, example, runtime=...)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ohq_lightning.plan import QuantPlan

__all__ = ["RUNTIMES", "deploy_plan", "deploy_uniform", "uniform_assignment"]

RUNTIMES: tuple[str, ...] = ("onnxruntime", "torch")
"""Deployment runtimes: ONNX Runtime (QDQ graph on its int8 kernels) and torch (FX int8 kernels)."""


def deploy_plan(
    model: nn.Module,
    plan: QuantPlan | Mapping[str, str],
    example_inputs: torch.Tensor,
    *,
    runtime: str = "onnxruntime",
    **kwargs: Any,
) -> Any:
    """Deploy ``model`` following ``plan`` on ``runtime``'s real kernels.

    ``"onnxruntime"`` calls :func:`~ohq_lightning.deploy.ort.convert`, ``"torch"``
    :func:`~ohq_lightning.deploy.torch_int8.convert_torch`; ``kwargs`` (``calibration_inputs``,
    ``threads``...) go to it. Both return a deployed model that can be called on an input and
    timed with :func:`~ohq_lightning.deploy.measure_latency`.
    """
    if runtime == "onnxruntime":
        from ohq_lightning.deploy.ort import convert

        return convert(model, plan, example_inputs, **kwargs)
    if runtime == "torch":
        from ohq_lightning.deploy.torch_int8 import convert_torch

        return convert_torch(model, plan, example_inputs, **kwargs)
    raise ValueError(f"unknown deployment runtime {runtime!r}; available: {list(RUNTIMES)}")


def deploy_uniform(
    model: nn.Module, option: str, example_inputs: torch.Tensor, *, runtime: str = "onnxruntime", **kwargs: Any
) -> Any:
    """Deploy ``model`` with every quantizable layer at ``option`` (``"fp32"``, ``"w8a8"``) on ``runtime``."""
    return deploy_plan(
        model, uniform_assignment(model, option, example_inputs), example_inputs, runtime=runtime, **kwargs
    )


def uniform_assignment(model: nn.Module, option: str, example_inputs: torch.Tensor) -> dict[str, str]:
    """Every quantizable layer of ``model`` (the float layers of a fake-quant model) at ``option``."""
    from ohq_lightning.layers import trace_layers
    from ohq_lightning.quant.swap import float_copy

    return dict.fromkeys(trace_layers(float_copy(model), example_inputs).names(), option)
