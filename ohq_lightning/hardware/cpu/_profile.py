"""Timing mixes of a deployment as ratios to its all-FP32 graph, and keeping them in a timing cache."""

from __future__ import annotations

import dataclasses
import statistics
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

from ohq_lightning._util.progress import progress_bar
from ohq_lightning._util.timing import Timing, TimingSettings, time_interleaved
from ohq_lightning.hardware.cache import TimingCache
from ohq_lightning.hardware.cpu._runtimes import Deployment

__all__ = ["ANCHOR_RUNS", "GRAPHS_PER_RUN", "REFERENCE", "Profiler"]

REFERENCE = "reference:fp32_ms"
"""Cache key of the FP32 graph's latency; bump when what a sample measures changes, so old caches are not reused."""

GRAPHS_PER_RUN = 1
"""Mixes timed in one interleaved run with the FP32 graph: one, so that every mix is timed in the same
context, right after and right before the FP32 graph. Longer rotations looked cheaper (the FP32 timing
shared by several mixes) but each graph's time depends on what ran before it: with two mixes a run the
plans a search picked for MobileNetV3-large at 32x32 ran no faster than uniform INT8 (0.98-1.06x), with
one they ran 0.95x, and in runs of seven graphs the FP32 graph took 1.58 ms where, in the same call, it
took 0.86 ms beside one other graph."""


ANCHOR_RUNS = 3
"""The last runs of a call whose FP32 timings anchor its milliseconds."""


class Profiler:
    """Times plans (bit strings: ``"1"`` for an integer layer) of one deployment and caches the timings.

    A sample's timing is the ratio of its latency to the all-FP32 graph's, timed in turn with it
    (and with up to :data:`GRAPHS_PER_RUN` - 1 other mixes) in one run, so that the drift of a shared
    machine cancels out; :meth:`measured` turns the ratios back into milliseconds with the median FP32
    latency seen. Ratios are worthless without that FP32 latency: a cache holding samples but no
    :data:`REFERENCE` is rebuilt with a warning.

    ``timing`` applies per graph: a run of ``k`` graphs times for at least ``timing.min_seconds x k / 2``
    and at most ``timing.max_seconds x k / 2`` (the budget of a pair, one mix and FP32, scaled to the
    graphs it times).
    """

    def __init__(
        self,
        deployment: Deployment,
        cache: TimingCache,
        timing: TimingSettings,
        *,
        progress: bool,
        graphs_per_run: int = GRAPHS_PER_RUN,
    ) -> None:
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
        self.graphs_per_run = graphs_per_run
        self._reference: Callable[[], Any] | None = None  # built on the first timing: a cached profile builds none
        self._reference_ms: list[float] = []
        self._cached_reference = cache.get(REFERENCE)

    def time_together(self, runners: Sequence[Callable[[], Any]]) -> list[Timing]:
        """One interleaved run of ``runners`` and the FP32 graph: each runner's median as a ratio to FP32's."""
        if self._reference is None:
            self._reference = self.deployment.reference()
        fns = [*runners, self._reference]
        scale = len(fns) / 2  # the settings are per graph: a pair's budget, scaled to the graphs in the run
        settings = dataclasses.replace(
            self.timing, max_seconds=self.timing.max_seconds * scale, min_seconds=self.timing.min_seconds * scale
        )
        *timed, ref = time_interleaved(fns, settings)
        self._reference_ms.append(ref.median_ms)
        return [Timing(timing.median_ms / ref.median_ms, timing.spread, timing.repeats) for timing in timed]

    def measure(self, todo: Sequence[str], picked: Collection[str]) -> None:
        """Time every plan of ``todo`` (those in ``picked`` three times), saving as it goes so a profile can resume."""
        once = [bits for bits in todo if bits not in picked]
        for index, chunk in enumerate(self._runs(once, "timing the deployed network on this CPU (OQA)")):
            for bits, timing in zip(chunk, self.time_together([self.deployment.build(b) for b in chunk]), strict=True):
                self.cache.put(bits, timing)
            if index % 10 == 9:
                self._save()  # an interrupted profile resumes from here
        self._save()
        self._median_of_three([bits for bits in todo if bits in picked], "timing the picked plans (OQA)")

    def retime(self, plans: Sequence[str]) -> None:
        """Time each plan twice more and keep the median of its three timings."""
        self._median_of_three(plans, "re-timing the least certain graphs (OQA)", first=True)

    def measured(self, plans: Sequence[str], fp32_ms: float | None = None) -> dict[str, float]:
        """The cached latency (ms) of each plan: its ratio times ``fp32_ms`` (default: the cached FP32 reference)."""
        if fp32_ms is None:
            fp32_ms = self.cache.get(REFERENCE).median_ms  # type: ignore[union-attr]
        return {bits: self.cache.get(bits).median_ms * fp32_ms for bits in plans}  # type: ignore[union-attr]

    def _median_of_three(self, plans: Sequence[str], desc: str, *, first: bool = False) -> None:
        """Each plan timed in three runs (its graph built once) and the median kept; with ``first``, the
        cached timing counts as one of the three."""
        for chunk in self._runs(plans, desc):
            runners = [self.deployment.build(bits) for bits in chunk]
            runs = [self.time_together(runners) for _ in range(2 if first else 3)]
            for index, bits in enumerate(chunk):
                timings = [run[index] for run in runs] + ([self.cache.get(bits)] if first else [])
                self.cache.put(bits, sorted(timings, key=lambda timing: timing.median_ms)[1])  # type: ignore[arg-type]
            self._save()

    def _runs(self, plans: Sequence[str], desc: str) -> Iterator[list[str]]:
        """``plans`` in chunks of :attr:`graphs_per_run`, behind a progress bar counting graphs."""
        with progress_bar(None, desc=desc, total=len(plans), enabled=self.progress and bool(plans)) as bar:
            for start in range(0, len(plans), self.graphs_per_run):
                chunk = list(plans[start : start + self.graphs_per_run])
                yield chunk
                bar.update(len(chunk))

    def anchor(self, count: int) -> dict[str, Any]:
        """The FP32 graph's milliseconds now, to anchor the table: ratios keep for the lifetime of a cache,
        the machine's speed does not.

        The median FP32 timing of this call's last :data:`ANCHOR_RUNS` runs, which just timed it in turn
        with one other graph; a call that timed nothing (a cached profile) times it now, in turn with the
        all-INT8 graph. ``count`` is the number of layers. Returns the anchor's FP32 and INT8 milliseconds
        and INT8 ratio, what it was taken from, the cached FP32 reference, the FP32 milliseconds of this
        call's runs (first, last, median: the drift within a profile), and when it was taken (UTC).
        """
        runs = list(self._reference_ms)
        int8 = self.cache.get("1" * count)
        if runs and int8 is not None:
            fp32_ms = statistics.median(runs[-ANCHOR_RUNS:])
            source = f"the FP32 graph in this call's last {min(len(runs), ANCHOR_RUNS)} runs"
        else:
            (int8,) = self.time_together([self.deployment.build("1" * count)])
            fp32_ms = self._reference_ms[-1]
            source = "the FP32 graph timed in turn with the all-INT8 graph"
        profile = self.cache.get(REFERENCE)
        return {
            "fp32_ms": fp32_ms,
            "int8_ms": int8.median_ms * fp32_ms,
            "int8_ratio": int8.median_ms,
            "from": source,
            "profile_fp32_ms": None if profile is None else profile.median_ms,
            "this_call_runs_fp32_ms": _first_last(runs),
            "taken_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _save(self) -> None:
        """Persist the timings, with the FP32 median over every run so far (a cached reference counts as
        its number of runs at its median, so a few later runs refine it rather than replace it)."""
        if self._reference_ms:
            earlier = self._cached_reference
            runs = [earlier.median_ms] * earlier.repeats if earlier is not None else []
            runs += self._reference_ms
            self.cache.put(REFERENCE, Timing(statistics.median(runs), 0.0, len(runs)))
        self.cache.save()


def _first_last(runs: Sequence[float]) -> dict[str, float] | None:
    """The FP32 milliseconds of the first and last runs and their median (how the machine drifted), if any."""
    if not runs:
        return None
    return {"first": runs[0], "last": runs[-1], "median": statistics.median(runs), "runs": len(runs)}
