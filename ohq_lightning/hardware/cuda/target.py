"""The measured CUDA target: each layer's real GPU kernel, timed alone at the layer's real shapes.

Measurements are cached per GPU (name, compute capability, torch, CUDA and cuDNN versions, TF32
flags, timing settings) and keyed by layer signature, batch, kernel and implementation, so a second
search on the same GPU measures nothing again. Without a CUDA device the target can be built, but
:meth:`CUDATarget.costs` raises ``RuntimeError("no CUDA device: ...")``; everything but the GPU timing
runs on any device through :meth:`CUDATarget.measure_on`. What is measured and what is approximated:
docs/notes/cuda.md.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ohq_lightning._util.cache import cache_root
from ohq_lightning._util.progress import progress_bar
from ohq_lightning._util.timing import TimingSettings
from ohq_lightning.hardware.cache import TimingCache
from ohq_lightning.hardware.cuda.energy import energy_note
from ohq_lightning.hardware.cuda.network import base_note, example_batch, measure_base
from ohq_lightning.hardware.cuda.options import (
    CUDA_OPTIONS,
    FP8_MIN_CAPABILITY,
    DeviceInfo,
    check_options,
    nvml_index,
    plan_can_name,
    tf32_flags,
    visible_capability,
)
from ohq_lightning.hardware.cuda.profiling import LayerResult, ProfileContext, profile_layer
from ohq_lightning.hardware.cuda.table import Selection, cost_table
from ohq_lightning.hardware.cuda.timer import Timer, noop, synchronized_timer
from ohq_lightning.hardware.energy import NvmlEnergyMeter
from ohq_lightning.plan import CostTable, LayerInfo

__all__ = ["CUDATarget"]

_METHOD = "cuda-isolated-kernels-v1"  # bump when what an entry measures changes, so old caches are not reused


def _default_timing() -> TimingSettings:
    return TimingSettings(warmup=5, min_repeats=10, max_repeats=200, max_seconds=0.5, rel_spread=0.01)


def _default_options(device: int) -> tuple[str, ...]:
    """:data:`CUDA_OPTIONS`, plus ``fp8`` on a GPU that has it once plans can name it."""
    names: tuple[str, ...] = CUDA_OPTIONS
    if plan_can_name("fp8"):  # only then look at the GPU (which initialises CUDA)
        capability = visible_capability(device)
        if capability is not None and capability >= FP8_MIN_CAPABILITY:
            names = (*names, "fp8")
    return names


def _is_count(value: Any, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


@dataclass(frozen=True)
class CUDATarget:
    """Costs measured on an NVIDIA GPU: each layer's torch kernel timed alone at its real shapes.

    See docs/notes/cuda.md for what is measured and what is approximated.

    Args:
        device: the CUDA device index to measure on.
        options: candidate options (default :data:`CUDA_OPTIONS`: fp32, fp16, bf16, w8a8).
        batch_size: the batch the layers are timed at (default: the example input's batch, else 1).
        timing: how long each layer's kernels are timed.
        min_sample_ms: each timed sample runs a kernel back to back for about this long.
        measure_base: measure the rest of the network (needs the model and its example input).
        energy: read NVML's energy counter for every layer and option (slower: ``energy_seconds``
            each); absent where NVML is not available.
        energy_seconds: how long each energy reading runs the kernel.
        cache_dir: where measurements are cached (default ``$OHQ_CACHE_DIR`` or
            ``~/.cache/ohq_lightning``, under ``oqa/``); ``False`` keeps them in memory only.
        force: measure again even when the cache has the figures.
        progress: show a progress bar over the layers.
        seed: seed of the synthetic inputs and weights.

    Example:
        >>> target = CUDATarget(options=("fp16", "w8a8"))
        >>> plan = search(model, example, target=target, latency_budget=2.0)  # doctest: +SKIP
    """

    name: str = "cuda"
    device: int = 0
    options: tuple[str, ...] = None  # type: ignore[assignment]  # None: the defaults, set in __post_init__
    batch_size: int | None = None
    timing: TimingSettings = field(default_factory=_default_timing)
    min_sample_ms: float = 1.0
    measure_base: bool = True
    energy: bool = False
    energy_seconds: float = 0.2
    cache_dir: str | Path | bool | None = None
    force: bool = False
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.timing, Mapping):  # from a config file
            object.__setattr__(self, "timing", TimingSettings(**self.timing))
        if not _is_count(self.device, 0):
            raise ValueError(f"device must be a CUDA device index (an integer >= 0), got {self.device!r}")
        if self.batch_size is not None and not _is_count(self.batch_size, 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {self.batch_size!r}")
        if not self.min_sample_ms > 0 or not self.energy_seconds > 0:
            raise ValueError(
                f"min_sample_ms and energy_seconds must be positive, got {self.min_sample_ms}, {self.energy_seconds}"
            )
        if self.options is None:
            object.__setattr__(self, "options", _default_options(self.device))
            return
        checked = check_options(self.options)  # refusals, duplicates, fp8 while plans cannot name it
        if "fp8" in checked:  # asked for: look at the GPU (which initialises CUDA)
            checked = check_options(checked, visible_capability(self.device))
        object.__setattr__(self, "options", checked)

    # -- measuring -------------------------------------------------------------------------

    def with_progress(self, enabled: bool) -> CUDATarget:
        """This target with its progress bar on or off."""
        return dataclasses.replace(self, progress=enabled)

    def costs(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        model: Any = None,
        example_inputs: Any = None,
    ) -> CostTable:
        """Measure every layer at every option on the GPU (see docs/notes/cuda.md).

        Raises:
            RuntimeError: ``"no CUDA device: ..."`` when torch sees no CUDA device (or not ``device``).
            ValueError: an option this GPU cannot run (``fp8`` below compute capability 8.9).
        """
        device = self._cuda_device()
        info = DeviceInfo.of(device)
        synchronize = functools.partial(torch.cuda.synchronize, device)
        meter = NvmlEnergyMeter(nvml_index(device), min_seconds=self.energy_seconds) if self.energy else None
        try:
            with torch.cuda.device(device):
                return self.measure_on(
                    layers,
                    options,
                    device=device,
                    info=info,
                    timer=synchronized_timer(synchronize, min_sample_ms=self.min_sample_ms),
                    synchronize=synchronize,
                    energy_meter=meter,
                    model=model,
                    example_inputs=example_inputs,
                )
        finally:
            if meter is not None:
                meter.close()

    def _cuda_device(self) -> torch.device:
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none'}); the cuda target measures on an NVIDIA GPU: use the 'cpu' or "
                "'analytical' target on this machine"
            )
        count = torch.cuda.device_count()
        if self.device >= count:
            raise RuntimeError(f"no CUDA device: device={self.device} asked for, but torch sees {count}")
        return torch.device("cuda", self.device)

    def _cache(self, info: DeviceInfo, quantity: str = "latency_ms") -> TimingCache:
        root = cache_root(self.cache_dir)
        fingerprint: dict[str, Any] = {
            "method": _METHOD,
            "quantity": quantity,
            "gpu": info.name,
            "capability": f"{info.capability[0]}.{info.capability[1]}",
            "torch": info.torch_version,
            "cuda": info.cuda_version,
            "cudnn": info.cudnn_version,
            "tf32": tf32_flags(),
            "timing": self.timing.to_dict(),
            "min_sample_ms": self.min_sample_ms,
            "seed": self.seed,
        }
        if quantity != "latency_ms":  # energy entries: Timing.median_ms holds millijoules per call
            fingerprint["energy_seconds"] = self.energy_seconds
        return TimingCache(None if root is None else root / "oqa", fingerprint)

    def _batch(self, example_inputs: Any) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return example_batch(example_inputs) or 1

    def _selection(self, options: Sequence[str] | None, info: DeviceInfo, model: Any, example_inputs: Any) -> Selection:
        batch = self._batch(example_inputs)
        note = base_note(self.measure_base, model, example_inputs, batch)
        return Selection.of(self.options if options is None else options, info.capability, batch, note)

    def _profile_context(
        self,
        selection: Selection,
        info: DeviceInfo,
        device: torch.device,
        timer: Timer,
        synchronize: Callable[[], object],
        energy_meter: NvmlEnergyMeter | None,
    ) -> ProfileContext:
        energy_on = self.energy and energy_meter is not None and energy_meter.available
        return ProfileContext(
            device=device,
            batch=selection.batch,
            seed=self.seed,
            force=self.force,
            timing=self.timing,
            timer=timer,
            synchronize=synchronize,
            cache=self._cache(info),
            integer=selection.integer,
            halves=selection.halves,
            energy_meter=energy_meter if energy_on else None,
            energy_cache=self._cache(info, "energy_mj_per_call") if energy_on else None,
        )

    def _profile_layers(
        self, layers: Sequence[LayerInfo], kernels: Sequence[str], context: ProfileContext
    ) -> dict[str, LayerResult]:
        results: dict[str, LayerResult] = {}
        for layer in progress_bar(layers, desc="timing each layer on the GPU (OQA)", enabled=self.progress):
            results[layer.name] = profile_layer(layer, kernels, context)
            context.cache.save()  # an interrupted profile resumes from here
            if context.energy_cache is not None:
                context.energy_cache.save()
        return results

    def measure_on(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        device: torch.device | str,
        info: DeviceInfo,
        timer: Timer,
        synchronize: Callable[[], object] = noop,
        energy_meter: NvmlEnergyMeter | None = None,
        model: Any = None,
        example_inputs: Any = None,
    ) -> CostTable:
        """:meth:`costs` on an explicit device, with an explicit timer, energy meter and device description.

        :meth:`costs` calls it with the GPU, :func:`synchronized_timer` and ``torch.cuda.synchronize``;
        tests call it on the CPU with a scripted timer, which exercises everything but the GPU timing.
        """
        started = time.perf_counter()
        device = torch.device(device)
        selection = self._selection(options, info, model, example_inputs)
        context = self._profile_context(selection, info, device, timer, synchronize, energy_meter)
        results = self._profile_layers(layers, selection.timed, context)
        if selection.base_note is not None:
            base: tuple[float | None, dict[str, Any]] = (None, {"note": selection.base_note})
        else:
            base = measure_base(layers, results, model, example_inputs, device, timer, self.timing)
        run = {
            "timing": self.timing.to_dict(),
            "min_sample_ms": self.min_sample_ms,
            "measured_now": sum(result.measured for result in results.values()),
            "from_cache": sum(result.cached for result in results.values()),
            "profile_s": time.perf_counter() - started,
            "cache_file": None if context.cache.path is None else str(context.cache.path),
        }
        energy = energy_note(self.energy, energy_meter, self.energy_seconds)
        return cost_table(self.name, layers, selection, results, info=info, base=base, energy=energy, run=run)
