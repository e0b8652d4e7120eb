"""Hardware targets: the seam between a search and the device it plans for."""

from __future__ import annotations

from typing import Any

from ohq_lightning.hardware.analytical import BIT_SERIAL_OPTIONS, DEFAULT_OPTIONS, AnalyticalTarget, BitSerialTarget
from ohq_lightning.hardware.base import HardwareTarget
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
    "TableTarget",
    "analytical_preset",
    "create_target",
    "export_cost_table",
    "known_targets",
    "model_key",
]


def _factories() -> dict[str, Any]:
    return {
        "analytical": AnalyticalTarget,
        "cpu": CPUTarget,
        "cuda": CUDATarget,
        "table": TableTarget,
        **ANALYTICAL_PRESETS,
    }


def known_targets() -> list[str]:
    """Names :func:`create_target` accepts."""
    return sorted(_factories())


def create_target(target: str | HardwareTarget, **kwargs: Any) -> HardwareTarget:
    """Return ``target`` itself if it is a :class:`HardwareTarget`, else build one by name.

    Example:
        >>> create_target("analytical", options=("w8a8", "w4a8")).options
        ('w8a8', 'w4a8')
    """
    if isinstance(target, str):
        factory = _factories().get(target)
        if factory is None:
            raise ValueError(f"unknown hardware target {target!r}; known targets: {known_targets()}")
        if kwargs.get("options") is not None:
            kwargs["options"] = tuple(kwargs["options"])
        return factory(**{k: v for k, v in kwargs.items() if v is not None})
    if isinstance(target, HardwareTarget):
        if kwargs:
            raise ValueError(f"settings {sorted(kwargs)} only apply when the target is given by name")
        return target
    raise ValueError(f"target must be a name such as 'analytical' or a HardwareTarget, got {target!r}")
