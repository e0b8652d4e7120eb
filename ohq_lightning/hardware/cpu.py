"""The measured CPU target: each layer's cost on this device, in the runtime that will deploy it.

Timing one layer on its own does not predict a network's latency here: in ONNX Runtime the
sum of isolated FP32 layer timings came to 1.1-1.2x the whole FP32 graph and the INT8 sum to
0.65-0.8x the whole INT8 graph (``bench/ort_layer_precision.py``), because a deployed graph keeps
activations in blocked layouts, fuses activations into convolutions, and pays for every
quantize/dequantize where the precision changes. So this target measures **in context**: it
deploys the real network with a set of layers on ORT's integer kernels (the QDQ graph of
:mod:`ohq_lightning.deploy.onnx_qdq`), times it end to end alternately with the all-FP32 graph
(so that the ratio between them survives the drift of a shared machine), and repeats for the
all-INT8 graph and random mixes. It then fits an additive model to those measurements by
least squares::

    latency(plan) = base + sum(kappa[l] for integer layers l) + sum(T[i] for boundaries i that change precision)

where a boundary is the pair of consecutive layers in forward order (an approximation of the
graph's edges, exact for chains) and ``T >= 0``. ``base`` becomes the cost table's
``base_latency_ms``, ``kappa`` the latency of a layer's integer options (a signed delta against
FP32, whose entry is 0), ``T`` its ``transition_ms``. The fit's residuals and a hold-out error
are recorded in the table's ``meta["fit"]``. Measurements are cached per device configuration and
network architecture, so a second search of the same model does not measure again; an interrupted
profile resumes from what was saved.

Sub-8-bit weight options (``w4a8``, ``w2a8``) run on the 8-bit kernel (their weights sit on a
coarser grid inside int8): their latency is the measured int8 latency and their size the packed
size. Energy is not reported: no energy counter is readable from a process on this kind of
machine (see :class:`~ohq_lightning.hardware.timing.RaplEnergyMeter`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ohq_lightning.hardware.cache import TimingCache, cpu_model_name
from ohq_lightning.hardware.timing import Timing, TimingSettings, time_interleaved
from ohq_lightning.plan import CostTable, LayerCost, LayerInfo, Option, parse_options
from ohq_lightning.progress import progress_bar

__all__ = ["CPU_OPTIONS", "RUNTIMES", "CPUTarget"]

CPU_OPTIONS: tuple[str, ...] = ("fp32", "w8a8", "w4a8", "w2a8")
RUNTIMES = ("onnxruntime",)
_P_INTEGER = (0.2, 0.5, 0.8)
_METHOD = "in-context-qdq-v2-ratio-to-fp32"
_REFERENCE = "reference:fp32_ms"  # bump when what a sample measures changes, so old caches are not reused


def _kernel(option: Option) -> str:
    """The ORT kernel an option runs on: ``"int8"`` or ``"fp32"``; other options are refused."""
    if option.float_format == "fp32" or (not option.is_float and option.act_bits is None):
        return "fp32"  # weight-only options are dequantized once at load: float compute
    if not option.is_float and option.act_bits == 8:
        return "int8"
    raise ValueError(
        f"option {option.name!r} cannot run in ONNX Runtime on this CPU: it offers fp32 and integer options "
        "with 8-bit activations (w8a8, w4a8, w2a8; sub-8-bit weights run on the 8-bit kernel)"
    )


def _graph_key(graph: Any) -> str:
    """A hash of the network's architecture (ops, wiring, attributes, tensor shapes), not its weight values."""
    digest = hashlib.sha256()
    for node in graph.graph.node:
        digest.update(f"{node.op_type}|{list(node.input)}|{list(node.output)}|{node.attribute}".encode())
    for init in graph.graph.initializer:
        digest.update(f"{init.name}|{list(init.dims)}|{init.data_type}".encode())
    for value in graph.graph.input:
        digest.update(str(value.type).encode())
    return digest.hexdigest()[:20]


@dataclass(frozen=True)
class CPUTarget:
    """Costs measured on this CPU, in context, in the runtime that will deploy the model.

    Args:
        runtime: ``"onnxruntime"`` (the default deployment runtime; u8s8 QDQ on its int8 kernels).
        threads: intra-op threads of every session (1 gives the most repeatable figures).
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
    #: ``search`` may ask this target to measure the plans it picks (``measure_also``) and refit.
    measures_plans: ClassVar[bool] = True
    runtime: str = "onnxruntime"
    threads: int = 1
    options: tuple[str, ...] = CPU_OPTIONS
    samples_per_layer: float = 3.0
    timing: TimingSettings = field(
        default_factory=lambda: TimingSettings(warmup=3, min_repeats=10, max_seconds=1.0, rel_spread=0.004)
    )
    cache_dir: str | Path | bool | None = None
    force: bool = False
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.timing, Mapping):  # from a config file
            object.__setattr__(self, "timing", TimingSettings(**self.timing))
        if self.runtime not in RUNTIMES:
            raise ValueError(
                f"unknown runtime {self.runtime!r} for the cpu target; available: {list(RUNTIMES)} "
                "(the torch runtime is not implemented yet)"
            )
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if not self.samples_per_layer > 1:
            raise ValueError("samples_per_layer must be above 1 (the fit needs more samples than unknowns / 2)")
        for option in parse_options(self.options):
            _kernel(option)

    def _cache(self, graph_key: str) -> TimingCache:
        import onnxruntime

        from ohq_lightning.synthetic import cache_root

        root = cache_root(self.cache_dir)
        directory = None if root is None else root / "oqa"
        fingerprint = {
            "method": _METHOD,
            "cpu": cpu_model_name(),
            "runtime": f"onnxruntime-{onnxruntime.__version__}",
            "threads": self.threads,
            "graph": graph_key,
            "timing": self.timing.to_dict(),
        }
        return TimingCache(directory, fingerprint)

    def _samples(self, count: int) -> list[str]:
        rng = np.random.default_rng(self.seed)
        plans = {"0" * count, "1" * count}
        wanted = 2 + math.ceil(self.samples_per_layer * count)
        index = 0
        while len(plans) < wanted and index < 50 * wanted:
            p = _P_INTEGER[index % len(_P_INTEGER)]
            plans.add("".join("1" if bit else "0" for bit in rng.random(count) < p))
            index += 1
        return sorted(plans, key=lambda bits: (bits.count("1"), bits))

    def costs(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        model: Any = None,
        example_inputs: Any = None,
        measure_also: Sequence[Mapping[str, str]] = (),
    ) -> CostTable:
        """Measure the network in context and return the fitted cost table (see the module docstring).

        ``measure_also`` lists plans (layer -> option) to time as well and include in the fit, e.g.
        the plans a search picked, so that the predictions of those very plans rest on a measurement.
        """
        parsed = parse_options(self.options if options is None else options)
        kernels = {option.name: _kernel(option) for option in parsed}
        if model is None or example_inputs is None:
            raise ValueError(
                "the cpu target measures the network in context: pass model= and example_inputs= "
                "(ohq_lightning.search does)"
            )
        if not isinstance(example_inputs, torch.Tensor):
            kind = type(example_inputs).__name__
            raise ValueError(f"the cpu target deploys models called with one input tensor; got a {kind}")
        from ohq_lightning.deploy.onnx_qdq import QDQBuilder, activation_ranges, export_onnx, layer_nodes
        from ohq_lightning.hardware.ort_ops import ort_session
        from ohq_lightning.synthetic import gaussian_inputs

        started = time.perf_counter()
        names = [layer.name for layer in layers]
        graph = export_onnx(model, example_inputs)
        missing = sorted(set(names) - set(layer_nodes(graph, names)))
        if missing:
            raise ValueError(f"layers {missing} have no node in the exported ONNX graph; they cannot be measured")
        ranges = activation_ranges(graph, names, [gaussian_inputs(example_inputs, 2, seed=self.seed)])
        cache = self._cache(_graph_key(graph))
        feed = {"x": np.asarray(example_inputs.detach().cpu().numpy(), dtype=np.float32)}
        samples = self._samples(len(names))
        for assignment in measure_also:
            bits = "".join("1" if _kernel(Option.parse(assignment[name])) == "int8" else "0" for name in names)
            if bits not in samples:
                samples.append(bits)
        todo = [bits for bits in samples if self.force or cache.get(bits) is None]
        reference = ort_session(graph.SerializeToString(), self.threads)
        run_reference = functools.partial(reference.run, None, feed)
        builder = QDQBuilder(graph, ranges)
        reference_ms: list[float] = []
        for done, bits in enumerate(progress_bar(todo, desc="OQA: timing deployed graphs", enabled=self.progress)):
            chosen = {name: "w8a8" for name, bit in zip(names, bits, strict=True) if bit == "1"}
            session = ort_session(builder.build(chosen).SerializeToString(), self.threads)
            timed, ref = time_interleaved([lambda s=session: s.run(None, feed), run_reference], self.timing)
            reference_ms.append(ref.median_ms)
            # Each entry is the ratio to the FP32 graph timed alternately with it: drift of a shared
            # machine cancels out.
            cache.put(bits, Timing(timed.median_ms / ref.median_ms, timed.spread, timed.repeats))
            if done % 10 == 9:
                cache.put(_REFERENCE, Timing(statistics.median(reference_ms), 0.0, len(reference_ms)))
                cache.save()  # an interrupted profile resumes from here
        if reference_ms:
            cache.put(_REFERENCE, Timing(statistics.median(reference_ms), 0.0, len(reference_ms)))
        cache.save()
        fp32_ms = cache.get(_REFERENCE).median_ms  # type: ignore[union-attr]
        measured = {bits: cache.get(bits).median_ms * fp32_ms for bits in samples}  # type: ignore[union-attr]
        base, kappa, transitions, fit = _fit(measured, len(names), self.seed)
        fit.update(
            measured_now=len(todo),
            from_cache=len(samples) - len(todo),
            layers_int8_slower=[name for name, delta in zip(names, kappa, strict=True) if delta > 0],
        )

        table: dict[str, dict[str, LayerCost]] = {}
        for index, layer in enumerate(layers):
            table[layer.name] = {
                option.name: LayerCost(
                    weight_bytes=layer.weight_bytes(option),
                    bops=layer.bops(option),
                    latency_ms=float(kappa[index]) if kernels[option.name] == "int8" else 0.0,
                    energy_mj=None,
                    source="measured",
                )
                for option in parsed
            }
        int8 = Option.parse("w8a8")
        return CostTable(
            target=self.name,
            options=[option.name for option in parsed],
            costs=table,
            int8_weight_bytes={layer.name: layer.weight_bytes(int8) for layer in layers},
            transition_ms={names[i]: float(transitions[i]) for i in range(len(names) - 1)},
            base_latency_ms=float(base),
            meta={
                "source": "measured",
                "runtime": self.runtime,
                "threads": self.threads,
                "cpu": cpu_model_name(),
                "kernel_of_option": kernels,
                "latency_model": "in-context additive fit: base + sum(kappa of integer layers) + sum(transitions)",
                "layer_latency_is": "delta against the same layer in FP32 inside the deployed network",
                "energy": "not measured: no readable energy counter",
                "fit": fit,
                "profile_s": time.perf_counter() - started,
                "cache_file": None if cache.path is None else str(cache.path),
            },
        )


def _design(bits: str) -> np.ndarray:
    x = np.array([c == "1" for c in bits], dtype=float)
    return np.concatenate([[1.0], x, np.abs(np.diff(x))])


def _solve(rows: np.ndarray, targets: np.ndarray, count: int) -> np.ndarray:
    from scipy.optimize import lsq_linear

    lower = np.concatenate([np.full(1 + count, -np.inf), np.zeros(max(count - 1, 0))])
    return lsq_linear(rows, targets, bounds=(lower, np.full(rows.shape[1], np.inf))).x


def _fit(measured: dict[str, float], count: int, seed: int) -> tuple[float, np.ndarray, np.ndarray, dict[str, Any]]:
    """Least-squares fit of base, per-layer integer deltas and transition costs (T >= 0) to the samples."""
    keys = list(measured)
    rows = np.stack([_design(bits) for bits in keys])
    targets = np.array([measured[bits] for bits in keys])
    solution = _solve(rows, targets, count)
    predicted = rows @ solution
    relative = np.abs(predicted - targets) / targets
    rng = np.random.default_rng(seed + 1)
    held = rng.permutation(len(keys))[: max(len(keys) // 5, 1)]
    kept = np.setdiff1d(np.arange(len(keys)), held)
    holdout = rows[held] @ _solve(rows[kept], targets[kept], count)
    fit = {
        "samples": len(keys),
        "unknowns": int(rows.shape[1]),
        "max_rel_residual": float(relative.max()),
        "median_rel_residual": float(np.median(relative)),
        "holdout_max_rel_error": float((np.abs(holdout - targets[held]) / targets[held]).max()),
        "fp32_ms": measured["0" * count],
        "int8_ms": measured["1" * count],
    }
    return float(solution[0]), solution[1 : 1 + count], solution[1 + count :], fit
