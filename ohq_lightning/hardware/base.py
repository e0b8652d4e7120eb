"""The hardware seam: what every target (measured, table-driven or analytical) provides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ohq_lightning.plan import CostTable, LayerInfo

__all__ = ["HardwareTarget"]


@runtime_checkable
class HardwareTarget(Protocol):
    """A deployment target: its name, its candidate options, and the cost of each layer at each.

    ``costs`` returns a :class:`~ohq_lightning.plan.CostTable` whose every entry says where its
    numbers came from (``"measured"`` on this device, ``"table"`` read from elsewhere, or
    ``"analytical"`` from a model), so a plan never passes an estimate off as a measurement.
    """

    name: str
    options: tuple[str, ...]

    def costs(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        model: Any = None,
        example_inputs: Any = None,
    ) -> CostTable:
        """Cost of every layer at every option (``options`` defaults to the target's own).

        ``model`` and ``example_inputs`` are the float model and its input, for targets that
        measure the network in context (others ignore them).
        """
        ...
