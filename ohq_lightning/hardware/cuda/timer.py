"""Timing runnable operations on an asynchronous device: :class:`Kernel`, :data:`Timer`, :func:`synchronized_timer`.

A GPU returns from a launch before the work is done, so a timed sample runs a kernel back to back
enough times to last ``min_sample_ms`` and ends with ``synchronize()`` (``torch.cuda.synchronize``
on a GPU); the kernels of one layer are timed in turn (a, b, a, b, ...) by
:func:`~ohq_lightning._util.timing.time_interleaved`, so that drift hits them alike.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ohq_lightning._util.timing import Timing, TimingSettings, time_interleaved

__all__ = ["Kernel", "Timer", "noop", "synchronized_timer"]


def noop() -> None:
    """The ``synchronize`` of a synchronous device (the CPU): nothing to wait for."""
    return None


@dataclass(frozen=True)
class Kernel:
    """One runnable operation on a device: a layer at one kernel and implementation, or a transition.

    ``run()`` performs one call (asynchronously on a GPU); ``key`` names it in the timing cache;
    ``detail`` says how it was set up (padding, scales, backend).
    """

    name: str
    impl: str
    key: str
    run: Callable[[], Any]
    detail: Mapping[str, Any] = field(default_factory=dict)


#: Times kernels (in turn, on one device) and returns each one's time per call.
Timer = Callable[[Sequence[Kernel], TimingSettings], list[Timing]]


def _repeat(fn: Callable[[], object], count: int, synchronize: Callable[[], object]) -> None:
    for _ in range(count):
        fn()
    synchronize()


def _loop_count(fn: Callable[[], object], synchronize: Callable[[], object], min_sample_ms: float, limit: int) -> int:
    """How many back-to-back calls make one timed sample last about ``min_sample_ms``."""
    _repeat(fn, 1, synchronize)
    began = time.perf_counter()
    _repeat(fn, 3, synchronize)
    per_call_ms = max((time.perf_counter() - began) * 1e3 / 3, 1e-6)
    return int(min(max(math.ceil(min_sample_ms / per_call_ms), 1), limit))


def synchronized_timer(
    synchronize: Callable[[], object] = noop, *, min_sample_ms: float = 1.0, max_loop: int = 1000
) -> Timer:
    """A :data:`Timer` for asynchronous devices: each sample runs a kernel back to back, then ``synchronize()``.

    The number of calls per sample is set once per kernel so that a sample lasts about
    ``min_sample_ms`` (at most ``max_loop`` calls); kernels are timed in turn by
    :func:`~ohq_lightning._util.timing.time_interleaved`, and each returned
    :class:`~ohq_lightning._util.timing.Timing` is per call (``repeats`` counts samples). With
    ``torch.cuda.synchronize`` this times GPU work including eager launch overheads, as a model
    run eagerly pays them.
    """
    if min_sample_ms <= 0 or max_loop < 1:
        raise ValueError(f"min_sample_ms must be positive and max_loop at least 1, got {min_sample_ms}, {max_loop}")

    def timer(kernels: Sequence[Kernel], settings: TimingSettings) -> list[Timing]:
        loops = [_loop_count(kernel.run, synchronize, min_sample_ms, max_loop) for kernel in kernels]
        fns = [functools.partial(_repeat, k.run, n, synchronize) for k, n in zip(kernels, loops, strict=True)]
        timings = time_interleaved(fns, settings)
        return [Timing(t.median_ms / n, t.spread, t.repeats) for t, n in zip(timings, loops, strict=True)]

    return timer
