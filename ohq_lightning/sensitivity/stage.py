"""The search's sensitivity stage: from its settings to a table covering every layer at every option.

A search names a registered method (:mod:`ohq_lightning.sensitivity.registry`), gives a precomputed
table, or gives a provider; :func:`sensitivity_table` turns any of the three into a checked table,
and :func:`compute_sensitivity` first makes the synthetic inputs a method may need.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ohq_lightning.config import SearchConfig
from ohq_lightning.plan import LayerInfo, SensitivityTable
from ohq_lightning.sensitivity.registry import SensitivityProvider, sensitivity_by_name, sensitivity_method
from ohq_lightning.sensitivity.synthetic import synthetic_inputs

__all__ = ["check_coverage", "compute_sensitivity", "sensitivity_table"]


def check_coverage(table: SensitivityTable, layers: Sequence[LayerInfo], options: Sequence[str]) -> SensitivityTable:
    """``table`` when it scores every layer at every option; else a ``ValueError`` with a few missing pairs."""
    missing = [
        (layer.name, option) for layer in layers for option in options if option not in table.scores.get(layer.name, {})
    ]
    if missing:
        raise ValueError(
            f"the sensitivity table ({table.method!r}) has no score for {len(missing)} layer/option pairs the search "
            f"needs, e.g. {missing[:4]}: it must cover every quantizable layer at every candidate option"
        )
    return table


def sensitivity_table(
    source: str | SensitivityTable | SensitivityProvider,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    options: Sequence[str],
    *,
    inputs: torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SensitivityTable:
    """The table of a method name (:func:`~ohq_lightning.sensitivity.registry.sensitivity_by_name`), a given
    table, or a provider's, checked to cover every layer at every option."""
    if isinstance(source, str):
        table = sensitivity_by_name(source, model, layers, options, inputs=inputs, seed=seed, progress=progress)
    elif isinstance(source, SensitivityTable):
        table = source
    else:
        assert callable(source)
        table = source(model, layers, options)
        if not isinstance(table, SensitivityTable):
            raise ValueError(f"the sensitivity provider returned a {type(table).__name__}, not a SensitivityTable")
    return check_coverage(table, layers, options)


def compute_sensitivity(
    config: SearchConfig,
    model: nn.Module,
    example_inputs: Any,
    layers: Sequence[LayerInfo],
    options: Sequence[str],
    *,
    cache_dir: str | Path | bool | None = None,
    progress: bool = True,
    timings: dict[str, float] | None = None,
) -> SensitivityTable:
    """The sensitivity table a search with ``config`` solves over.

    A method that needs inputs (MQE) first gets ``config.num_samples`` synthetic inputs of kind
    ``config.synthetic`` shaped like ``example_inputs`` (cached under ``cache_dir``). ``timings``, when
    given, receives the seconds of ``"synthetic"`` (only when inputs were made) and ``"sensitivity"``.
    """
    timings = {} if timings is None else timings
    source = config.sensitivity
    inputs = None
    if isinstance(source, str) and sensitivity_method(source).needs_inputs:
        started = time.perf_counter()
        inputs = synthetic_inputs(
            model,
            example_inputs,
            kind=config.synthetic,
            num_samples=config.num_samples,
            seed=config.seed,
            steps=config.distill_steps,
            cache_dir=cache_dir,
            progress=progress,
        )
        timings["synthetic"] = time.perf_counter() - started
    started = time.perf_counter()
    table = sensitivity_table(source, model, layers, options, inputs=inputs, seed=config.seed, progress=progress)
    timings["sensitivity"] = time.perf_counter() - started
    return table
