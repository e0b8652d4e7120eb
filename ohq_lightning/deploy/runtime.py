"""One entry point for every deployment runtime: a :class:`Runtime` protocol, the :data:`RUNTIMES`
registry, and ``deploy_plan`` / ``deploy_uniform`` / ``measure_latency`` on top of them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ohq_lightning._util.timing import Timing, TimingSettings, time_interleaved
from ohq_lightning.deploy.base import BaseDeployedModel, SupportsRunner, uniform_assignment
from ohq_lightning.deploy.onnxruntime import convert, uniform
from ohq_lightning.deploy.torch_fx import convert_torch, uniform_torch
from ohq_lightning.plan import QuantPlan

__all__ = [
    "RUNTIMES",
    "FunctionRuntime",
    "Runtime",
    "deploy_plan",
    "deploy_uniform",
    "get_runtime",
    "measure_latency",
    "register_runtime",
    "uniform_assignment",
]


@runtime_checkable
class Runtime(Protocol):
    """What a deployment runtime provides: a model on its real kernels, following a plan or one option.

    Both methods take the model (plain or with a plan applied), one example batch, and the runtime's
    own keyword arguments (``calibration_inputs``, ``threads``, ...), and return a deployed model
    that can be called on an input and timed with :func:`measure_latency`.
    """

    @property
    def name(self) -> str:
        """The runtime's key in :data:`RUNTIMES`."""
        ...

    def convert(
        self, model: nn.Module, plan: QuantPlan | Mapping[str, str], example_inputs: torch.Tensor, **kwargs: Any
    ) -> BaseDeployedModel:
        """Deploy ``model`` following ``plan`` (layers it does not name stay float)."""
        ...

    def uniform(self, model: nn.Module, option: str, example_inputs: torch.Tensor, **kwargs: Any) -> BaseDeployedModel:
        """Deploy ``model`` with every quantizable layer at ``option`` (``"fp32"``, ``"w8a8"``...)."""
        ...


@dataclass(frozen=True)
class FunctionRuntime:
    """A :class:`Runtime` made of a runtime's two deploy functions."""

    name: str
    convert: Callable[..., BaseDeployedModel]
    uniform: Callable[..., BaseDeployedModel]


RUNTIMES: dict[str, Runtime] = {
    "onnxruntime": FunctionRuntime("onnxruntime", convert, uniform),
    "torch": FunctionRuntime("torch", convert_torch, uniform_torch),
}
"""Deployment runtimes by name: ONNX Runtime (QDQ graph on its int8 kernels) and torch (FX int8 kernels)."""


def register_runtime(runtime: Runtime) -> Runtime:
    """Add ``runtime`` to :data:`RUNTIMES` under its name (replacing one of that name); returns it."""
    if not isinstance(runtime, Runtime):
        raise TypeError(f"a runtime needs a name, convert() and uniform(); got {type(runtime).__name__}")
    RUNTIMES[runtime.name] = runtime
    return runtime


def get_runtime(name: str) -> Runtime:
    """The runtime registered as ``name`` (``ValueError`` listing the available ones otherwise)."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ValueError(f"unknown deployment runtime {name!r}; available: {list(RUNTIMES)}") from None


def deploy_plan(
    model: nn.Module,
    plan: QuantPlan | Mapping[str, str],
    example_inputs: torch.Tensor,
    *,
    runtime: str = "onnxruntime",
    **kwargs: Any,
) -> Any:
    """Deploy ``model`` following ``plan`` on ``runtime``'s real kernels.

    ``runtime`` names an entry of :data:`RUNTIMES` (``"onnxruntime"``: :func:`~ohq_lightning.deploy.convert`;
    ``"torch"``: :func:`~ohq_lightning.deploy.convert_torch`); ``kwargs`` (``calibration_inputs``,
    ``threads``...) go to it. The deployed model can be called on an input and timed with
    :func:`measure_latency`.
    """
    return get_runtime(runtime).convert(model, plan, example_inputs, **kwargs)


def deploy_uniform(
    model: nn.Module, option: str, example_inputs: torch.Tensor, *, runtime: str = "onnxruntime", **kwargs: Any
) -> Any:
    """Deploy ``model`` with every quantizable layer at ``option`` (``"fp32"``, ``"w8a8"``) on ``runtime``."""
    return get_runtime(runtime).uniform(model, option, example_inputs, **kwargs)


def measure_latency(
    deployed: Sequence[SupportsRunner],
    example_inputs: torch.Tensor,
    *,
    settings: TimingSettings | None = None,
    rounds: int = 3,
) -> list[Timing]:
    """End-to-end latency of each deployed model, timed call by call in turn over ``rounds`` (medians).

    Any deployed model with a ``runner(example_inputs)`` method (:class:`SupportsRunner`: every
    runtime's deployed model) can be timed, and models of different runtimes side by side. Compare
    the results as ratios: they were measured in the same run, under the same drift.
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
