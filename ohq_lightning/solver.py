"""Choose one option per layer with an integer linear program (PuLP, solved by HiGHS).

The program has one binary variable ``x[layer, option]`` per layer and candidate option, exactly
one option per layer, and by default (``minimize="sensitivity"``) minimises

    sum(sensitivity[l][o] * x[l, o]) + cost_weight * cost(cost_metric)

under any of five budgets (each optional, all combinable):

* ``compression_ratio`` -- plan weight bytes <= ratio * weight bytes at uniform 8 bits
  (1.0 is INT8 size, see :mod:`ohq_lightning.plan`);
* ``latency_budget`` (ms) -- the plan's predicted latency (below) <= the budget;
* ``energy_budget`` (mJ), ``bops_budget`` (bit operations) -- the sum of that metric over the
  layers <= the budget;
* ``sensitivity_budget`` -- the total sensitivity <= the budget.

With ``minimize="latency"`` the program minimises the predicted latency instead (ties go to the
lower total sensitivity) under the same budgets, typically a ``sensitivity_budget``.

The predicted latency of a plan is ``base_latency_ms + sum(layer latency_ms) + sum(transitions
paid)`` (see :class:`~ohq_lightning.plan.CostTable`): the transition after layer ``l`` is paid
when exactly one of ``l`` and the next layer runs an integer option. Each boundary with a
transition cost gets a variable ``z >= |q_l - q_next|``, where ``q_l`` is 1 when layer ``l``
runs an integer option; ``z`` enters every latency term of the program.

Layers named together in a tie group take the same option (they share their variables).

Entries the target cannot run (:attr:`LayerCost.supported <ohq_lightning.plan.LayerCost.supported>`
False, ``source="unsupported"``, e.g. int8 for a depthwise convolution on CUDA) are options that layer
may not take: the program has no variable for them, they need no latency or energy, and a tie group
may only take an option every member supports. A layer (or tie group) left with no supported
candidate is a ``ValueError`` naming it.

When objectives tie (a randomly initialised layer scores exactly zero at every option) the
solver prefers the option with fewer weight bytes: a tie-break term of about 1e-9 of the objective
scale goes into the program, and after solving, any layer (or tie group) that can move to an option
with the same objective value and fewer weight bytes without breaking a budget is moved.

Example:
    >>> plan = solve(sensitivity_table, cost_table, compression_ratio=0.6)  # doctest: +SKIP
    >>> plan.predicted["size_ratio"] <= 0.6  # doctest: +SKIP
    True
    >>> fast = solve(sensitivity_table, cost_table, minimize="latency", sensitivity_budget=0.05)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pulp

from .plan import CostTable, Option, QuantPlan, SensitivityTable

__all__ = [
    "BUDGETS",
    "COST_METRICS",
    "MINIMIZE",
    "SWEEP_BUDGETS",
    "InfeasibleBudgetError",
    "best_of",
    "check_budget_values",
    "check_sensitivity_budget",
    "pareto_sweep",
    "solve",
]

BUDGETS: Mapping[str, str] = MappingProxyType(
    {
        "compression_ratio": "weight_bytes",
        "latency_budget": "latency_ms",
        "energy_budget": "energy_mj",
        "bops_budget": "bops",
    }
)
"""Budget keyword -> the :class:`~ohq_lightning.plan.LayerCost` metric it bounds (each must be > 0)."""

SWEEP_BUDGETS: tuple[str, ...] = (*BUDGETS, "sensitivity_budget")
"""Budgets :func:`pareto_sweep` may sweep: :data:`BUDGETS` and ``sensitivity_budget`` (total sensitivity, >= 0)."""

COST_METRICS: tuple[str, ...] = ("latency_ms", "energy_mj", "bops", "weight_bytes")
"""Metrics that ``cost_metric`` may name."""

MINIMIZE: tuple[str, ...] = ("sensitivity", "latency")
"""What :func:`solve` may minimise."""

_FORM_OF = MappingProxyType({**BUDGETS, "sensitivity_budget": "sensitivity"})  # budget -> the total it bounds
_OBJECTIVE_SCALE = 1e6  # the solver sees objectives scaled so that their whole range spans this
_TIE_BREAK = 1e-9  # weight of the weight-bytes tie-break, relative to the objective range
_LEXICOGRAPHIC_SLACK = 1e-7  # a secondary objective may cost the first this much, relative (solver tolerance)
_ROW_SCALE = 1e6  # budget rows are written as sum(metric / limit * _ROW_SCALE) <= _ROW_SCALE
_ROW_RANGE = 1e3  # ... unless the limit is this many times smaller than the largest term (see _scaled_row)
_BUDGET_RTOL = 1e-9  # a recomputed total may exceed its limit by this much (float rounding)
_TIE_RTOL = 1e-12  # objective coefficients this close count as equal in the post-solve pass

Table = list[list[float]]  # [unit or layer index][option index]


class InfeasibleBudgetError(ValueError):
    """Raised when no assignment meets the budgets.

    ``smallest_feasible`` maps each given budget name to the smallest value of that budget that
    is feasible, with the other given budgets held as given where that is feasible, else alone
    (for ``latency_budget`` it includes transitions and base latency; for ``sensitivity_budget``
    it is the least total sensitivity); ``budgets`` holds the budgets as given. The message names
    both, e.g.
    ``no plan meets the budgets {compression_ratio: 0.1}: the smallest feasible compression_ratio is 0.25``.
    Values in the message are rounded up (6 significant digits), so they stay feasible.
    """

    def __init__(
        self,
        message: str,
        smallest_feasible: Mapping[str, float] | None = None,
        budgets: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(message)
        self.smallest_feasible: dict[str, float] = dict(smallest_feasible or {})
        self.budgets: dict[str, float] = dict(budgets or {})


@dataclass(frozen=True)
class _Linear:
    """``constant + sum(table[u][o] * x[u, o]) + sum(switch[k] * z[k])`` over the program's variables.

    ``z[k]`` is 1 when exactly one of the two units of the model's switch ``k`` runs an integer
    option; an empty ``switch`` means no such terms.
    """

    table: Table
    switch: tuple[float, ...] = ()
    constant: float = 0.0


@dataclass(frozen=True)
class _Program:
    """Minimise ``objective`` subject to ``form <= limit`` for each row (one option per unit)."""

    objective: _Linear
    rows: tuple[tuple[_Linear, float], ...]


@dataclass(frozen=True)
class _Model:
    """The validated problem: linear forms per tie unit (a tie group, or one layer on its own).

    ``forms`` holds the totals a budget may bound (``weight_bytes``, ``latency_ms``... and
    ``sensitivity``); ``objective`` the objective's levels, most important first. ``switches``
    are the unit pairs with a transition cost between them, ``integer`` says which options are
    integer (empty when there are no switches), ``unit_switches`` the switches of each unit.
    ``allowed[u][o]`` is False where some member of unit ``u`` cannot run option ``o``: the program
    has no variable there, and the tables hold the unit's largest allowed value in its place (so
    row minima and ranges are those of the allowed options).
    """

    layers: list[str]
    options: list[str]
    units: list[list[int]]
    allowed: tuple[tuple[bool, ...], ...]
    objective: tuple[_Linear, ...]
    forms: dict[str, _Linear]
    limits: dict[str, float]
    int8_bytes: float
    switches: tuple[tuple[int, int], ...]
    integer: tuple[bool, ...]
    unit_switches: tuple[tuple[int, ...], ...]
    transitions: dict[str, float]
    base_latency_ms: float | None


# ----------------------------------------------------------------------------- public API


def solve(
    sensitivity: SensitivityTable,
    costs: CostTable,
    *,
    compression_ratio: float | None = None,
    latency_budget: float | None = None,
    energy_budget: float | None = None,
    bops_budget: float | None = None,
    sensitivity_budget: float | None = None,
    tie_groups: Sequence[Sequence[str]] = (),
    cost_weight: float = 0.0,
    cost_metric: str = "latency_ms",
    minimize: str = "sensitivity",
    options: Sequence[str] | None = None,
    time_limit_s: float | None = 60.0,
) -> QuantPlan:
    """Pick one option per layer of ``costs`` minimising sensitivity (or latency) under budgets.

    Latency everywhere (budget, objective, ``predicted``) is the predicted end-to-end latency:
    ``costs.base_latency_ms`` + the layers' ``latency_ms`` + the ``costs.transition_ms`` paid
    (see :class:`~ohq_lightning.plan.CostTable`).

    Args:
        sensitivity: layer -> option -> score (higher is worse); must cover every layer of ``costs``
            (its other layers are ignored).
        costs: layer -> option -> :class:`~ohq_lightning.plan.LayerCost` for the target.
        compression_ratio: plan weight bytes / weight bytes at uniform 8 bits must be <= this (> 0).
        latency_budget: predicted latency must be <= this (needs a target that gives latency).
        energy_budget: total ``energy_mj`` must be <= this (needs a target that gives energy).
        bops_budget: total ``bops`` must be <= this.
        sensitivity_budget: total sensitivity must be <= this (>= 0; 0 allows only plans that
            score no worse than zero).
        tie_groups: groups of layer names that must take the same option.
        cost_weight: weight (>= 0) of the ``cost_metric`` total added to the objective
            (``minimize="sensitivity"`` only).
        cost_metric: one of :data:`COST_METRICS`.
        minimize: ``"sensitivity"`` (default) or ``"latency"``: minimise the predicted latency,
            ties going to the lower total sensitivity; needs latency and at least one budget.
        options: the candidate options (default: ``costs.options``); a subset of ``costs.options``
            and of every layer's sensitivity row (a score may be missing where the target cannot run
            the layer at that option). Entries the target marks unsupported are never chosen.
        time_limit_s: solver time limit per solve (``None``: no limit). When HiGHS stops on time with a
            solution that it has not proven optimal, that plan is returned with status ``"Feasible"``
            and a :class:`RuntimeWarning`.

    Returns:
        A :class:`~ohq_lightning.plan.QuantPlan`; ``predicted`` totals are recomputed from the
        assignment, with ``transition_ms`` / ``base_latency_ms`` (and per layer row
        ``transition_after_ms``) when the cost table has such terms.

    Raises:
        ValueError: bad input (unknown option or layer, missing metric, non-positive budget, a layer or
            tie group with no supported option among the candidates...).
        InfeasibleBudgetError: no assignment meets the budgets.
        RuntimeError: the solver failed otherwise (e.g. stopped on time without a solution).
    """
    budgets = _checked_budgets(compression_ratio, latency_budget, energy_budget, bops_budget, sensitivity_budget)
    cost_weight = _check_objective_args(cost_weight, cost_metric, minimize, budgets, time_limit_s)
    model = _build_model(sensitivity, costs, options, tie_groups, budgets, cost_weight, cost_metric, minimize)
    program = _Program(_solver_objective(model, model.objective[0]), _budget_rows(model, budgets))

    start = time.perf_counter()
    status, choice = _solve_ilp(model, program, time_limit_s)
    for level in model.objective[1:] if choice is not None else ():
        # Lexicographic: hold the first objective at its optimum, then minimise the next one.
        best = _evaluate(model, model.objective[0], choice)
        held = (*program.rows, (model.objective[0], best + _LEXICOGRAPHIC_SLACK * max(abs(best), 1e-12)))
        program = _Program(_solver_objective(model, level), held)
        next_status, next_choice = _solve_ilp(model, program, time_limit_s)
        if next_choice is not None:
            status, choice = next_status, next_choice
    solve_s = time.perf_counter() - start
    if status == "Infeasible":
        raise _infeasible_error(model, budgets, time_limit_s)
    if choice is None or status not in ("Optimal", "Feasible"):
        raise RuntimeError(
            f"the ILP solver (HiGHS) returned status {status!r}"
            + (f"; try a longer time_limit_s than {time_limit_s}" if time_limit_s is not None else "")
        )
    if status == "Feasible":
        warnings.warn(
            f"HiGHS stopped at time_limit_s={time_limit_s} before proving the plan optimal; "
            "returning the best plan found (status 'Feasible')",
            RuntimeWarning,
            stacklevel=2,
        )
    choice = _prefer_fewer_bytes(model, choice, program.rows)
    _check_choice_meets_budgets(model, choice, budgets)
    meta = _solve_meta(sensitivity, minimize, cost_weight, cost_metric, tie_groups, solve_s=solve_s)
    return _make_plan(
        model, choice, sensitivity, costs, budgets, status=status, meta={**meta, "time_limit_s": time_limit_s}
    )


def best_of(
    assignments: Sequence[Mapping[str, str]],
    sensitivity: SensitivityTable,
    costs: CostTable,
    *,
    compression_ratio: float | None = None,
    latency_budget: float | None = None,
    energy_budget: float | None = None,
    bops_budget: float | None = None,
    sensitivity_budget: float | None = None,
    tie_groups: Sequence[Sequence[str]] = (),
    cost_weight: float = 0.0,
    cost_metric: str = "latency_ms",
    minimize: str = "sensitivity",
    options: Sequence[str] | None = None,
) -> QuantPlan | None:
    """The best of ``assignments`` (layer -> option) by :func:`solve`'s own objective, without solving.

    Takes :func:`solve`'s arguments (no time limit: nothing is solved) and prices every assignment
    with ``costs``; those that break a budget, a tie group or the target's support are left out.
    Returns the plan of the best one, as :func:`solve` would report it, or None when none is left.
    Used to choose among plans known by other means, e.g. the plans a measuring target timed.
    """
    budgets = _checked_budgets(compression_ratio, latency_budget, energy_budget, bops_budget, sensitivity_budget)
    cost_weight = _check_objective_args(cost_weight, cost_metric, minimize, budgets, None)
    model = _build_model(sensitivity, costs, options, tie_groups, budgets, cost_weight, cost_metric, minimize)
    ranked = []
    for assignment in assignments:
        choice = _choice_of(model, assignment)
        if choice is None or _budget_overruns(model, choice, budgets):
            continue
        ranked.append((tuple(_evaluate(model, level, choice) for level in model.objective), choice))
    if not ranked:
        return None
    best = min(ranked, key=lambda entry: entry[0])[1]
    meta = _solve_meta(sensitivity, minimize, cost_weight, cost_metric, tie_groups, solve_s=0.0)
    return _make_plan(model, best, sensitivity, costs, budgets, status="Optimal", meta={**meta, "time_limit_s": None})


def _checked_budgets(
    compression_ratio: float | None,
    latency_budget: float | None,
    energy_budget: float | None,
    bops_budget: float | None,
    sensitivity_budget: float | None,
) -> dict[str, float]:
    """The budgets given, validated (see :func:`check_budget_values`)."""
    budgets = check_budget_values(
        {
            "compression_ratio": compression_ratio,
            "latency_budget": latency_budget,
            "energy_budget": energy_budget,
            "bops_budget": bops_budget,
        }
    )
    if sensitivity_budget is not None:
        budgets["sensitivity_budget"] = check_sensitivity_budget(sensitivity_budget)
    return budgets


def _solve_meta(
    sensitivity: SensitivityTable,
    minimize: str,
    cost_weight: float,
    cost_metric: str,
    tie_groups: Sequence[Sequence[str]],
    *,
    solve_s: float,
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
    }


def _choice_of(model: _Model, assignment: Mapping[str, str]) -> list[int] | None:
    """``assignment`` as one option index per unit; None when a unit's members disagree or cannot run it."""
    index = {name: i for i, name in enumerate(model.options)}
    choice = []
    for u, unit in enumerate(model.units):
        picked = {assignment.get(model.layers[i]) for i in unit}
        if len(picked) != 1 or (option := index.get(picked.pop())) is None or not model.allowed[u][option]:
            return None
        choice.append(option)
    return choice


def pareto_sweep(
    sensitivity: SensitivityTable,
    costs: CostTable,
    *,
    budget: str,
    values: Sequence[float],
    **solve_kwargs: Any,
) -> list[QuantPlan]:
    """Solve once per value of one budget and return the plans in the order of ``values``.

    ``budget`` is one of :data:`SWEEP_BUDGETS` (``"compression_ratio"``, ``"latency_budget"``,
    ``"energy_budget"``, ``"bops_budget"``, ``"sensitivity_budget"``; sweep the last with
    ``minimize="latency"`` for a latency / sensitivity front); ``solve_kwargs`` go to :func:`solve`
    unchanged (they may hold the other budgets, not this one). Values for which no plan exists
    (:class:`InfeasibleBudgetError`) are skipped, so the result may be shorter than ``values``;
    each plan records its point in ``plan.meta["sweep"] = {"budget", "value", "index"}`` (``index``
    into ``values``) and, as always, in ``plan.budgets``. Bad input still raises ``ValueError``.
    Like :func:`solve`, no plan picks an entry the target marks unsupported.
    """
    if budget not in SWEEP_BUDGETS:
        raise ValueError(f"unknown budget {budget!r}: use one of {sorted(SWEEP_BUDGETS)}")
    if budget in solve_kwargs:
        raise ValueError(f"{budget!r} is swept; do not pass it in solve_kwargs as well")
    plans: list[QuantPlan] = []
    for index, value in enumerate(values):
        try:
            plan = solve(sensitivity, costs, **{budget: value}, **solve_kwargs)
        except InfeasibleBudgetError:
            continue
        plan.meta["sweep"] = {"budget": budget, "value": float(value), "index": index}
        plans.append(plan)
    return plans


# ----------------------------------------------------------------------------- validation


def check_budget_values(given: Mapping[str, float | None]) -> dict[str, float]:
    """Check that every budget set in ``given`` (by its :data:`BUDGETS` name) is a finite number > 0.

    Returns only the budgets that are set, as floats; ``None`` means "no such budget".
    (``sensitivity_budget``, which may be 0, is checked by :func:`solve` itself.)
    """
    budgets: dict[str, float] = {}
    for name, value in given.items():
        if name not in BUDGETS:
            raise ValueError(f"unknown budget {name!r}: use one of {sorted(BUDGETS)}")
        if value is None:
            continue
        number = _real(value)
        if number is None or not math.isfinite(number) or number <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        budgets[name] = number
    return budgets


def check_sensitivity_budget(value: Any) -> float:
    """``sensitivity_budget`` as a float: a finite number >= 0."""
    number = _real(value)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"sensitivity_budget must be a finite number >= 0, got {value!r}")
    return number


def _check_objective_args(
    cost_weight: float,
    cost_metric: str,
    minimize: str,
    budgets: Mapping[str, float],
    time_limit_s: float | None,
) -> float:
    """Validate the objective's arguments and ``time_limit_s``; return ``cost_weight`` as float."""
    weight = _real(cost_weight)
    if weight is None or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"cost_weight must be a finite number >= 0, got {cost_weight!r}")
    if cost_metric not in COST_METRICS:
        raise ValueError(f"unknown cost_metric {cost_metric!r}: use one of {list(COST_METRICS)}")
    if minimize not in MINIMIZE:
        raise ValueError(f"minimize must be one of {list(MINIMIZE)}, got {minimize!r}")
    if minimize == "latency" and weight > 0:
        raise ValueError("cost_weight weighs a cost against sensitivity; with minimize='latency' leave it at 0")
    if minimize == "latency" and not budgets:
        raise ValueError(
            "minimize='latency' needs a budget to trade against, e.g. sensitivity_budget (the total sensitivity "
            "allowed); without one the fastest plan ignores accuracy"
        )
    if time_limit_s is not None:
        limit = _real(time_limit_s)
        if limit is None or not math.isfinite(limit) or limit <= 0:
            raise ValueError(f"time_limit_s must be a finite number > 0 or None, got {time_limit_s!r}")
    return weight


def _needed_metrics(
    costs: CostTable,
    names: Sequence[str],
    budgets: Mapping[str, float],
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


def _resolve_options(sensitivity: SensitivityTable, costs: CostTable, options: Sequence[str] | None) -> list[str]:
    """The candidate options: ``options`` or ``costs.options``, checked against both tables.

    Every layer of ``costs`` must already have a sensitivity row (see :func:`_check_layers`); a score
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


def _check_layers(sensitivity: SensitivityTable, costs: CostTable) -> list[str]:
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


def _check_latency_terms(costs: CostTable) -> tuple[dict[str, float], float | None]:
    """The cost table's ``transition_ms`` (finite, >= 0, known layers) and ``base_latency_ms`` (finite)."""
    transitions: dict[str, float] = {}
    for layer, value in dict(costs.transition_ms).items():
        if layer not in costs.costs:
            raise ValueError(f"cost table: transition_ms names {layer!r}, which is not one of its layers")
        number = _real(value)
        if number is None or not math.isfinite(number) or number < 0:
            raise ValueError(f"cost table: transition_ms of {layer!r} is {value!r}, not a finite number >= 0")
        transitions[layer] = number
    base = costs.base_latency_ms
    if base is None:
        return transitions, None
    number = _real(base)
    if number is None or not math.isfinite(number):
        raise ValueError(f"cost table: base_latency_ms is {base!r}, not a finite number")
    return transitions, number


def _tie_units(layers: Sequence[str], tie_groups: Sequence[Sequence[str]]) -> list[list[int]]:
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


def _value(costs: CostTable, layer: str, option: str, metric: str) -> float:
    """One finite cost value, or ValueError naming where it is missing."""
    value = getattr(costs.costs[layer][option], metric)
    number = _real(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"cost table: {metric} of layer {layer!r} at {option!r} is {value!r}, not a finite number")
    return number


def _score(sensitivity: SensitivityTable, layer: str, option: str) -> float:
    """One finite sensitivity score, or ValueError."""
    value = sensitivity.scores[layer][option]
    number = _real(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"sensitivity of layer {layer!r} at {option!r} is {value!r}, not a finite number")
    return number


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (numpy scalars too, bools not), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


# ----------------------------------------------------------------------------- model


def _build_model(
    sensitivity: SensitivityTable,
    costs: CostTable,
    options: Sequence[str] | None,
    tie_groups: Sequence[Sequence[str]],
    budgets: Mapping[str, float],
    cost_weight: float,
    cost_metric: str,
    minimize: str,
) -> _Model:
    """Validate the tables and gather the per-unit linear forms of the program."""
    layers = _check_layers(sensitivity, costs)
    names = _resolve_options(sensitivity, costs, options)
    needed = _needed_metrics(costs, names, budgets, cost_weight, cost_metric, minimize)
    transitions, base = _check_latency_terms(costs)
    units = _tie_units(layers, tie_groups)
    supported = [[costs.is_supported(layer, option) for option in names] for layer in layers]
    allowed = _allowed_options(costs, layers, names, units, supported)
    int8_bytes = math.fsum(float(costs.int8_weight_bytes[layer]) for layer in layers)
    if not math.isfinite(int8_bytes) or int8_bytes <= 0:
        raise ValueError(f"the layers' int8_weight_bytes must add up to a positive number, got {int8_bytes!r}")
    integer = tuple(_is_integer(name) for name in names) if any(transitions.values()) else ()
    switches, switch_ms = _switches(layers, units, transitions, integer)
    per_layer = {
        metric: [
            [_value(costs, layer, option, metric) if ok else 0.0 for option, ok in zip(names, srow, strict=True)]
            for layer, srow in zip(layers, supported, strict=True)
        ]
        for metric in needed
    }
    scores = [
        [_score(sensitivity, layer, option) if ok else 0.0 for option, ok in zip(names, srow, strict=True)]
        for layer, srow in zip(layers, supported, strict=True)
    ]
    forms = {metric: _Linear(_unit_table(table, units, allowed)) for metric, table in per_layer.items()}
    forms["sensitivity"] = _Linear(_unit_table(scores, units, allowed))
    if "latency_ms" in forms:
        forms["latency_ms"] = _Linear(forms["latency_ms"].table, switch_ms, base or 0.0)
    if minimize == "latency":
        objective = (forms["latency_ms"], forms["sensitivity"])
    elif cost_weight > 0:
        cost = per_layer[cost_metric]
        weighted = [
            [s + cost_weight * c for s, c in zip(srow, crow, strict=True)]
            for srow, crow in zip(scores, cost, strict=True)
        ]
        switch = tuple(cost_weight * ms for ms in forms[cost_metric].switch)
        objective = (_Linear(_unit_table(weighted, units, allowed), switch),)
    else:
        objective = (forms["sensitivity"],)
    limits = {name: value * int8_bytes if name == "compression_ratio" else value for name, value in budgets.items()}
    return _Model(
        layers=layers,
        options=names,
        units=units,
        allowed=allowed,
        objective=objective,
        forms=forms,
        limits=limits,
        int8_bytes=int8_bytes,
        switches=switches,
        integer=integer,
        unit_switches=tuple(tuple(k for k, pair in enumerate(switches) if u in pair) for u in range(len(units))),
        transitions=transitions,
        base_latency_ms=base,
    )


def _is_integer(option: str) -> bool:
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


def _allowed_options(
    costs: CostTable,
    layers: Sequence[str],
    names: Sequence[str],
    units: Sequence[Sequence[int]],
    supported: Sequence[Sequence[bool]],
) -> tuple[tuple[bool, ...], ...]:
    """Per unit, per candidate option: whether every member can run it; ValueError for a unit with none."""
    allowed = tuple(tuple(all(supported[i][o] for i in unit) for o in range(len(names))) for unit in units)
    for unit, row in zip(units, allowed, strict=True):
        if any(row):
            continue
        members = [layers[i] for i in unit]
        if len(unit) == 1:
            layer = members[0]
            reasons = "; ".join(f"{option}: {costs.unsupported_reason(layer, option)}" for option in names)
            runnable = [option for option in costs.options if costs.is_supported(layer, option)]
            hint = (
                f"add an option it supports ({runnable}) to options" if runnable else "no option in the table runs it"
            )
            raise ValueError(
                f"layer {layer!r} has no supported option among the candidates {list(names)}: the target "
                f"{costs.target!r} cannot run it there ({reasons}); {hint}"
            )
        details = "; ".join(
            f"{layers[i]!r} supports {[option for option, ok in zip(names, supported[i], strict=True) if ok]}"
            for i in unit
        )
        raise ValueError(
            f"tie group {members} has no option that every member supports among the candidates {list(names)} "
            f"on the target {costs.target!r} ({details}); add an option they all support, or untie them"
        )
    return allowed


def _unit_table(
    per_layer: Table, units: Sequence[Sequence[int]], allowed: Sequence[Sequence[bool]] | None = None
) -> Table:
    """Sum a per-layer table over the members of each unit.

    With ``allowed``, a unit's entries at options it may not take are set to its largest allowed
    entry: never chosen, and never a row's minimum nor outside its allowed range.
    """
    n_options = len(per_layer[0])
    table = [[math.fsum(per_layer[i][o] for i in unit) for o in range(n_options)] for unit in units]
    if allowed is None:
        return table
    for row, ok in zip(table, allowed, strict=True):
        filler = max(value for value, fine in zip(row, ok, strict=True) if fine)
        row[:] = [value if fine else filler for value, fine in zip(row, ok, strict=True)]
    return table


def _budget_rows(model: _Model, budgets: Mapping[str, float]) -> tuple[tuple[_Linear, float], ...]:
    """(form, limit) for each given budget."""
    return tuple((model.forms[_FORM_OF[name]], model.limits[name]) for name in budgets)


def _normalised(form: _Linear) -> _Linear:
    """Drop the constant, shift each row to a minimum of 0 and scale so the whole range is ``_OBJECTIVE_SCALE``."""
    shifted = [[value - min(row) for value in row] for row in form.table]
    span = math.fsum([*(max(row) for row in shifted), *form.switch])
    if span <= 0:
        return _Linear([[0.0] * len(row) for row in shifted], tuple(0.0 for _ in form.switch))
    # Divide first: a subnormal span (scores 1e-313 apart) would make the factor alone infinite.
    return _Linear(
        [[value / span * _OBJECTIVE_SCALE for value in row] for row in shifted],
        tuple(c / span * _OBJECTIVE_SCALE for c in form.switch),
    )


def _solver_objective(model: _Model, level: _Linear) -> _Linear:
    """One objective level, normalised, plus a fewer-bytes tie-break."""
    main = _normalised(level)
    weight = model.forms["weight_bytes"].table
    step = _OBJECTIVE_SCALE * _TIE_BREAK / len(model.units)
    table: Table = []
    for main_row, bytes_row in zip(main.table, weight, strict=True):
        levels = sorted(set(bytes_row))
        rank = {value: i / max(1, len(levels) - 1) for i, value in enumerate(levels)}
        table.append([m + step * rank[b] for m, b in zip(main_row, bytes_row, strict=True)])
    return _Linear(table, main.switch)


# ----------------------------------------------------------------------------- solving


def _highs(time_limit_s: float | None) -> pulp.LpSolver:
    """HiGHS through PuLP, quiet, single-threaded, with a zero relative gap.

    Not PuLP's bundled CBC 2.10: its MIP preprocessing returned a wrong "optimal" plan for a
    three-layer knapsack (see ``tests/test_solver.py``), and with preprocessing off it wrote
    "optimal" solutions for infeasible programs.
    """
    return pulp.HiGHS(msg=False, gapRel=0, threads=1, timeLimit=time_limit_s)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null: HiGHS prints its banner from C++ whatever ``msg`` says."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real stdout (embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _variable(prob: pulp.LpProblem, name: str, cat: str = pulp.LpBinary, **bounds: float) -> pulp.LpVariable:
    """A variable of ``prob`` (``prob.add_variable`` on PuLP >= 3.3, ``LpVariable`` before)."""
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, cat=cat, **bounds)
    return pulp.LpVariable(name, cat=cat, **bounds)


def _solve_ilp(model: _Model, program: _Program, time_limit_s: float | None) -> tuple[str, list[int] | None]:
    """Solve ``program`` over one option per unit of ``model`` (and its transition variables).

    Returns the status (``"Optimal"``, ``"Feasible"`` when stopped on time with a solution,
    ``"Infeasible"``, or PuLP's status name) and the chosen option index per unit (or ``None``).
    """
    n_options = len(model.options)
    prob = pulp.LpProblem("ohq_plan", pulp.LpMinimize)
    x = [  # no variable (None) where the unit may not take the option
        [_variable(prob, f"x_{u}_{o}") if ok else None for o, ok in enumerate(allowed)]
        for u, allowed in enumerate(model.allowed)
    ]
    z = [_variable(prob, f"z_{k}", pulp.LpContinuous, lowBound=0, upBound=1) for k in range(len(model.switches))]
    prob += _expression(program.objective, x, z)
    for u, vrow in enumerate(x):
        prob += pulp.lpSum(v for v in vrow if v is not None) == 1, f"one_{u}"
    for k, (a, b) in enumerate(model.switches):
        q_a, q_b = (
            pulp.lpSum(v for v, integer in zip(x[u], model.integer, strict=True) if integer and v is not None)
            for u in (a, b)
        )
        prob += z[k] >= q_a - q_b, f"switch_{k}_up"
        prob += z[k] >= q_b - q_a, f"switch_{k}_down"
    for k, (form, limit) in enumerate(program.rows):
        scaled, bound = _scaled_row(form, limit)
        live = (
            c
            for crow, vrow in zip(scaled.table, x, strict=True)
            for c, v in zip(crow, vrow, strict=True)
            if v is not None
        )
        if any(itertools.chain(live, scaled.switch)):
            prob += _expression(scaled, x, z) <= bound, f"budget_{k}"
        elif not _within(form.constant, limit):  # a constant row: it holds or it does not
            return "Infeasible", None
    with _quiet_stdout():
        prob.solve(_highs(time_limit_s))
    status = _status_name(prob)
    if status not in ("Optimal", "Feasible"):
        return status, None
    choice = [
        max((o for o in range(n_options) if vrow[o] is not None), key=lambda o, vrow=vrow: vrow[o].value() or 0.0)
        for vrow in x
    ]
    return status, choice


def _expression(form: _Linear, x: Sequence[Sequence[Any]], z: Sequence[Any]) -> Any:
    """The non-constant part of ``form`` over the variables, skipping zero coefficients and absent variables."""
    terms = [
        c * v
        for crow, vrow in zip(form.table, x, strict=True)
        for c, v in zip(crow, vrow, strict=True)
        if c and v is not None
    ]
    return pulp.lpSum(terms + [c * v for c, v in zip(form.switch, z, strict=False) if c])


def _scaled_row(form: _Linear, limit: float) -> tuple[_Linear, float]:
    """``form <= limit`` as ``scaled <= bound``, the limit scaled to ``_ROW_SCALE``.

    A limit near zero (a held objective whose optimum is 0) scales by the largest term over
    ``_ROW_RANGE`` instead, so no coefficient grows past ``_ROW_SCALE * _ROW_RANGE`` (HiGHS refuses
    matrix values from 1e15 on, and PuLP does not notice).
    """
    largest = max((abs(v) for v in itertools.chain(*form.table, form.switch)), default=0.0)
    size = max(abs(limit), largest / _ROW_RANGE) or 1.0
    table = [[value / size * _ROW_SCALE for value in row] for row in form.table]
    bound = limit / size * _ROW_SCALE - form.constant / size * _ROW_SCALE
    return _Linear(table, tuple(c / size * _ROW_SCALE for c in form.switch)), bound


def _status_name(prob: pulp.LpProblem) -> str:
    """PuLP's status, with 'Feasible' for a solution found before the solver stopped on time."""
    if prob.status == pulp.LpStatusOptimal:
        return "Feasible" if prob.sol_status == pulp.LpSolutionIntegerFeasible else "Optimal"
    return str(pulp.LpStatus.get(prob.status, prob.status))


def _paid(model: _Model, choice: Sequence[int]) -> list[bool]:
    """Whether each switch pays its transition under ``choice`` (one option index per unit)."""
    return [model.integer[choice[a]] != model.integer[choice[b]] for a, b in model.switches]


def _evaluate(model: _Model, form: _Linear, choice: Sequence[int]) -> float:
    """The value of ``form`` for a choice (one option index per unit)."""
    terms = [form.table[u][o] for u, o in enumerate(choice)]
    if form.switch:
        terms += [c for c, paid in zip(form.switch, _paid(model, choice), strict=True) if paid]
    if form.constant:
        terms.append(form.constant)
    return math.fsum(terms)


def _move_delta(model: _Model, form: _Linear, choice: Sequence[int], u: int, option: int) -> float:
    """How much the switch terms of ``form`` change when unit ``u`` moves to ``option``."""
    delta = []
    for k in model.unit_switches[u] if form.switch else ():
        a, b = model.switches[k]
        other = model.integer[choice[b if a == u else a]]
        before, after = model.integer[choice[u]] != other, model.integer[option] != other
        if before != after:
            delta.append(form.switch[k] if after else -form.switch[k])
    return math.fsum(delta)


def _within(total: float, limit: float) -> bool:
    """``total <= limit`` up to float rounding."""
    return total <= limit + _BUDGET_RTOL * max(abs(limit), abs(total))


def _prefer_fewer_bytes(model: _Model, choice: list[int], rows: Sequence[tuple[_Linear, float]]) -> list[int]:
    """Move units to an option with the same objective and fewer weight bytes while budgets allow."""
    choice = list(choice)
    weight = model.forms["weight_bytes"].table
    used = [_evaluate(model, form, choice) for form, _ in rows]
    changed = True
    while changed:
        changed = False
        for u, current in enumerate(choice):
            candidates = sorted(
                (o for o in range(len(model.options)) if model.allowed[u][o] and weight[u][o] < weight[u][current]),
                key=lambda o, u=u: weight[u][o],
            )
            for o in candidates:
                if not all(_same_value(model, level, choice, u, o) for level in model.objective):
                    continue
                moved = [
                    total - form.table[u][current] + form.table[u][o] + _move_delta(model, form, choice, u, o)
                    for total, (form, _) in zip(used, rows, strict=True)
                ]
                if all(_within(total, limit) for total, (_, limit) in zip(moved, rows, strict=True)):
                    choice[u], used, changed = o, moved, True
                    break
    return choice


def _same_value(model: _Model, form: _Linear, choice: Sequence[int], u: int, option: int) -> bool:
    """True when moving unit ``u`` to ``option`` leaves ``form`` unchanged (up to ``_TIE_RTOL``)."""
    here = form.table[u][choice[u]]
    there = form.table[u][option] + _move_delta(model, form, choice, u, option)
    return math.isclose(there, here, rel_tol=_TIE_RTOL, abs_tol=0.0)


def _check_choice_meets_budgets(model: _Model, choice: Sequence[int], budgets: Mapping[str, float]) -> None:
    """Guard against a solver answer that breaks a budget beyond float rounding or picks a forbidden option."""
    for u, option in enumerate(choice):
        if not model.allowed[u][option]:
            members = [model.layers[i] for i in model.units[u]]
            raise RuntimeError(
                f"the ILP solver picked {model.options[option]!r} for {members}, which the target cannot run"
            )
    overruns = _budget_overruns(model, choice, budgets)
    if overruns:
        name, total, limit = overruns[0]
        raise RuntimeError(
            f"the ILP solver returned a plan with {_FORM_OF[name]} {total!r} over the {name} limit {limit!r} "
            "(numerical tolerance); try a slightly different budget"
        )


def _budget_overruns(
    model: _Model, choice: Sequence[int], budgets: Mapping[str, float]
) -> list[tuple[str, float, float]]:
    """``(budget, total, limit)`` for each budget ``choice`` breaks beyond float rounding."""
    totals = [(name, _evaluate(model, model.forms[_FORM_OF[name]], choice), model.limits[name]) for name in budgets]
    return [(name, total, limit) for name, total, limit in totals if not _within(total, limit)]


# ----------------------------------------------------------------------------- infeasibility


def _smallest_feasible(
    model: _Model, name: str, budgets: Mapping[str, float], time_limit_s: float | None
) -> tuple[float, bool]:
    """Smallest feasible value of budget ``name``; True when the other budgets could be held."""
    form = model.forms[_FORM_OF[name]]
    others = tuple(row for other, row in zip(budgets, _budget_rows(model, budgets), strict=True) if other != name)
    value, held = None, False
    if others:
        _, choice = _solve_ilp(model, _Program(_normalised(form), others), time_limit_s)
        if choice is not None:
            value, held = _evaluate(model, form, choice), True
    if value is None:
        value = _least(model, form, time_limit_s)
    if name == "compression_ratio":
        value /= model.int8_bytes
    return value, held


def _least(model: _Model, form: _Linear, time_limit_s: float | None) -> float:
    """The least value of ``form`` without budgets (an ILP only when it has switch terms)."""
    if form.switch:
        _, choice = _solve_ilp(model, _Program(_normalised(form), ()), time_limit_s)
        if choice is not None:
            return _evaluate(model, form, choice)
    least = (
        min(value for value, ok in zip(row, allowed, strict=True) if ok)
        for row, allowed in zip(form.table, model.allowed, strict=True)
    )
    return math.fsum([*least, form.constant])


def _infeasible_error(
    model: _Model, budgets: Mapping[str, float], time_limit_s: float | None
) -> InfeasibleBudgetError | RuntimeError:
    """The error to raise when the main program is infeasible."""
    if not budgets:
        return RuntimeError("the ILP solver (HiGHS) reported an infeasible program without budgets")
    smallest: dict[str, float] = {}
    parts = []
    for name in budgets:
        value, held = _smallest_feasible(model, name, budgets, time_limit_s)
        smallest[name] = value
        note = ""
        if len(budgets) > 1:
            note = " (with the other budgets held)" if held else " (alone: the other budgets could not be held)"
        parts.append(f"the smallest feasible {name} is {_format_up(value)}{note}")
    given = ", ".join(f"{name}: {value:.6g}" for name, value in budgets.items())
    message = f"no plan meets the budgets {{{given}}}: " + "; ".join(parts)
    return InfeasibleBudgetError(message, smallest, budgets)


def _format_up(value: float) -> str:
    """``value`` to 6 significant digits, rounded up so the printed number is never below it."""
    text = f"{value:.6g}"
    if float(text) >= value:
        return text
    step = 10.0 ** (math.floor(math.log10(abs(value))) - 5)
    return f"{value + step:.6g}"


# ----------------------------------------------------------------------------- result


def _make_plan(
    model: _Model,
    choice: Sequence[int],
    sensitivity: SensitivityTable,
    costs: CostTable,
    budgets: Mapping[str, float],
    *,
    status: str,
    meta: dict[str, Any],
) -> QuantPlan:
    """Build the :class:`QuantPlan`, recomputing every total from the assignment."""
    option_of = {model.layers[i]: model.options[choice[u]] for u, unit in enumerate(model.units) for i in unit}
    assignment = {layer: option_of[layer] for layer in model.layers}
    rows = [_layer_row(layer, option, sensitivity, costs) for layer, option in assignment.items()]
    weight_bytes = math.fsum(row["weight_bytes"] for row in rows)
    predicted = {
        "size_ratio": weight_bytes / model.int8_bytes,
        "weight_bytes": weight_bytes,
        "bops": math.fsum(row["bops"] for row in rows),
        "sensitivity": math.fsum(row["sensitivity"] for row in rows),
    }
    paid = _transitions_paid(model, assignment)
    base = [] if model.base_latency_ms is None else [model.base_latency_ms]
    for metric in ("latency_ms", "energy_mj"):
        if costs.has_metric(metric, model.options, skip_unsupported=True):
            extra = [*paid.values(), *base] if metric == "latency_ms" else []
            predicted[metric] = math.fsum([*(row[metric] for row in rows), *extra])
    if costs.transition_ms:
        predicted["transition_ms"] = math.fsum(paid.values())
        for row in rows:
            row["transition_after_ms"] = paid[row["name"]]
    if model.base_latency_ms is not None:
        predicted["base_latency_ms"] = model.base_latency_ms
    return QuantPlan(
        assignment=assignment,
        predicted=predicted,
        budgets=dict(budgets),
        status=status,
        target=costs.target,
        options=list(model.options),
        layers=rows,
        meta=meta,
    )


def _transitions_paid(model: _Model, assignment: Mapping[str, str]) -> dict[str, float]:
    """Layer -> the transition paid at the boundary after it (0.0 where none is paid)."""
    paid = dict.fromkeys(model.layers, 0.0)
    for layer, following in itertools.pairwise(model.layers):
        cost = model.transitions.get(layer, 0.0)
        if cost > 0 and _is_integer(assignment[layer]) != _is_integer(assignment[following]):
            paid[layer] = cost
    return paid


def _layer_row(layer: str, option: str, sensitivity: SensitivityTable, costs: CostTable) -> dict[str, Any]:
    """One report row: the layer's option, score and costs."""
    cost = costs.costs[layer][option]
    return {
        "name": layer,
        "option": option,
        "sensitivity": float(sensitivity.scores[layer][option]),
        "weight_bytes": float(cost.weight_bytes),
        "bops": float(cost.bops),
        "latency_ms": None if cost.latency_ms is None else float(cost.latency_ms),
        "energy_mj": None if cost.energy_mj is None else float(cost.energy_mj),
        "source": cost.source,
    }
