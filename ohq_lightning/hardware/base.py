"""The hardware seam: what every target (measured, table-driven or analytical) provides, and what some add."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ohq_lightning.plan import CostTable, LayerInfo, Option

__all__ = ["HardwareTarget", "PlanMeasuringTarget", "PlanTimingTarget", "ShowsProgress", "int8_weight_bytes"]


@runtime_checkable
class HardwareTarget(Protocol):
    """A deployment target: its name, its candidate options, and the cost of each layer at each.

    ``costs`` returns a :class:`~ohq_lightning.plan.CostTable` whose every entry says where its
    numbers came from (``"measured"``: timed directly on this device; ``"fitted"``: fitted from
    end-to-end timings on this device; ``"table"``: read from elsewhere; ``"analytical"``: from a
    model), so a plan never passes an estimate or a fit off as a measurement.
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


def int8_weight_bytes(layers: Sequence[LayerInfo]) -> dict[str, float]:
    """Each layer's weight bytes at uniform 8 bits: what every target's cost table divides sizes by."""
    int8 = Option.parse("w8a8")
    return {layer.name: layer.weight_bytes(int8) for layer in layers}


@runtime_checkable
class PlanMeasuringTarget(HardwareTarget, Protocol):
    """A target that can time whole plans and fold those timings into its cost table.

    A search asks such a target to time the plan it picked and prices the next pick with the
    refitted table, so that the plan it returns rests on a measurement of that very plan rather
    than on a sum of per-layer estimates (see ``refine_rounds`` of :func:`ohq_lightning.search`).
    """

    def costs_with_plans(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        model: Any,
        example_inputs: Any,
        plans: Sequence[Mapping[str, str]],
    ) -> CostTable:
        """Like :meth:`~HardwareTarget.costs`, with ``plans`` (layer name -> option) timed as well and fitted in."""
        ...


@runtime_checkable
class PlanTimingTarget(HardwareTarget, Protocol):
    """A target that can time whole plans end to end, side by side in one interleaved run.

    A search that minimises latency times its pick beside the uniform builds that meet the same
    budgets and returns the fastest measured one: a fit can be wrong, a stopwatch on the device is not.
    """

    def time_plans(
        self,
        layers: Sequence[LayerInfo],
        plans: Sequence[Mapping[str, str]],
        *,
        model: Any,
        example_inputs: Any,
    ) -> list[float]:
        """The median end-to-end milliseconds of each plan (layer name -> option), timed interleaved."""
        ...


@runtime_checkable
class ShowsProgress(Protocol):
    """A target that shows progress bars while it works, and can be asked not to."""

    def with_progress(self, enabled: bool) -> Any:
        """This target with its progress bars on or off (a copy; the target itself is unchanged)."""
        ...
