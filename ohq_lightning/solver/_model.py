"""The linear model: one option per tie unit, linear forms for every total a budget or objective reads.

A *unit* is a tie group, or one layer on its own; its members share one option, so the program has
one binary variable per unit and allowed option. A :class:`Linear` form is a table of coefficients
per unit and option, plus one coefficient per *switch* (a unit pair that pays a transition when
exactly one side runs an integer option) and a constant. Objectives are normalised before they reach
the solver so that their range is the same whatever the units of the scores (see ``docs/notes/solver.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from ohq_lightning.config import Budgets
from ohq_lightning.plan import CostTable, Option, SensitivityTable
from ohq_lightning.solver._budgets import BUDGETS, resolve_sensitivity_budget
from ohq_lightning.solver._tables import (
    allowed_options,
    check_latency_terms,
    check_layers,
    cost_value,
    needed_metrics,
    resolve_options,
    score_value,
    tie_units,
)

__all__ = [
    "FORM_OF",
    "Linear",
    "Model",
    "Program",
    "Table",
    "budget_rows",
    "build_model",
    "evaluate",
    "is_integer",
    "normalised",
    "paid",
    "solver_objective",
    "within",
]

FORM_OF: Mapping[str, str] = MappingProxyType({**BUDGETS, "sensitivity_budget": "sensitivity"})
"""Budget name -> the total (a key of :attr:`Model.forms`) it bounds."""

_OBJECTIVE_SCALE = 1e6  # the solver sees objectives scaled so that their whole range spans this
_TIE_BREAK = 1e-9  # weight of the weight-bytes tie-break, relative to the objective range
_BUDGET_RTOL = 1e-9  # a recomputed total may exceed its limit by this much (float rounding)

Table = list[list[float]]  # [unit or layer index][option index]


@dataclass(frozen=True)
class Linear:
    """``constant + sum(table[u][o] * x[u, o]) + sum(switch[k] * z[k])`` over the program's variables.

    ``z[k]`` is 1 when exactly one of the two units of the model's switch ``k`` runs an integer
    option; an empty ``switch`` means no such terms.
    """

    table: Table
    switch: tuple[float, ...] = ()
    constant: float = 0.0


@dataclass(frozen=True)
class Program:
    """Minimise ``objective`` subject to ``form <= limit`` for each row (one option per unit)."""

    objective: Linear
    rows: tuple[tuple[Linear, float], ...]


@dataclass(frozen=True)
class Model:
    """The validated problem: linear forms per tie unit (a tie group, or one layer on its own).

    ``forms`` holds the totals a budget may bound (``weight_bytes``, ``latency_ms``... and
    ``sensitivity``); ``objective`` the objective's levels, most important first. ``budgets`` are the
    budgets given (a sensitivity bound named by an option already turned into a number) and
    ``limits`` the bound each puts on its form. ``switches`` are the unit pairs with a transition
    cost between them, ``integer`` says which options are integer (empty when there are no
    switches), ``unit_switches`` the switches of each unit. ``allowed[u][o]`` is False where some
    member of unit ``u`` cannot run option ``o``: the program has no variable there, and the tables
    hold the unit's largest allowed value in its place (so row minima and ranges are those of the
    allowed options).
    """

    layers: list[str]
    options: list[str]
    units: list[list[int]]
    allowed: tuple[tuple[bool, ...], ...]
    objective: tuple[Linear, ...]
    forms: dict[str, Linear]
    budgets: dict[str, float]
    limits: dict[str, float]
    int8_bytes: float
    switches: tuple[tuple[int, int], ...]
    integer: tuple[bool, ...]
    unit_switches: tuple[tuple[int, ...], ...]
    transitions: dict[str, float]
    base_latency_ms: float | None


def build_model(
    sensitivity: SensitivityTable,
    costs: CostTable,
    options: Sequence[str] | None,
    tie_groups: Sequence[Sequence[str]],
    budgets: Budgets,
    cost_weight: float,
    cost_metric: str,
    minimize: str,
) -> Model:
    """Validate the tables and gather the per-unit linear forms of the program."""
    layers = check_layers(sensitivity, costs)
    names = resolve_options(sensitivity, costs, options)
    transitions, base = check_latency_terms(costs)
    units = tie_units(layers, tie_groups)
    supported = [[costs.is_supported(layer, option) for option in names] for layer in layers]
    allowed = allowed_options(costs, layers, names, units, supported)  # every layer can run some option
    resolved = resolve_sensitivity_budget(budgets, sensitivity, names, costs)
    given = {name: float(value) for name, value in resolved.given().items()}  # all numbers once resolved
    needed = needed_metrics(costs, names, given, cost_weight, cost_metric, minimize)
    int8_bytes = math.fsum(float(costs.int8_weight_bytes[layer]) for layer in layers)
    if not math.isfinite(int8_bytes) or int8_bytes <= 0:
        raise ValueError(f"the layers' int8_weight_bytes must add up to a positive number, got {int8_bytes!r}")
    integer = tuple(is_integer(name) for name in names) if any(transitions.values()) else ()
    switches, switch_ms = _switches(layers, units, transitions, integer)
    per_layer = {
        metric: [
            [cost_value(costs, layer, option, metric) if ok else 0.0 for option, ok in zip(names, srow, strict=True)]
            for layer, srow in zip(layers, supported, strict=True)
        ]
        for metric in needed
    }
    scores = [
        [score_value(sensitivity, layer, option) if ok else 0.0 for option, ok in zip(names, srow, strict=True)]
        for layer, srow in zip(layers, supported, strict=True)
    ]
    forms = {metric: Linear(_unit_table(table, units, allowed)) for metric, table in per_layer.items()}
    forms["sensitivity"] = Linear(_unit_table(scores, units, allowed))
    if "latency_ms" in forms:
        forms["latency_ms"] = Linear(forms["latency_ms"].table, switch_ms, base or 0.0)
    weighted = _weighted(scores, per_layer.get(cost_metric), cost_weight)
    return Model(
        layers=layers,
        options=names,
        units=units,
        allowed=allowed,
        objective=_objective(forms, minimize, weighted, cost_weight, cost_metric, units, allowed),
        forms=forms,
        budgets=given,
        limits={name: value * int8_bytes if name == "compression_ratio" else value for name, value in given.items()},
        int8_bytes=int8_bytes,
        switches=switches,
        integer=integer,
        unit_switches=tuple(tuple(k for k, pair in enumerate(switches) if u in pair) for u in range(len(units))),
        transitions=transitions,
        base_latency_ms=base,
    )


def _weighted(scores: Table, cost: Table | None, cost_weight: float) -> Table | None:
    """Per layer and option: score + ``cost_weight`` x cost (None without a weighted cost)."""
    if cost_weight <= 0 or cost is None:
        return None
    return [
        [s + cost_weight * c for s, c in zip(srow, crow, strict=True)] for srow, crow in zip(scores, cost, strict=True)
    ]


def _objective(
    forms: Mapping[str, Linear],
    minimize: str,
    weighted: Table | None,
    cost_weight: float,
    cost_metric: str,
    units: Sequence[Sequence[int]],
    allowed: Sequence[Sequence[bool]],
) -> tuple[Linear, ...]:
    """The objective's levels, most important first (latency then sensitivity, or one weighted sum)."""
    if minimize == "latency":
        return (forms["latency_ms"], forms["sensitivity"])
    if weighted is not None:
        switch = tuple(cost_weight * ms for ms in forms[cost_metric].switch)
        return (Linear(_unit_table(weighted, units, allowed), switch),)
    return (forms["sensitivity"],)


def is_integer(option: str) -> bool:
    """True when ``option`` runs the layer in integer arithmetic (not a float format)."""
    return not Option.parse(option).is_float


def _switches(
    layers: Sequence[str], units: Sequence[Sequence[int]], transitions: Mapping[str, float], integer: Sequence[bool]
) -> tuple[tuple[tuple[int, int], ...], tuple[float, ...]]:
    """Unit pairs that can pay a transition, and its cost (summed over their boundaries).

    A boundary inside a unit never pays (both sides share one option), and none pays when the
    options are all integer or all float.
    """
    if len(set(integer)) < 2:
        return (), ()
    unit_of = {i: u for u, unit in enumerate(units) for i in unit}
    merged: dict[tuple[int, int], list[float]] = {}
    for i, layer in enumerate(layers[:-1]):
        a, b = sorted((unit_of[i], unit_of[i + 1]))
        if transitions.get(layer, 0.0) > 0 and a != b:
            merged.setdefault((a, b), []).append(transitions[layer])
    return tuple(merged), tuple(math.fsum(values) for values in merged.values())


def _unit_table(per_layer: Table, units: Sequence[Sequence[int]], allowed: Sequence[Sequence[bool]]) -> Table:
    """Sum a per-layer table over the members of each unit.

    A unit's entries at options it may not take are set to its largest allowed entry: never chosen,
    and never a row's minimum nor outside its allowed range.
    """
    n_options = len(per_layer[0])
    table = [[math.fsum(per_layer[i][o] for i in unit) for o in range(n_options)] for unit in units]
    for row, ok in zip(table, allowed, strict=True):
        filler = max(value for value, fine in zip(row, ok, strict=True) if fine)
        row[:] = [value if fine else filler for value, fine in zip(row, ok, strict=True)]
    return table


def budget_rows(model: Model, budgets: Sequence[str] | Mapping[str, float]) -> tuple[tuple[Linear, float], ...]:
    """(form, limit) for each budget named, in the order given."""
    return tuple((model.forms[FORM_OF[name]], model.limits[name]) for name in budgets)


def normalised(form: Linear) -> Linear:
    """Drop the constant, shift each row to a minimum of 0 and scale so the whole range is ``_OBJECTIVE_SCALE``."""
    shifted = [[value - min(row) for value in row] for row in form.table]
    span = math.fsum([*(max(row) for row in shifted), *form.switch])
    if span <= 0:
        return Linear([[0.0] * len(row) for row in shifted], tuple(0.0 for _ in form.switch))
    # Divide first: a subnormal span (scores 1e-313 apart) would make the factor alone infinite.
    return Linear(
        [[value / span * _OBJECTIVE_SCALE for value in row] for row in shifted],
        tuple(c / span * _OBJECTIVE_SCALE for c in form.switch),
    )


def solver_objective(model: Model, level: Linear) -> Linear:
    """One objective level, normalised, plus a tie-break towards fewer weight bytes (about 1e-9 of its range)."""
    main = normalised(level)
    weight = model.forms["weight_bytes"].table
    step = _OBJECTIVE_SCALE * _TIE_BREAK / len(model.units)
    table: Table = []
    for main_row, bytes_row in zip(main.table, weight, strict=True):
        levels = sorted(set(bytes_row))
        rank = {value: i / max(1, len(levels) - 1) for i, value in enumerate(levels)}
        table.append([m + step * rank[b] for m, b in zip(main_row, bytes_row, strict=True)])
    return Linear(table, main.switch)


def paid(model: Model, choice: Sequence[int]) -> list[bool]:
    """Whether each switch pays its transition under ``choice`` (one option index per unit)."""
    return [model.integer[choice[a]] != model.integer[choice[b]] for a, b in model.switches]


def evaluate(model: Model, form: Linear, choice: Sequence[int]) -> float:
    """The value of ``form`` for a choice (one option index per unit)."""
    terms = [form.table[u][o] for u, o in enumerate(choice)]
    if form.switch:
        terms += [c for c, pays in zip(form.switch, paid(model, choice), strict=True) if pays]
    if form.constant:
        terms.append(form.constant)
    return math.fsum(terms)


def within(total: float, limit: float) -> bool:
    """``total <= limit`` up to float rounding."""
    return total <= limit + _BUDGET_RTOL * max(abs(limit), abs(total))
