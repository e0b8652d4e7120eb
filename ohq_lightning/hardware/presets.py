"""Named analytical targets: ready-made parameter sets for devices that cannot be measured here.

Each preset is an estimate, not a measurement (every cost says ``source="analytical"`` and
every table's meta says ``"kind": "estimated"``). Build one with :func:`analytical_preset`;
any parameter of the underlying class can be overridden by keyword.

Presets:

* ``generic_cpu`` -- :class:`~ohq_lightning.hardware.analytical.AnalyticalTarget` with its
  defaults: a desktop CPU core with 8-bit integer kernels; sub-8-bit weights save memory
  traffic but not compute.
* ``bit_serial_accel`` -- :class:`~ohq_lightning.hardware.analytical.BitSerialTarget` with its
  defaults: a mid-size bit-serial FPGA overlay (4096 one-bit GMAC/s, 4 GB/s DDR), where
  compute time scales with weight bits x activation bits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ohq_lightning.hardware.analytical import AnalyticalTarget, BitSerialTarget
from ohq_lightning.hardware.base import HardwareTarget

__all__ = ["ANALYTICAL_PRESETS", "analytical_preset", "bit_serial_accel", "generic_cpu"]


def generic_cpu(**overrides: Any) -> AnalyticalTarget:
    """The ``generic_cpu`` preset: an :class:`AnalyticalTarget` named ``generic_cpu``.

    Example:
        >>> generic_cpu().name, generic_cpu(bandwidth_gbs=40.0).bandwidth_gbs
        ('generic_cpu', 40.0)
    """
    return _build(AnalyticalTarget(name="generic_cpu"), overrides)


def bit_serial_accel(**overrides: Any) -> BitSerialTarget:
    """The ``bit_serial_accel`` preset: a :class:`BitSerialTarget` with its default parameters.

    Example:
        >>> bit_serial_accel(options=("w8a8", "w2a2")).options
        ('w8a8', 'w2a2')
    """
    return _build(BitSerialTarget(name="bit_serial_accel"), overrides)


ANALYTICAL_PRESETS: Mapping[str, Callable[..., HardwareTarget]] = MappingProxyType(
    {"generic_cpu": generic_cpu, "bit_serial_accel": bit_serial_accel}
)
"""Preset name -> factory (keyword overrides -> target); read-only."""


def analytical_preset(name: str, **overrides: Any) -> HardwareTarget:
    """Build the analytical preset called ``name``, with any parameter overridden by keyword.

    Raises:
        ValueError: the name is not a preset, or an override is not a parameter of the preset.

    Example:
        >>> target = analytical_preset("bit_serial_accel", bandwidth_gbs=8.0)
        >>> target.name, target.bandwidth_gbs
        ('bit_serial_accel', 8.0)
    """
    factory = ANALYTICAL_PRESETS.get(name)
    if factory is None:
        raise ValueError(f"unknown analytical preset {name!r}; known presets: {sorted(ANALYTICAL_PRESETS)}")
    return factory(**overrides)


def _build(base: Any, overrides: dict[str, Any]) -> Any:
    fields = [field.name for field in dataclasses.fields(base)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"{base.name}: unknown setting(s) {unknown}; settings: {fields}")
    if overrides.get("options") is not None:
        overrides = {**overrides, "options": tuple(overrides["options"])}
    return dataclasses.replace(base, **overrides)
