"""The measured CPU target: each layer's cost on this device, in the runtime that will deploy it.

Two runtimes: ``"onnxruntime"`` (the default; u8s8 QDQ graphs on ORT's int8 kernels, see
:mod:`ohq_lightning.deploy.onnx_qdq`) and ``"torch"`` (torch's own int8 kernels through FX graph
mode quantization, engine ``x86`` or ``qnnpack`` on ARM, see :mod:`ohq_lightning.deploy.torch_int8`).
Both are measured by the same method below; only how a set of integer layers becomes a runnable
graph differs (a small per-runtime seam).

Timing one layer on its own does not predict a network's latency here: in ONNX Runtime the
sum of isolated FP32 layer timings came to 1.1-1.2x the whole FP32 graph and the INT8 sum to
0.65-0.8x the whole INT8 graph (``bench/ort_layer_precision.py``), because a deployed graph keeps
activations in blocked layouts, fuses activations into convolutions, and pays for every
quantize/dequantize where the precision changes. So this target measures **in context**: it
deploys the real network with a set of layers on ORT's integer kernels (the QDQ graph of
:mod:`ohq_lightning.deploy.onnx_qdq`), times it end to end alternately with the all-FP32 graph
(so that the ratio between them survives the drift of a shared machine), and repeats for the
all-INT8 graph and random mixes. (In the torch runtime the FP32 reference is the float FX graph
with BatchNorm folded into the convolutions, in channels-last layout: the graph every torch mix
keeps its float layers in, and the fastest FP32 torch deployment measured here, 0.77x (ResNet-18)
and 0.78x (MobileNetV3-large) the eager model's time at 1 thread.) It then fits an additive
model to those measurements by least squares::

    latency(plan) = base + sum(kappa[l] for integer layers l) + sum(T[i] for boundaries i that change precision)

where a boundary is the pair of consecutive layers in forward order (an approximation of the
graph's edges, exact for chains; refitting profiles on the real edges predicted held-out plans no
better, ``bench/oqa_transition_model.py``) and ``T >= 0``. ``base`` becomes the cost table's
``base_latency_ms``, ``kappa`` the latency of a layer's integer options (a signed delta against
FP32, whose entry is 0), ``T`` its ``transition_ms``. The fit's residuals and a hold-out error
are recorded in the table's ``meta["fit"]``. A sample the first fit misses by more than
``max(3 x the median miss, 5%)`` is timed twice more and the median of its three measurements
kept, then the fit is redone: on a shared machine a burst of load during one sample's window
skews its ratio (re-timing the 12 worst samples of a MobileNetV3-small profile taken on a busy
machine moved them by up to 45%, while their two re-timings agreed within 3%), and one skewed
sample distorts the least-squares fit around it. Measurements are cached per device configuration and
network architecture, so a second search of the same model does not measure again; an interrupted
profile resumes from what was saved.

In the torch runtime the graphs of all mixes are built from one traced, fused and calibrated graph
(:class:`~ohq_lightning.deploy.torch_int8.TorchInt8Builder`): each mix only inserts observers whose
ranges were recorded once, and converts.

Sub-8-bit weight options (``w4a8``, ``w2a8``) run on the 8-bit kernel (their weights sit on a
coarser grid inside int8): their latency is the measured int8 latency and their size the packed
size. Energy is not reported: no energy counter is readable from a process on this kind of
machine (see :class:`~ohq_lightning._util.timing.RaplEnergyMeter`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ohq_lightning._util.cache import cache_root
from ohq_lightning._util.progress import progress_bar
from ohq_lightning._util.timing import Timing, TimingSettings, time_interleaved
from ohq_lightning.hardware.cache import TimingCache, cpu_model_name
from ohq_lightning.plan import CostTable, LayerCost, LayerInfo, Option, parse_options

__all__ = ["CPU_OPTIONS", "RUNTIMES", "CPUTarget"]

CPU_OPTIONS: tuple[str, ...] = ("fp32", "w8a8", "w4a8", "w2a8")
RUNTIMES = ("onnxruntime", "torch")
_RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "torch": "torch"}
_P_INTEGER = (0.2, 0.5, 0.8)
_METHOD = "in-context-qdq-v2-ratio-to-fp32"
_RETIME_FACTOR, _RETIME_FLOOR = 3.0, 0.05  # a sample the first fit misses by more is timed twice more
_REFERENCE = "reference:fp32_ms"  # bump when what a sample measures changes, so old caches are not reused


def _kernel(option: Option, runtime: str = "onnxruntime") -> str:
    """The kernel an option runs on in ``runtime``: ``"int8"`` or ``"fp32"``; other options are refused."""
    if option.float_format == "fp32" or (not option.is_float and option.act_bits is None):
        return "fp32"  # weight-only options are dequantized once at load: float compute
    if not option.is_float and option.act_bits == 8:
        return "int8"
    raise ValueError(
        f"option {option.name!r} cannot run in {_RUNTIME_NAMES.get(runtime, runtime)} on this CPU: it offers fp32 "
        "and integer options with 8-bit activations (w8a8, w4a8, w2a8; sub-8-bit weights run on the 8-bit kernel)"
    )


@dataclass(frozen=True)
class _Deployment:
    """The per-runtime seam: what the measurement loop needs from a runtime.

    ``build(bits)`` returns a zero-argument runner of the network with the layers whose bit is
    ``"1"`` on integer kernels; ``reference()`` returns the runner of the all-FP32 deployment (built
    only when something is to be timed, so a profile read from the cache builds nothing);
    ``graph_key`` hashes the architecture and ``version`` names the runtime (and engine) for the
    cache fingerprint.
    """

    graph_key: str
    version: str
    reference: Callable[[], Callable[[], Any]]
    build: Callable[[str], Callable[[], Any]]
    meta: dict[str, Any] = field(default_factory=dict)


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
    #: ``search`` may ask this target to measure the plans it picks (``measure_also``) and refit.
    measures_plans: ClassVar[bool] = True
    runtime: str = "onnxruntime"
    threads: int = 1
    engine: str = "x86"
    options: tuple[str, ...] = CPU_OPTIONS
    samples_per_layer: float = 3.0
    timing: TimingSettings = field(
        default_factory=lambda: TimingSettings(warmup=3, min_repeats=10, max_seconds=1.0, rel_spread=0.006)
    )
    cache_dir: str | Path | bool | None = None
    force: bool = False
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.timing, Mapping):  # from a config file
            object.__setattr__(self, "timing", TimingSettings(**self.timing))
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r} for the cpu target; available: {list(RUNTIMES)}")
        from ohq_lightning.deploy.torch_int8 import ENGINES

        if self.engine not in ENGINES:
            raise ValueError(f"unknown torch quantized engine {self.engine!r}; available: {list(ENGINES)}")
        if self.runtime != "torch" and self.engine != "x86":
            raise ValueError(f"engine={self.engine!r} applies to the torch runtime only (runtime={self.runtime!r})")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if not self.samples_per_layer > 1:
            raise ValueError("samples_per_layer must be above 1 (the fit needs more samples than unknowns / 2)")
        for option in parse_options(self.options):
            _kernel(option, self.runtime)

    def _cache(self, deployment: _Deployment) -> TimingCache:

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
        Each is timed three times and the median kept: a search acts on exactly these figures, and
        a picked plan is the one most likely to have been flattered by a lucky sample.
        """
        parsed = parse_options(self.options if options is None else options)
        kernels = {option.name: _kernel(option, self.runtime) for option in parsed}
        if model is None or example_inputs is None:
            raise ValueError(
                "the cpu target measures the network in context: pass model= and example_inputs= "
                "(ohq_lightning.search does)"
            )
        if not isinstance(example_inputs, torch.Tensor):
            kind = type(example_inputs).__name__
            raise ValueError(f"the cpu target deploys models called with one input tensor; got a {kind}")
        started = time.perf_counter()
        names = [layer.name for layer in layers]
        prepare = self._torch_deployment if self.runtime == "torch" else self._onnxruntime_deployment
        deployment = prepare(model, example_inputs, names)
        cache = self._cache(deployment)
        samples = self._samples(len(names))
        picked: set[str] = set()
        for assignment in measure_also:
            bits = "".join(
                "1" if _kernel(Option.parse(assignment[name]), self.runtime) == "int8" else "0" for name in names
            )
            if bits not in samples:
                samples.append(bits)
                picked.add(bits)
        todo = [bits for bits in samples if self.force or cache.get(bits) is None]
        reference_ms: list[float] = []
        reference = deployment.reference() if todo else None

        def time_sample(bits: str) -> Timing:
            assert reference is not None
            timed, ref = time_interleaved([deployment.build(bits), reference], self.timing)
            reference_ms.append(ref.median_ms)
            # The ratio to the FP32 graph timed alternately with it: drift of a shared machine cancels out.
            return Timing(timed.median_ms / ref.median_ms, timed.spread, timed.repeats)

        def median_of_three(bits: str, first: Timing | None = None) -> Timing:
            timings = [first or time_sample(bits), time_sample(bits), time_sample(bits)]
            return sorted(timings, key=lambda timing: timing.median_ms)[1]

        for done, bits in enumerate(progress_bar(todo, desc="OQA: timing deployed graphs", enabled=self.progress)):
            cache.put(bits, median_of_three(bits) if bits in picked else time_sample(bits))
            if done % 10 == 9:
                cache.put(_REFERENCE, Timing(statistics.median(reference_ms), 0.0, len(reference_ms)))
                cache.save()  # an interrupted profile resumes from here
        if reference_ms:
            cache.put(_REFERENCE, Timing(statistics.median(reference_ms), 0.0, len(reference_ms)))
        cache.save()

        def fitted() -> tuple[float, np.ndarray, np.ndarray, dict[str, Any], dict[str, float]]:
            fp32_ms = cache.get(_REFERENCE).median_ms  # type: ignore[union-attr]
            measured = {bits: cache.get(bits).median_ms * fp32_ms for bits in samples}  # type: ignore[union-attr]
            return (*_fit(measured, len(names), self.seed), measured)

        base, kappa, transitions, fit, measured = fitted()
        retimed = _outliers(measured, base, kappa, transitions, candidates=set(todo) - picked)
        for bits in progress_bar(retimed, desc="OQA: timing outliers again", enabled=self.progress):
            cache.put(bits, median_of_three(bits, cache.get(bits)))
        if retimed:
            cache.put(_REFERENCE, Timing(statistics.median(reference_ms), 0.0, len(reference_ms)))
            cache.save()
            base, kappa, transitions, fit, measured = fitted()
        fit.update(
            measured_now=len(todo),
            from_cache=len(samples) - len(todo),
            retimed=len(retimed),
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
                "runtime_version": deployment.version,
                **deployment.meta,
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

    def _onnxruntime_deployment(self, model: Any, example_inputs: torch.Tensor, names: list[str]) -> _Deployment:
        """ONNX Runtime: the exported float graph, and QDQ variants of it on ORT's int8 kernels."""
        import onnxruntime

        from ohq_lightning.deploy.onnx_qdq import QDQBuilder, activation_ranges, export_onnx, layer_nodes
        from ohq_lightning.hardware.ort_ops import ort_session
        from ohq_lightning.synthetic import gaussian_inputs

        graph = export_onnx(model, example_inputs)
        missing = sorted(set(names) - set(layer_nodes(graph, names)))
        if missing:
            raise ValueError(f"layers {missing} have no node in the exported ONNX graph; they cannot be measured")
        ranges = activation_ranges(graph, names, [gaussian_inputs(example_inputs, 2, seed=self.seed)])
        feed = {"x": np.asarray(example_inputs.detach().cpu().numpy(), dtype=np.float32)}
        builder = QDQBuilder(graph, ranges)

        def reference() -> Callable[[], Any]:
            return functools.partial(ort_session(graph.SerializeToString(), self.threads).run, None, feed)

        def build(bits: str) -> Callable[[], Any]:
            chosen = {name: "w8a8" for name, bit in zip(names, bits, strict=True) if bit == "1"}
            session = ort_session(builder.build(chosen).SerializeToString(), self.threads)
            return functools.partial(session.run, None, feed)

        return _Deployment(
            _graph_key(graph),
            f"onnxruntime-{onnxruntime.__version__}-nospin",  # timings taken with spinning on are not reused
            reference,
            build,
            {"reference": "the float ONNX graph", "intra_op_spinning": False},
        )

    def _torch_deployment(self, model: Any, example_inputs: torch.Tensor, names: list[str]) -> _Deployment:
        """torch: one traced, fused, calibrated FX graph; each mix is converted from it for the engine."""
        from ohq_lightning._util.timing import set_threads
        from ohq_lightning.deploy.torch_int8 import TorchDeployedModel, TorchInt8Builder
        from ohq_lightning.synthetic import gaussian_inputs

        set_threads(self.threads)
        builder = TorchInt8Builder(
            model,
            example_inputs,
            calibration_inputs=[gaussian_inputs(example_inputs, 2, seed=self.seed)],
            engine=self.engine,
        )
        missing = sorted(set(names) - set(builder.layer_names))
        if missing:
            raise ValueError(f"layers {missing} are not quantizable layers of the model; they cannot be measured")

        def deployed(bits: str) -> TorchDeployedModel:
            assignment = {name: "w8a8" if bit == "1" else "fp32" for name, bit in zip(names, bits, strict=True)}
            return TorchDeployedModel(assignment, builder.build(assignment), self.threads, engine=self.engine)

        return _Deployment(
            builder.architecture_key(),
            f"torch-{torch.__version__}-{self.engine}",
            lambda: deployed("0" * len(names)).runner(example_inputs),
            lambda bits: deployed(bits).runner(example_inputs),
            {"engine": self.engine, "reference": "the float FX graph, BatchNorm folded, channels-last"},
        )


def _outliers(
    measured: Mapping[str, float],
    base: float,
    kappa: np.ndarray,
    transitions: np.ndarray,
    *,
    candidates: set[str],
) -> list[str]:
    """The candidate samples the fit misses by more than ``max(3 x its median miss, 5%)``, worst first."""
    solution = np.concatenate([[base], kappa, transitions])
    miss = {bits: abs(float(_design(bits) @ solution) - value) / value for bits, value in measured.items()}
    limit = max(_RETIME_FACTOR * statistics.median(miss.values()), _RETIME_FLOOR)
    return sorted((bits for bits in candidates if miss[bits] > limit), key=lambda bits: -miss[bits])


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
