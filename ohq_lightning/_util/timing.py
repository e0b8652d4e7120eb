"""The timing harness: run one operation until its median is stable, and say how stable it was."""

from __future__ import annotations

import contextlib
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ohq_lightning._util.jsonable import JsonMixin

__all__ = [
    "RaplEnergyMeter",
    "Timing",
    "TimingSettings",
    "set_threads",
    "stage_seconds",
    "time_callable",
    "time_interleaved",
]

_PACKAGE_ZONE = re.compile(r"intel-rapl:\d+")


@contextlib.contextmanager
def stage_seconds(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Record the wall-clock seconds of the block under ``seconds[stage]`` (a job's or a search's stages)."""
    started = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - started


@dataclass(frozen=True)
class TimingSettings(JsonMixin):
    """How long to time one operation.

    Args:
        warmup: untimed calls first (caches, lazy initialisation, JIT).
        min_repeats: timed calls before the stopping rule is consulted.
        max_repeats: stop after this many timed calls.
        max_seconds: stop after this much timing per operation.
        rel_spread: stop once the median is known this precisely: the interquartile range over
            the median, divided by sqrt(repeats), falls below it.
        min_seconds: time at least this long before the stopping rule is consulted (fast operations
            get more repeats where they cost little); ``max_seconds`` still bounds it.
    """

    warmup: int = 3
    min_repeats: int = 7
    max_repeats: int = 300
    max_seconds: float = 0.5
    rel_spread: float = 0.02
    min_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_repeats < 1 or self.max_repeats < self.min_repeats:
            raise ValueError(f"timing settings need warmup >= 0 and 1 <= min_repeats <= max_repeats, got {self}")
        if self.max_seconds <= 0 or self.rel_spread <= 0:
            raise ValueError(f"timing settings need max_seconds > 0 and rel_spread > 0, got {self}")
        if self.min_seconds < 0:
            raise ValueError(f"timing settings need min_seconds >= 0, got {self}")


@dataclass(frozen=True)
class Timing(JsonMixin):
    """One operation's measured time: median milliseconds, relative interquartile spread, repeats."""

    median_ms: float
    spread: float
    repeats: int


def _relative_iqr(samples: list[float]) -> float:
    if len(samples) < 4:
        return float("inf")
    q1, _, q3 = statistics.quantiles(samples, n=4)
    median = statistics.median(samples)
    return (q3 - q1) / median if median > 0 else float("inf")


def time_callable(fn: Callable[[], object], settings: TimingSettings | None = None) -> Timing:
    """Time ``fn()``: warm up, then repeat until the median is stable or a cap is reached.

    Example:
        >>> timing = time_callable(lambda: sum(range(1000)), TimingSettings(max_seconds=0.05))
        >>> timing.median_ms > 0 and timing.repeats >= 7
        True
    """
    return time_interleaved([fn], settings)[0]


def time_interleaved(fns: Sequence[Callable[[], object]], settings: TimingSettings | None = None) -> list[Timing]:
    """Time several operations in turn (a, b, a, b, ...) so that drift of a shared machine hits all alike.

    Stops when every median is stable (see :class:`TimingSettings`) or at a cap; ``max_seconds``
    bounds the whole run. Compare the medians as ratios.

    Example:
        >>> fast, slow = time_interleaved([lambda: None, lambda: sum(range(10_000))], TimingSettings(max_seconds=0.05))
        >>> fast.median_ms < slow.median_ms
        True
    """
    settings = settings or TimingSettings()
    for _ in range(settings.warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    started = time.perf_counter()
    floor = min(settings.min_seconds, settings.max_seconds)
    while len(samples[0]) < settings.max_repeats:
        for fn, times in zip(fns, samples, strict=True):
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
        count = len(samples[0])
        if count < settings.min_repeats or time.perf_counter() - started < floor:
            continue
        if max(_relative_iqr(times) for times in samples) / count**0.5 < settings.rel_spread:
            break
        if time.perf_counter() - started > settings.max_seconds:
            break
    return [
        Timing(median_ms=statistics.median(times) * 1e3, spread=_relative_iqr(times), repeats=len(times))
        for times in samples
    ]


def set_threads(threads: int) -> int:
    """Set torch's intra-op thread count for timing, once per process.

    Changing the count after quantized kernels ran made int8 timings erratic on the development
    machine, so a change away from a count already set warns: time in a fresh process instead.
    Returns the thread count in force.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    current = torch.get_num_threads()
    if current != threads:
        if getattr(set_threads, "_already_set", False):
            warnings.warn(
                f"changing torch threads from {current} to {threads} after timing in this process; "
                "int8 timings may be erratic: time each thread count in its own process",
                RuntimeWarning,
                stacklevel=2,
            )
        torch.set_num_threads(threads)
    set_threads._already_set = True  # type: ignore[attr-defined]
    return threads


class RaplEnergyMeter:
    """CPU package energy from Linux RAPL powercap counters, where they are readable.

    Only package zones (``intel-rapl:<n>``) are summed: their subzones (``intel-rapl:<n>:<m>``,
    core/uncore/dram), which also appear at the top of the powercap tree, would count twice.
    ``available`` is False when the counters are absent or unreadable (containers, most VMs):
    then no energy is reported at all, never an estimate.
    """

    def __init__(self, root: str | Path = "/sys/class/powercap") -> None:
        self._files = sorted(
            path for path in Path(root).glob("intel-rapl:*/energy_uj") if _PACKAGE_ZONE.fullmatch(path.parent.name)
        )
        self.available = bool(self._files) and all(self._read_one(f) is not None for f in self._files)

    @staticmethod
    def _read_one(path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def read_uj(self) -> int:
        """Sum of the package counters, microjoules (wraps are not handled: measure short spans)."""
        return sum(self._read_one(f) or 0 for f in self._files)

    def measure_mj(self, fn: Callable[[], object], repeats: int) -> float | None:
        """Millijoules per call of ``fn`` over ``repeats`` calls, or None where RAPL is unavailable."""
        if not self.available or repeats < 1:
            return None
        start = self.read_uj()
        for _ in range(repeats):
            fn()
        used = self.read_uj() - start
        return used / 1e3 / repeats if used > 0 else None
