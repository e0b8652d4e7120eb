"""Hardware targets: the seam between a search and the device it plans for.

The timing harness the measured targets use (``TimingSettings``, ``Timing``, ``set_threads``,
``time_interleaved``) is re-exported here: it is how a user sets how long a target times each graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ohq_lightning._util.timing import Timing, TimingSettings, set_threads, time_interleaved
from ohq_lightning.hardware.analytical import BIT_SERIAL_OPTIONS, DEFAULT_OPTIONS, AnalyticalTarget, BitSerialTarget
from ohq_lightning.hardware.base import HardwareTarget, PlanMeasuringTarget, PlanTimingTarget, ShowsProgress
from ohq_lightning.hardware.cpu import CPU_OPTIONS, CPUTarget
from ohq_lightning.hardware.cuda import CUDA_OPTIONS, CUDATarget
from ohq_lightning.hardware.energy import NvmlEnergyMeter
from ohq_lightning.hardware.presets import ANALYTICAL_PRESETS, analytical_preset
from ohq_lightning.hardware.table import TableTarget, export_cost_table, model_key

__all__ = [
    "ANALYTICAL_PRESETS",
    "BIT_SERIAL_OPTIONS",
    "CPU_OPTIONS",
    "CUDA_OPTIONS",
    "DEFAULT_OPTIONS",
    "AnalyticalTarget",
    "BitSerialTarget",
    "CPUTarget",
    "CUDATarget",
    "HardwareTarget",
    "NvmlEnergyMeter",
    "PlanMeasuringTarget",
    "PlanTimingTarget",
    "ShowsProgress",
    "TableTarget",
    "Timing",
    "TimingSettings",
    "analytical_preset",
    "create_target",
    "export_cost_table",
    "known_targets",
    "model_key",
    "set_threads",
    "time_interleaved",
]


_TARGETS: Mapping[str, Callable[..., HardwareTarget]] = MappingProxyType(
    {
        "analytical": AnalyticalTarget,
        "cpu": CPUTarget,
        "cuda": CUDATarget,
        "table": TableTarget,
        **ANALYTICAL_PRESETS,
    }
)
"""Target name -> factory (keyword settings -> target): the registry :func:`create_target` reads."""


def known_targets() -> list[str]:
    """Names :func:`create_target` accepts."""
    return sorted(_TARGETS)


def create_target(target: str | Mapping[str, Any] | HardwareTarget, **kwargs: Any) -> HardwareTarget:
    """Return ``target`` itself if it is a :class:`HardwareTarget`, else build one by name.

    ``target`` may also be a config mapping with a ``"name"`` key and the target's settings
    (``{"name": "cpu", "threads": 1}``), as the Hydra ``hardware`` group gives it.

    Example:
        >>> create_target("analytical", options=("w8a8", "w4a8")).options
        ('w8a8', 'w4a8')
        >>> create_target({"name": "analytical", "options": ["w8a8"]}).options
        ('w8a8',)
    """
    if isinstance(target, Mapping):
        settings = dict(target)
        name = settings.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"a target config must name its target under 'name' (e.g. 'cpu'), got {target!r}")
        try:
            return create_target(name, **settings, **kwargs)
        except TypeError as error:
            raise ValueError(f"bad settings for hardware target {name!r}: {error}") from error
    if isinstance(target, str):
        factory = _TARGETS.get(target)
        if factory is None:
            raise ValueError(f"unknown hardware target {target!r}; known targets: {known_targets()}")
        if kwargs.get("options") is not None:
            kwargs["options"] = tuple(kwargs["options"])
        return factory(**{k: v for k, v in kwargs.items() if v is not None})
    if isinstance(target, HardwareTarget):
        if kwargs:
            raise ValueError(f"settings {sorted(kwargs)} only apply when the target is given by name")
        return target
    raise ValueError(
        "target must be a target name such as 'analytical' or 'cpu', a config dict with a 'name' key, "
        f"or a HardwareTarget; got {target!r}"
    )
