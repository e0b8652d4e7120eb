"""Hardware targets: the seam between a search and the device it plans for."""

from __future__ import annotations

from typing import Any

from ohq_lightning.hardware.analytical import DEFAULT_OPTIONS, AnalyticalTarget
from ohq_lightning.hardware.base import HardwareTarget

__all__ = ["DEFAULT_OPTIONS", "AnalyticalTarget", "HardwareTarget", "create_target"]

_TARGETS = {"analytical": AnalyticalTarget}


def create_target(target: str | HardwareTarget, **kwargs: Any) -> HardwareTarget:
    """Return ``target`` itself if it is a :class:`HardwareTarget`, else build one by name.

    Example:
        >>> create_target("analytical", options=("w8a8", "w4a8")).options
        ('w8a8', 'w4a8')
    """
    if isinstance(target, str):
        factory = _TARGETS.get(target)
        if factory is None:
            raise ValueError(f"unknown hardware target {target!r}; known targets: {sorted(_TARGETS)}")
        if "options" in kwargs and kwargs["options"] is not None:
            kwargs["options"] = tuple(kwargs["options"])
        return factory(**{k: v for k, v in kwargs.items() if v is not None})
    if isinstance(target, HardwareTarget):
        if kwargs:
            raise ValueError(f"settings {sorted(kwargs)} only apply when the target is given by name")
        return target
    raise ValueError(f"target must be a name such as 'analytical' or a HardwareTarget, got {target!r}")
