"""What every deployment runtime shares: the deployed-model interface, the plan as a layer -> option
mapping checked against the model, and the uniform assignment."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import QuantPlan
from ohq_lightning.quant.swap import float_copy

__all__ = [
    "BaseDeployedModel",
    "SupportsRunner",
    "check_known_layers",
    "plan_assignment",
    "to_numpy",
    "uniform_assignment",
]


@runtime_checkable
class SupportsRunner(Protocol):
    """A deployed model that :func:`~ohq_lightning.deploy.measure_latency` can time: it hands out a
    zero-argument runner."""

    def runner(self, example_inputs: torch.Tensor) -> Callable[[], Any]:
        """A callable that runs one inference on ``example_inputs`` (prepared once, outside the timing)."""
        ...


class BaseDeployedModel(abc.ABC):
    """A model on a runtime's real kernels, following a plan: called on a batch, or timed through its runner.

    Subclasses are dataclasses holding at least ``assignment`` (layer name -> option, as deployed),
    ``threads`` and ``runtime`` (its name in :data:`~ohq_lightning.deploy.RUNTIMES`); they say how to
    run one inference (:meth:`runner`) and which of its outputs is the model's output.
    """

    assignment: dict[str, str]
    threads: int
    runtime: str

    def __call__(self, inputs: torch.Tensor | np.ndarray) -> np.ndarray:
        """Run the deployed model on one input batch (of the example's batch size); returns the output array."""
        return self._output_array(self.runner(inputs)())

    @abc.abstractmethod
    def runner(self, example_inputs: torch.Tensor | np.ndarray) -> Callable[[], Any]:
        """A zero-argument callable running one inference on ``example_inputs`` (its input is prepared once)."""

    @abc.abstractmethod
    def _output_array(self, outputs: Any) -> np.ndarray:
        """The model's output, as an array, from what one call of a runner returned."""


def to_numpy(inputs: torch.Tensor | np.ndarray | Any) -> np.ndarray:
    """``inputs`` as a numpy array on the CPU (a tensor is detached first)."""
    return inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)


def plan_assignment(plan: QuantPlan | Mapping[str, str]) -> dict[str, str]:
    """A plan as a fresh ``layer name -> option`` dict."""
    return dict(plan.assignment if isinstance(plan, QuantPlan) else plan)


def check_known_layers(assignment: Mapping[str, str], layer_names: Iterable[str]) -> None:
    """Refuse a plan naming layers the model does not have (``ValueError`` listing them)."""
    unknown = sorted(set(assignment) - set(layer_names))
    if unknown:
        raise ValueError(f"the plan names layers the model does not have: {unknown}")


def uniform_assignment(model: nn.Module, option: str, example_inputs: torch.Tensor) -> dict[str, str]:
    """Every quantizable layer of ``model`` (the float layers of a fake-quant model) at ``option``."""
    return dict.fromkeys(trace_layers(float_copy(model), example_inputs).names(), option)
