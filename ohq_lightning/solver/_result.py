"""The plan of a choice: assignment, one :class:`~ohq_lightning.plan.PlanRow` per layer and predicted totals.

Every total is recomputed from the tables for the assignment (not read from the solver), so a
plan's ``predicted`` numbers are exact whatever scaling the solver saw.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ohq_lightning.plan import CostTable, PlanRow, QuantPlan, SensitivityTable
from ohq_lightning.solver._model import Model, is_integer

__all__ = ["make_plan", "solve_meta"]


def solve_meta(
    sensitivity: SensitivityTable,
    minimize: str,
    cost_weight: float,
    cost_metric: str,
    tie_groups: Sequence[Sequence[str]],
    *,
    solve_s: float,
    time_limit_s: float | None,
) -> dict[str, Any]:
    """What a plan's ``meta`` records of how it was chosen."""
    return {
        "solver": "pulp-highs",
        "solve_s": solve_s,
        "sensitivity_method": sensitivity.method,
        "minimize": minimize,
        "cost_weight": cost_weight,
        "cost_metric": cost_metric,
        "tie_groups": [list(group) for group in tie_groups],
        "time_limit_s": time_limit_s,
    }


def make_plan(
    model: Model,
    choice: Sequence[int],
    sensitivity: SensitivityTable,
    costs: CostTable,
    *,
    status: str,
    meta: dict[str, Any],
) -> QuantPlan:
    """Build the :class:`QuantPlan` of ``choice`` (one option index per unit), recomputing every total."""
    option_of = {model.layers[i]: model.options[choice[u]] for u, unit in enumerate(model.units) for i in unit}
    assignment = {layer: option_of[layer] for layer in model.layers}
    paid = _transitions_paid(model, assignment)
    rows = [
        _layer_row(layer, option, sensitivity, costs, paid[layer] if costs.transition_ms else None)
        for layer, option in assignment.items()
    ]
    return QuantPlan(
        assignment=assignment,
        predicted=_predicted(model, rows, costs, paid),
        budgets=dict(model.budgets),
        status=status,
        target=costs.target,
        options=list(model.options),
        layers=rows,
        meta=meta,
    )


def _predicted(model: Model, rows: Sequence[PlanRow], costs: CostTable, paid: Mapping[str, float]) -> dict[str, float]:
    """The plan's totals: size ratio, weight bytes, BOPs, sensitivity, and latency / energy where the table has them."""
    weight_bytes = _total(rows, "weight_bytes")
    predicted = {
        "size_ratio": weight_bytes / model.int8_bytes,
        "weight_bytes": weight_bytes,
        "bops": _total(rows, "bops"),
        "sensitivity": _total(rows, "sensitivity"),
    }
    base = [] if model.base_latency_ms is None else [model.base_latency_ms]
    for metric in ("latency_ms", "energy_mj"):
        if costs.has_metric(metric, model.options, skip_unsupported=True):
            extra = [*paid.values(), *base] if metric == "latency_ms" else []
            predicted[metric] = math.fsum([*(getattr(row, metric) for row in rows), *extra])
    if costs.transition_ms:
        predicted["transition_ms"] = math.fsum(paid.values())
    if model.base_latency_ms is not None:
        predicted["base_latency_ms"] = model.base_latency_ms
    return predicted


def _total(rows: Sequence[PlanRow], metric: str) -> float:
    """The exact sum of one metric over the rows (each set, as :func:`_layer_row` fills it)."""
    return math.fsum(getattr(row, metric) for row in rows)


def _transitions_paid(model: Model, assignment: Mapping[str, str]) -> dict[str, float]:
    """Layer -> the transition paid at the boundary after it (0.0 where none is paid)."""
    paid = dict.fromkeys(model.layers, 0.0)
    for layer, following in itertools.pairwise(model.layers):
        cost = model.transitions.get(layer, 0.0)
        if cost > 0 and is_integer(assignment[layer]) != is_integer(assignment[following]):
            paid[layer] = cost
    return paid


def _layer_row(
    layer: str, option: str, sensitivity: SensitivityTable, costs: CostTable, transition_after_ms: float | None
) -> PlanRow:
    """One report row: the layer's option, score and costs (and the transition paid after it, when priced)."""
    cost = costs.costs[layer][option]
    return PlanRow(
        name=layer,
        option=option,
        sensitivity=float(sensitivity.scores[layer][option]),
        weight_bytes=float(cost.weight_bytes),
        bops=float(cost.bops),
        latency_ms=None if cost.latency_ms is None else float(cost.latency_ms),
        energy_mj=None if cost.energy_mj is None else float(cost.energy_mj),
        source=cost.source,
        transition_after_ms=transition_after_ms,
    )
