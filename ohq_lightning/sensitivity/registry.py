"""The sensitivity methods a search computes by name: one table, one entry point.

Each :class:`SensitivityMethod` says how to score layers (``compute``) and whether it scores them on
inputs (``needs_inputs``: MQE's readings, which run the model on synthetic inputs). The pipeline
calls any of them through :func:`sensitivity_by_name`; :data:`METHODS` and :data:`MQE_METHODS` are
read off the table. The Hessian baseline is not in it: it needs real data and a loss, so a search
takes its table, or a :data:`SensitivityProvider`, instead of a name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import torch
from torch import nn

from ohq_lightning.plan import LayerInfo, SensitivityTable
from ohq_lightning.sensitivity.baselines import random_sensitivity, weight_error_sensitivity
from ohq_lightning.sensitivity.mqe import PERTURBATIONS, mqe_sensitivity

__all__ = [
    "METHODS",
    "MQE_METHODS",
    "SENSITIVITY_REGISTRY",
    "SensitivityFn",
    "SensitivityMethod",
    "SensitivityProvider",
    "sensitivity_by_name",
    "sensitivity_method",
]

_Layers = Sequence[LayerInfo] | Sequence[str]

#: A sensitivity provider ``search`` can call: ``provider(model, layers, options) -> SensitivityTable``, e.g.
#: ``lambda model, layers, options: hessian_sensitivity(model, loader, layers, options)``
#: (:func:`~ohq_lightning.sensitivity.hessian.hessian_sensitivity`, with the data it needs).
SensitivityProvider = Callable[[nn.Module, Sequence[LayerInfo], Sequence[str]], SensitivityTable]


class SensitivityFn(Protocol):
    """How a registered method scores ``layers`` x ``options`` of ``model`` (``inputs``: None unless it needs them)."""

    def __call__(
        self,
        model: nn.Module,
        layers: _Layers,
        options: Sequence[str],
        *,
        inputs: torch.Tensor | None,
        seed: int,
        progress: bool,
    ) -> SensitivityTable: ...


@dataclass(frozen=True)
class SensitivityMethod:
    """One entry of :data:`SENSITIVITY_REGISTRY`.

    Args:
        name: what ``search(..., sensitivity=name)`` calls it.
        compute: the scorer.
        needs_inputs: whether it runs the model on inputs (the search makes synthetic ones for it).
        summary: one line on what it measures.
    """

    name: str
    compute: SensitivityFn
    needs_inputs: bool
    summary: str


def _mqe(
    model: nn.Module,
    layers: _Layers,
    options: Sequence[str],
    *,
    inputs: torch.Tensor | None,
    seed: int,
    progress: bool,
    method: str,
) -> SensitivityTable:
    assert inputs is not None  # sensitivity_by_name checks it first
    return mqe_sensitivity(model, inputs, layers, options, method=method, seed=seed, progress=progress)


def _weight_error(
    model: nn.Module, layers: _Layers, options: Sequence[str], *, inputs: torch.Tensor | None, seed: int, progress: bool
) -> SensitivityTable:
    return weight_error_sensitivity(model, layers, options, progress=progress)  # no inputs, no randomness


def _random(
    model: nn.Module, layers: _Layers, options: Sequence[str], *, inputs: torch.Tensor | None, seed: int, progress: bool
) -> SensitivityTable:
    return random_sensitivity(layers, options, seed=seed)


_SUMMARIES = {
    "quantize": "MQE: KL divergence of the outputs with only this layer fake-quantized (the OHQ paper)",
    "random_mask": "MQE: KL divergence of the outputs with a bit-dependent fraction of this layer's weights zeroed",
}

_METHODS: dict[str, SensitivityMethod] = {
    **{
        name: SensitivityMethod(name, functools.partial(_mqe, method=name), True, _SUMMARIES[name])
        for name in PERTURBATIONS
    },
    "weight_error": SensitivityMethod(
        "weight_error", _weight_error, False, "sum of squared weight quantization error, data-free"
    ),
    "random": SensitivityMethod("random", _random, False, "seeded random layer order, the null baseline"),
}

#: Name -> :class:`SensitivityMethod`, read-only, in the order of :data:`METHODS`.
SENSITIVITY_REGISTRY: Mapping[str, SensitivityMethod] = MappingProxyType(_METHODS)

#: Every sensitivity that :func:`~ohq_lightning.pipeline.search` (and so ``OHQCallback``) computes by name:
#: MQE's readings, then the data-free baselines of :mod:`ohq_lightning.sensitivity.baselines`.
METHODS: tuple[str, ...] = tuple(SENSITIVITY_REGISTRY)

#: The methods that score layers on (synthetic) inputs: MQE's readings of "perturb one layer".
MQE_METHODS: tuple[str, ...] = tuple(name for name, entry in SENSITIVITY_REGISTRY.items() if entry.needs_inputs)


def sensitivity_method(name: str) -> SensitivityMethod:
    """The registered method called ``name``; an unknown name is a ``ValueError`` listing :data:`METHODS`."""
    entry = SENSITIVITY_REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown sensitivity method {name!r}; use one of {METHODS}")
    return entry


def sensitivity_by_name(
    name: str,
    model: nn.Module,
    layers: _Layers,
    options: Sequence[str],
    *,
    inputs: torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SensitivityTable:
    """Score ``layers`` x ``options`` of ``model`` with the registered method ``name``.

    ``inputs`` (one batch tensor, e.g. from :func:`~ohq_lightning.sensitivity.synthetic.synthetic_inputs`)
    is required by a method that ``needs_inputs`` and ignored by the others.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> sensitivity_by_name("weight_error", model, ["0", "2"], ["w2a8", "w8a8"]).method
        'weight_error'
    """
    entry = sensitivity_method(name)
    if entry.needs_inputs and inputs is None:
        raise ValueError(
            f"sensitivity method {name!r} scores layers on inputs: pass inputs= (e.g. from synthetic_inputs)"
        )
    return entry.compute(model, layers, options, inputs=inputs, seed=seed, progress=progress)
