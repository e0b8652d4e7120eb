"""The ``cpu`` target: each layer's cost measured on this CPU, in context, in the runtime that will deploy it."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ohq_lightning._util.cache import cache_root
from ohq_lightning._util.timing import TimingSettings, time_interleaved
from ohq_lightning.deploy import ENGINES
from ohq_lightning.hardware.base import int8_weight_bytes
from ohq_lightning.hardware.cache import TimingCache, cpu_model_name
from ohq_lightning.hardware.cpu._profile import Profiler
from ohq_lightning.hardware.cpu._runtimes import RUNTIMES, Deployment, build_deployment, kernel_of
from ohq_lightning.hardware.cpu.fit import AdditiveFit, fit_additive, outliers
from ohq_lightning.plan import CostTable, LayerCost, LayerInfo, Option, parse_options
from ohq_lightning.sensitivity.synthetic import model_fingerprint

__all__ = ["CPU_OPTIONS", "DEFAULT_TIMING", "CPUTarget"]

CPU_OPTIONS: tuple[str, ...] = ("fp32", "w8a8", "w4a8", "w2a8")
_P_INTEGER = (0.2, 0.5, 0.8)

DEFAULT_TIMING = TimingSettings(warmup=1, min_repeats=6, max_seconds=1.0, rel_spread=0.03, min_seconds=0.08)
"""How long the cpu target times each graph: at least 6 calls after 2 warm-ups, then until its median is
known to about 2% (relative interquartile range over sqrt(calls)), at most 1 s a graph. The additive fit
has about 1.25 samples per unknown, so noise of that size moves its predictions by a few percent: well
inside the 10% that ``bench/oqa_fidelity.py`` allows. Timing longer bought precision the fit's own
error swamps (the old 0.6% setting cost a third of a cold MobileNetV3-large search)."""
_METHOD = "in-context-qdq-v3-batched-ratio-to-fp32"


@dataclass(frozen=True)
class CPUTarget:
    """Costs measured on this CPU, in context, in the runtime that will deploy the model.

    Args:
        runtime: ``"onnxruntime"`` (the default deployment runtime; u8s8 QDQ on its int8 kernels) or
            ``"torch"`` (torch's int8 kernels through FX graph mode quantization; FP32 reference: the
            float FX graph with BatchNorm folded, channels-last).
        threads: intra-op threads of every session (1 gives the most repeatable figures); in the
            torch runtime they are torch's process-wide threads, set once per process.
        engine: torch's quantized engine for the torch runtime: ``"x86"`` (default; fbgemm/oneDNN),
            ``"fbgemm"``, ``"onednn"``, or ``"qnnpack"`` (ARM boards). Only the torch runtime has one.
        options: candidate options (fp32 and integer options with 8-bit activations).
        samples_per_layer: mixed plans measured per layer for the fit (more: slower, better fit).
        timing: how long to time each deployed graph.
        cache_dir: where measurements are cached (default ``$OHQ_CACHE_DIR`` or
            ``~/.cache/ohq_lightning``, under ``oqa/``); ``False`` keeps them in memory only.
        force: measure again even when the cache has the figures.
        progress: show a progress bar over the graphs being timed.
        seed: seed of the random mixes.

    Example:
        >>> target = CPUTarget(threads=1)
        >>> plan = search(model, example, target=target, latency_budget=3.0)  # doctest: +SKIP
    """

    name: str = "cpu"
    runtime: str = "onnxruntime"
    threads: int = 1
    engine: str = "x86"
    options: tuple[str, ...] = CPU_OPTIONS
    samples_per_layer: float = 2.5
    timing: TimingSettings = field(default_factory=lambda: DEFAULT_TIMING)
    cache_dir: str | Path | bool | None = None
    force: bool = False
    progress: bool = True
    seed: int = 0
    _deployments: dict[tuple[Any, ...], Deployment] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )  # the latest model's deployment, shared by a search's profile, refinement and final timing

    def __post_init__(self) -> None:
        if isinstance(self.timing, Mapping):  # from a config file
            object.__setattr__(self, "timing", TimingSettings(**self.timing))
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r} for the cpu target; available: {list(RUNTIMES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown torch quantized engine {self.engine!r}; available: {list(ENGINES)}")
        if self.runtime != "torch" and self.engine != "x86":
            raise ValueError(f"engine={self.engine!r} applies to the torch runtime only (runtime={self.runtime!r})")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if not self.samples_per_layer > 1:
            raise ValueError("samples_per_layer must be above 1 (the fit needs more samples than unknowns / 2)")
        for option in parse_options(self.options):
            kernel_of(option, self.runtime)

    def costs(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        model: Any = None,
        example_inputs: Any = None,
    ) -> CostTable:
        """Measure the network in context and return the fitted cost table."""
        return self.costs_with_plans(layers, options, model=model, example_inputs=example_inputs, plans=())

    def costs_with_plans(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        model: Any,
        example_inputs: Any,
        plans: Sequence[Mapping[str, str]],
    ) -> CostTable:
        """Measure the network in context, time ``plans`` (layer -> option) as well, and return the fitted table.

        ``plans`` are e.g. the plans a search picked, so that the predictions of those very plans
        rest on a measurement. Each is timed three times and the median kept: a search acts on
        exactly these figures, and a picked plan is the one most likely to have been flattered by a
        lucky sample. The method and why: ``docs/notes/cpu_target.md``.
        """
        parsed = parse_options(self.options if options is None else options)
        kernels = {option.name: kernel_of(option, self.runtime) for option in parsed}
        _check_inputs(model, example_inputs)
        started = time.perf_counter()
        names = [layer.name for layer in layers]
        deployment = self._deployment(model, example_inputs, names)
        profiler = Profiler(deployment, self._cache(deployment), self.timing, progress=self.progress)
        samples = self._samples(len(names))
        picked: set[str] = set()
        for bits in (self._bits(plan, names) for plan in plans):
            if bits not in samples:
                samples.append(bits)
                picked.add(bits)
        todo = [bits for bits in samples if self.force or profiler.cache.get(bits) is None]
        profiler.measure(todo, picked)
        anchor = profiler.anchor(len(names))
        fit, retimed = self._fit(profiler, samples, anchor["fp32_ms"], candidates=set(todo) - picked)
        stats = {
            **fit.stats,
            "measured_now": len(todo),
            "from_cache": len(samples) - len(todo),
            "retimed": len(retimed),
            "layers_int8_slower": [name for name, delta in zip(names, fit.kappa, strict=True) if delta > 0],
        }
        meta = self._meta(deployment, kernels, stats, profiler.cache, time.perf_counter() - started)
        return self._table(layers, parsed, fit, meta | {"anchor": anchor})

    def time_plans(
        self,
        layers: Sequence[LayerInfo],
        plans: Sequence[Mapping[str, str]],
        *,
        model: Any,
        example_inputs: Any,
    ) -> list[float]:
        """The median end-to-end milliseconds of each plan's deployed graph, all timed interleaved in one run.

        Plans that run the same layers on integer kernels share one graph (and one timing).
        """
        _check_inputs(model, example_inputs)
        names = [layer.name for layer in layers]
        deployment = self._deployment(model, example_inputs, names)
        bits = [self._bits(plan, names) for plan in plans]
        unique = list(dict.fromkeys(bits))
        timings = time_interleaved([deployment.build(graph) for graph in unique], self.timing)
        median_ms = {graph: timing.median_ms for graph, timing in zip(unique, timings, strict=True)}
        return [median_ms[graph] for graph in bits]

    def with_progress(self, enabled: bool) -> CPUTarget:
        """This target with its progress bars on or off."""
        return dataclasses.replace(self, progress=enabled)

    def _deployment(self, model: Any, example_inputs: torch.Tensor, names: list[str]) -> Deployment:
        """The deployment of this model (by its weights) and layers: built once, then shared by the
        search's calls (profile, refinement rounds, final timing), which would otherwise export again."""
        key = (model_fingerprint(model), tuple(example_inputs.shape), str(example_inputs.dtype), tuple(names))
        if key not in self._deployments:
            self._deployments.clear()  # one model at a time
            self._deployments[key] = build_deployment(
                self.runtime, model, example_inputs, names, threads=self.threads, engine=self.engine, seed=self.seed
            )
        return self._deployments[key]

    def _bits(self, plan: Mapping[str, str], names: Sequence[str]) -> str:
        """A plan (layer -> option) as a bit string over ``names``: ``"1"`` where the option runs on int8."""
        return "".join("1" if kernel_of(Option.parse(plan[name]), self.runtime) == "int8" else "0" for name in names)

    def _cache(self, deployment: Deployment) -> TimingCache:
        root = cache_root(self.cache_dir)
        directory = None if root is None else root / "oqa"
        fingerprint = {
            "method": _METHOD,
            "cpu": cpu_model_name(),
            "runtime": deployment.version,
            "threads": self.threads,
            "graph": deployment.graph_key,
            "timing": self.timing.to_dict(),
        }
        return TimingCache(directory, fingerprint)

    def _samples(self, count: int) -> list[str]:
        """All-FP32, all-INT8 and random mixes (integer with probability 0.2, 0.5, 0.8 in turn), fewest int8 first."""
        rng = np.random.default_rng(self.seed)
        plans = {"0" * count, "1" * count}
        wanted = 2 + math.ceil(self.samples_per_layer * count)
        index = 0
        while len(plans) < wanted and index < 50 * wanted:
            p = _P_INTEGER[index % len(_P_INTEGER)]
            plans.add("".join("1" if bit else "0" for bit in rng.random(count) < p))
            index += 1
        return sorted(plans, key=lambda bits: (bits.count("1"), bits))

    def _fit(
        self, profiler: Profiler, samples: list[str], fp32_ms: float, *, candidates: set[str]
    ) -> tuple[AdditiveFit, list[str]]:
        """Fit the samples' ratios scaled to ``fp32_ms``, time the samples the fit misses (of ``candidates``)
        again, and fit once more if any were."""
        count = len(samples[0])
        measured = profiler.measured(samples, fp32_ms)
        fit = fit_additive(measured, count, self.seed)
        retimed = outliers(measured, fit, candidates=candidates)
        profiler.retime(retimed)
        if retimed:
            fit = fit_additive(profiler.measured(samples, fp32_ms), count, self.seed)
        return fit, retimed

    def _table(
        self, layers: Sequence[LayerInfo], parsed: Sequence[Option], fit: AdditiveFit, meta: dict[str, Any]
    ) -> CostTable:
        """The cost table of the fit: integer options cost their layer's delta, FP32 0, plus base and transitions."""
        kernels = meta["kernel_of_option"]
        costs = {
            layer.name: {
                option.name: LayerCost(
                    weight_bytes=layer.weight_bytes(option),
                    bops=layer.bops(option),
                    latency_ms=float(fit.kappa[index]) if kernels[option.name] == "int8" else 0.0,
                    energy_mj=None,
                    source="fitted",  # from end-to-end timings of mixes on this device, not timed layer by layer
                )
                for option in parsed
            }
            for index, layer in enumerate(layers)
        }
        return CostTable(
            target=self.name,
            options=[option.name for option in parsed],
            costs=costs,
            int8_weight_bytes=int8_weight_bytes(layers),
            transition_ms={layers[i].name: float(fit.transitions[i]) for i in range(len(layers) - 1)},
            base_latency_ms=float(fit.base),
            meta=meta,
        )

    def _meta(
        self,
        deployment: Deployment,
        kernels: Mapping[str, str],
        stats: dict[str, Any],
        cache: TimingCache,
        profile_s: float,
    ) -> dict[str, Any]:
        """Where the numbers came from (runtime, device, cache) and how well the model fits them."""
        return {
            "source": "fitted",
            "runtime": self.runtime,
            "runtime_version": deployment.version,
            **deployment.meta,
            "threads": self.threads,
            "cpu": cpu_model_name(),
            "kernel_of_option": dict(kernels),
            "latency_model": "in-context additive fit: base + sum(kappa of integer layers) + sum(transitions)",
            "layer_latency_is": "delta against the same layer in FP32 inside the deployed network",
            "energy": "not measured: no readable energy counter",
            "fit": stats,
            "profile_s": profile_s,
            "cache_file": None if cache.path is None else str(cache.path),
        }


def _check_inputs(model: Any, example_inputs: Any) -> None:
    """The cpu target deploys the network itself: it needs the model and one input tensor."""
    if model is None or example_inputs is None:
        raise ValueError(
            "the cpu target measures the network in context: pass model= and example_inputs= "
            "(ohq_lightning.search does)"
        )
    if not isinstance(example_inputs, torch.Tensor):
        kind = type(example_inputs).__name__
        raise ValueError(f"the cpu target deploys models called with one input tensor; got a {kind}")
