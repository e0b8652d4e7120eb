"""Profiling one layer: time its kernels and transitions, reading what the cache has, and keep the fastest.

For every kernel the options run on, each implementation torch has (:func:`.kernels.implementations`)
is built on synthetic operands, checked, and timed with the layer's transitions in one call of the
timer, so that they are measured in turn. Where a kernel has two implementations the faster one
counts. Figures already in the cache are not measured again (``force`` measures anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ohq_lightning._util.timing import Timing, TimingSettings
from ohq_lightning.hardware.cache import TimingCache
from ohq_lightning.hardware.cuda._operands import Builder, Operands, synthetic_operands
from ohq_lightning.hardware.cuda.energy import energy_of
from ohq_lightning.hardware.cuda.kernels import implementations, layer_key, probe
from ohq_lightning.hardware.cuda.timer import Kernel, Timer
from ohq_lightning.hardware.cuda.transitions import transition_kernels
from ohq_lightning.hardware.energy import NvmlEnergyMeter
from ohq_lightning.plan import LayerInfo

__all__ = ["LayerResult", "ProfileContext", "profile_layer"]


@dataclass
class LayerResult:
    """What profiling one layer found."""

    best: dict[str, tuple[Timing, str]] = field(default_factory=dict)  # kernel -> (timing, impl)
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)  # kernel -> impl -> why not
    details: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # kernel -> detail of the best impl
    parts: dict[str, float] = field(default_factory=dict)  # quantize / dequantize / casts, ms
    energy: dict[str, float | None] = field(default_factory=dict)  # kernel -> mJ per call
    measured: int = 0
    cached: int = 0


@dataclass(frozen=True)
class ProfileContext:
    """Everything profiling a layer needs besides the layer: where, how, and with which caches."""

    device: torch.device
    batch: int
    seed: int
    force: bool
    timing: TimingSettings
    timer: Timer
    synchronize: Callable[[], object]
    cache: TimingCache
    integer: bool
    halves: Sequence[str]
    energy_meter: NvmlEnergyMeter | None = None
    energy_cache: TimingCache | None = None

    def cached(self, cache: TimingCache, key: str) -> Timing | None:
        """The cached figure under ``key``, unless ``force`` asks to measure again."""
        return None if self.force else cache.get(key)


class _Builds:
    """A layer's implementations, built and checked on first use on one shared set of operands."""

    def __init__(self, layer: LayerInfo, context: ProfileContext, result: LayerResult) -> None:
        self.layer, self.context, self.result = layer, context, result
        self.keys: dict[tuple[str, str], str] = {}
        self.pending: dict[tuple[str, str], Builder] = {}
        self.built: dict[tuple[str, str], Kernel] = {}
        self._ops: Operands | None = None

    def add(self, kernel: str) -> None:
        """Register every implementation of ``kernel`` (and why the missing ones are missing)."""
        builders, reasons = implementations(self.layer, kernel)
        self.result.reasons[kernel] = dict(reasons)
        for impl, builder in builders.items():
            self.keys[kernel, impl] = layer_key(self.layer, self.context.batch, kernel, impl)
            self.pending[kernel, impl] = builder

    def get(self, kernel: str, impl: str) -> Kernel | None:
        """The checked kernel, or None (with the reason recorded) when it fails or computes something else."""
        if (kernel, impl) not in self.built:
            context = self.context
            if self._ops is None:
                self._ops = synthetic_operands(self.layer, context.device, context.batch, context.seed)
            key = self.keys[kernel, impl]
            probed = probe(self._ops, kernel, impl, self.pending[kernel, impl], key, context.synchronize)
            if isinstance(probed, str):
                self.result.reasons[kernel][impl] = probed
                return None
            self.built[kernel, impl] = probed
        return self.built[kernel, impl]


def _timings(builds: _Builds, extras: Sequence[Kernel], context: ProfileContext) -> dict[str, Timing]:
    """Cache key -> timing of every kernel and transition: from the cache, else measured in one timer call."""
    result = builds.result
    timings: dict[str, Timing] = {}
    todo: list[Kernel] = []
    for (kernel, impl), key in builds.keys.items():
        cached = context.cached(context.cache, key)
        if cached is not None:
            timings[key] = cached
            result.cached += 1
        elif (made := builds.get(kernel, impl)) is not None:
            todo.append(made)
    for extra in extras:
        cached = context.cached(context.cache, extra.key)
        if cached is not None:
            timings[extra.key] = cached
        else:
            todo.append(extra)
    if todo:
        for made, timing in zip(todo, context.timer(todo, context.timing), strict=True):
            context.cache.put(made.key, timing)
            timings[made.key] = timing
        result.measured += sum(1 for made in todo if (made.name, made.impl) in builds.keys)
    return timings


def _keep_fastest(builds: _Builds, timings: Mapping[str, Timing]) -> None:
    """Per kernel, the fastest implementation that has a timing goes into ``result.best``."""
    best = builds.result.best
    for (kernel, impl), key in builds.keys.items():
        timing = timings.get(key)
        if timing is not None and (kernel not in best or timing.median_ms < best[kernel][0].median_ms):
            best[kernel] = (timing, impl)


def _describe_best(builds: _Builds, context: ProfileContext) -> None:
    """Details of each kernel's chosen implementation and, with a meter, its energy per call."""
    result = builds.result
    for kernel, (_, impl) in result.best.items():
        made = builds.built.get((kernel, impl))
        result.details[kernel] = {"impl": impl, **(made.detail if made is not None else {"from_cache": True})}
        if context.energy_meter is not None and context.energy_cache is not None:
            result.energy[kernel] = energy_of(
                builds.keys[kernel, impl],
                lambda k=kernel, i=impl: builds.get(k, i),
                context.force,
                context.energy_meter,
                context.energy_cache,
                context.synchronize,
            )


def profile_layer(layer: LayerInfo, kernels: Sequence[str], context: ProfileContext) -> LayerResult:
    """Time one layer's kernels (and its transitions), reading what the cache has."""
    result = LayerResult()
    builds = _Builds(layer, context, result)
    for kernel in kernels:
        builds.add(kernel)
    extras = transition_kernels(
        layer,
        device=context.device,
        batch=context.batch,
        seed=context.seed,
        integer=context.integer,
        halves=context.halves,
    )
    timings = _timings(builds, extras, context)
    for extra in extras:
        result.parts[extra.name] = timings[extra.key].median_ms
    _keep_fastest(builds, timings)
    _describe_best(builds, context)
    return result
