"""Reading the tables for the program: which layers, options and metrics it needs, each value checked.

Every check here names what is wrong and where (layer, option, metric), so a bad table fails before
anything is solved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ohq_lightning.config import real_number
from ohq_lightning.plan import CostTable, SensitivityTable
from ohq_lightning.solver._budgets import BUDGETS

__all__ = [
    "allowed_options",
    "check_latency_terms",
    "check_layers",
    "cost_value",
    "needed_metrics",
    "resolve_options",
    "score_value",
    "tie_units",
]


def check_layers(sensitivity: SensitivityTable, costs: CostTable) -> list[str]:
    """The layers of ``costs``; each must have a sensitivity row and an 8-bit weight size."""
    layers = costs.layers
    if not layers:
        raise ValueError("the cost table has no layers")
    missing = [layer for layer in layers if layer not in sensitivity.scores]
    if missing:
        raise ValueError(f"sensitivity table has no row for layers {missing}")
    missing = [layer for layer in layers if layer not in costs.int8_weight_bytes]
    if missing:
        raise ValueError(f"cost table has no int8_weight_bytes for layers {missing}")
    return layers


def resolve_options(sensitivity: SensitivityTable, costs: CostTable, options: Sequence[str] | None) -> list[str]:
    """The candidate options: ``options`` or ``costs.options``, checked against both tables.

    Every layer of ``costs`` must already have a sensitivity row (see :func:`check_layers`); a score
    may be missing only where the target cannot run the layer at that option.
    """
    names = list(costs.options) if options is None else [options] if isinstance(options, str) else list(options)
    if not names:
        raise ValueError("options must name at least one option, e.g. ['w4a8', 'w8a8']")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"options lists {duplicates} more than once")
    unknown = [name for name in names if name not in costs.options]
    if unknown:
        raise ValueError(f"options {unknown} are not in the cost table (it has {list(costs.options)})")
    for layer in costs.layers:
        missing = [name for name in names if name not in costs.costs[layer]]
        if missing:
            raise ValueError(f"cost table has no entry for layer {layer!r} at options {missing}")
        row = costs.costs[layer]
        missing = [name for name in names if name not in sensitivity.scores[layer] and row[name].supported]
        if missing:
            raise ValueError(f"sensitivity table has no score for layer {layer!r} at options {missing}")
    return names


def needed_metrics(
    costs: CostTable,
    names: Sequence[str],
    budgets: Mapping[str, Any],
    cost_weight: float,
    cost_metric: str,
    minimize: str,
) -> set[str]:
    """The cost metrics the program reads; ValueError when the table lacks one at ``names``."""
    needed = {"weight_bytes", "bops"}
    wanted = {BUDGETS[name]: name for name in budgets if name in BUDGETS}
    if cost_weight > 0:
        wanted.setdefault(cost_metric, "cost_metric")
    if minimize == "latency":
        wanted.setdefault("latency_ms", "minimize='latency'")
    for metric, why in wanted.items():
        if not costs.has_metric(metric, names, skip_unsupported=True):
            raise ValueError(
                f"{why} needs {metric!r}, but the target {costs.target!r} gives no such metric "
                "(its cost table lacks it for some supported layer/option)"
            )
    return needed | set(wanted)


def check_latency_terms(costs: CostTable) -> tuple[dict[str, float], float | None]:
    """The cost table's ``transition_ms`` (finite, >= 0, known layers) and ``base_latency_ms`` (finite)."""
    transitions: dict[str, float] = {}
    for layer, value in dict(costs.transition_ms).items():
        if layer not in costs.costs:
            raise ValueError(f"cost table: transition_ms names {layer!r}, which is not one of its layers")
        number = real_number(value)
        if number is None or not math.isfinite(number) or number < 0:
            raise ValueError(f"cost table: transition_ms of {layer!r} is {value!r}, not a finite number >= 0")
        transitions[layer] = number
    base = costs.base_latency_ms
    if base is None:
        return transitions, None
    number = real_number(base)
    if number is None or not math.isfinite(number):
        raise ValueError(f"cost table: base_latency_ms is {base!r}, not a finite number")
    return transitions, number


def tie_units(layers: Sequence[str], tie_groups: Sequence[Sequence[str]]) -> list[list[int]]:
    """Partition layer indices into units that share one option (union of overlapping tie groups)."""
    if isinstance(tie_groups, str):
        raise ValueError("tie_groups must be a list of lists of layer names, e.g. [['fc1', 'fc2']]")
    index = {layer: i for i, layer in enumerate(layers)}
    parent = list(range(len(layers)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in tie_groups:
        if isinstance(group, str):
            raise ValueError(f"each tie group must be a list of layer names, got the string {group!r}")
        names = list(group)
        unknown = [name for name in names if name not in index]
        if unknown:
            raise ValueError(f"tie group {names} names unknown layers {unknown}")
        for name in names[1:]:
            parent[root(index[name])] = root(index[names[0]])
    units: dict[int, list[int]] = {}
    for i in range(len(layers)):
        units.setdefault(root(i), []).append(i)
    return list(units.values())


def allowed_options(
    costs: CostTable,
    layers: Sequence[str],
    names: Sequence[str],
    units: Sequence[Sequence[int]],
    supported: Sequence[Sequence[bool]],
) -> tuple[tuple[bool, ...], ...]:
    """Per unit, per candidate option: whether every member can run it; ValueError for a unit with none."""
    allowed = tuple(tuple(all(supported[i][o] for i in unit) for o in range(len(names))) for unit in units)
    for unit, row in zip(units, allowed, strict=True):
        if not any(row):
            raise _no_option_error(costs, layers, names, unit, supported)
    return allowed


def _no_option_error(
    costs: CostTable,
    layers: Sequence[str],
    names: Sequence[str],
    unit: Sequence[int],
    supported: Sequence[Sequence[bool]],
) -> ValueError:
    """The error for a layer or tie group that can run none of the candidates, saying what would help."""
    members = [layers[i] for i in unit]
    if len(unit) == 1:
        layer = members[0]
        reasons = "; ".join(f"{option}: {costs.unsupported_reason(layer, option)}" for option in names)
        runnable = [option for option in costs.options if costs.is_supported(layer, option)]
        hint = f"add an option it supports ({runnable}) to options" if runnable else "no option in the table runs it"
        return ValueError(
            f"layer {layer!r} has no supported option among the candidates {list(names)}: the target "
            f"{costs.target!r} cannot run it there ({reasons}); {hint}"
        )
    details = "; ".join(
        f"{layers[i]!r} supports {[option for option, ok in zip(names, supported[i], strict=True) if ok]}" for i in unit
    )
    return ValueError(
        f"tie group {members} has no option that every member supports among the candidates {list(names)} "
        f"on the target {costs.target!r} ({details}); add an option they all support, or untie them"
    )


def cost_value(costs: CostTable, layer: str, option: str, metric: str) -> float:
    """One finite cost value, or ValueError naming where it is missing."""
    value = getattr(costs.costs[layer][option], metric)
    number = real_number(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"cost table: {metric} of layer {layer!r} at {option!r} is {value!r}, not a finite number")
    return number


def score_value(sensitivity: SensitivityTable, layer: str, option: str) -> float:
    """One finite sensitivity score, or ValueError."""
    value = sensitivity.scores[layer][option]
    number = real_number(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"sensitivity of layer {layer!r} at {option!r} is {value!r}, not a finite number")
    return number
