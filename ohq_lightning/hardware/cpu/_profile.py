"""Timing mixes of a deployment as ratios to its all-FP32 graph, and keeping them in a timing cache."""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any

from ohq_lightning._util.progress import progress_bar
from ohq_lightning._util.timing import Timing, TimingSettings, time_interleaved
from ohq_lightning.hardware.cache import TimingCache
from ohq_lightning.hardware.cpu._runtimes import Deployment

__all__ = ["REFERENCE", "Profiler"]

REFERENCE = "reference:fp32_ms"
"""Cache key of the FP32 graph's latency; bump when what a sample measures changes, so old caches are not reused."""


class Profiler:
    """Times plans (bit strings: ``"1"`` for an integer layer) of one deployment and caches the timings.

    A sample's timing is the ratio of its latency to the all-FP32 graph's, timed alternately with
    it, so that the drift of a shared machine cancels out; :meth:`measured` turns the ratios back
    into milliseconds with the median FP32 latency seen. Ratios are worthless without that FP32
    latency: a cache holding samples but no :data:`REFERENCE` is rebuilt with a warning.
    """

    def __init__(self, deployment: Deployment, cache: TimingCache, timing: TimingSettings, *, progress: bool) -> None:
        self.deployment = deployment
        self.cache = cache
        if len(cache) and cache.get(REFERENCE) is None:
            warnings.warn(
                f"timing cache {cache.path} holds ratios but no FP32 reference ({REFERENCE!r}); rebuilding it",
                stacklevel=3,
            )
            cache.clear()
        self.timing = timing
        self.progress = progress
        self._reference: Callable[[], Any] | None = None  # built on the first timing: a cached profile builds none
        self._reference_ms: list[float] = []

    def time(self, bits: str) -> Timing:
        """One sample: the plan's latency as a ratio to the FP32 graph timed alternately with it."""
        if self._reference is None:
            self._reference = self.deployment.reference()
        timed, ref = time_interleaved([self.deployment.build(bits), self._reference], self.timing)
        self._reference_ms.append(ref.median_ms)
        return Timing(timed.median_ms / ref.median_ms, timed.spread, timed.repeats)

    def median_of_three(self, bits: str, first: Timing | None = None) -> Timing:
        """The median of three samples of ``bits`` (``first``, if given, is one of them)."""
        timings = [first or self.time(bits), self.time(bits), self.time(bits)]
        return sorted(timings, key=lambda timing: timing.median_ms)[1]

    def measure(self, todo: Sequence[str], picked: Collection[str]) -> None:
        """Time every plan of ``todo`` (those in ``picked`` three times), saving every ten so a profile can resume."""
        for done, bits in enumerate(
            progress_bar(todo, desc="timing the deployed network on this CPU (OQA)", enabled=self.progress)
        ):
            self.cache.put(bits, self.median_of_three(bits) if bits in picked else self.time(bits))
            if done % 10 == 9:
                self._save()  # an interrupted profile resumes from here
        self._save()

    def retime(self, plans: Sequence[str]) -> None:
        """Time each plan twice more and keep the median of its three timings."""
        for bits in progress_bar(plans, desc="re-timing the least certain graphs (OQA)", enabled=self.progress):
            self.cache.put(bits, self.median_of_three(bits, self.cache.get(bits)))
        if plans:
            self._save()

    def measured(self, plans: Sequence[str]) -> dict[str, float]:
        """The cached latency (ms) of each plan: its ratio times the FP32 graph's latency."""
        fp32_ms = self.cache.get(REFERENCE).median_ms  # type: ignore[union-attr]
        return {bits: self.cache.get(bits).median_ms * fp32_ms for bits in plans}  # type: ignore[union-attr]

    def _save(self) -> None:
        if self._reference_ms:
            self.cache.put(REFERENCE, Timing(statistics.median(self._reference_ms), 0.0, len(self._reference_ms)))
        self.cache.save()
