"""Energy per call of a layer's kernel, read from NVML's counter and cached like its timings.

The meter itself is :class:`~ohq_lightning.hardware.energy.NvmlEnergyMeter`: the board's energy
around the kernel run back to back, static power included. Where NVML or its counter is
unavailable energy is absent (``None``) with the reason in the table's ``meta["energy"]``, never
estimated; transitions carry none.
"""

from __future__ import annotations

from collections.abc import Callable

from ohq_lightning._util.timing import Timing
from ohq_lightning.hardware.cache import TimingCache
from ohq_lightning.hardware.cuda.timer import Kernel
from ohq_lightning.hardware.energy import NvmlEnergyMeter

__all__ = ["energy_note", "energy_of"]


def energy_of(
    key: str,
    build: Callable[[], Kernel | None],
    force: bool,
    meter: NvmlEnergyMeter,
    cache: TimingCache,
    synchronize: Callable[[], object],
) -> float | None:
    """Millijoules per call of the kernel cached under ``key`` (built only when the cache lacks it)."""
    cached = None if force else cache.get(key)
    if cached is not None:
        return cached.median_ms  # millijoules per call, in the energy cache
    made = build()
    if made is None:
        return None
    value = meter.measure_mj(made.run, synchronize=synchronize)
    if value is not None:
        cache.put(key, Timing(value, 0.0, 1))
    return value


def energy_note(wanted: bool, meter: NvmlEnergyMeter | None, seconds: float) -> str:
    """What the table's energy figures are, or why there are none (``meta["energy"]``)."""
    if not wanted:
        return "not measured (energy=False; energy=True reads NVML's energy counter where the GPU has one)"
    if meter is None or not meter.available:
        reason = "no energy meter" if meter is None else meter.reason
        return f"not measured: {reason}"
    return (
        f"measured: NVML total-energy counter around each layer's kernel run back to back for >= {seconds} s; "
        "board energy per call, static power included; transitions carry no energy"
    )
