"""``solve`` and ``best_of``: the plan the ILP picks, or the best of given assignments by the same objective.

Both take the same settings, checked once by :meth:`_Problem.build`, which also builds the linear
model from the tables; they differ only in how a choice is found (solving, or ranking candidates).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ohq_lightning.config import MINIMIZE, Budgets, check_cost_weight, check_minimize, real_number, resolve_objective
from ohq_lightning.plan import CostTable, QuantPlan, SensitivityTable
from ohq_lightning.solver._budgets import budgets_of
from ohq_lightning.solver._choice import budget_overruns, check_choice_meets_budgets, choice_of, prefer_fewer_bytes
from ohq_lightning.solver._diagnosis import infeasible_error
from ohq_lightning.solver._highs import solve_program
from ohq_lightning.solver._model import Linear, Model, Program, budget_rows, build_model, evaluate, solver_objective
from ohq_lightning.solver._result import make_plan, solve_meta

__all__ = ["COST_METRICS", "MINIMIZE", "best_of", "solve"]

COST_METRICS: tuple[str, ...] = ("latency_ms", "energy_mj", "bops", "weight_bytes")
"""Metrics that ``cost_metric`` may name."""

_LEXICOGRAPHIC_SLACK = 1e-7  # a secondary objective may cost the first this much, relative (solver tolerance)


@dataclass(frozen=True)
class _Problem:
    """What :func:`solve` and :func:`best_of` share: their settings, checked once, and the model of the tables."""

    model: Model
    minimize: str
    cost_weight: float
    cost_metric: str
    tie_groups: Sequence[Sequence[str]]
    time_limit_s: float | None
    bound_from: str | None  # the option a sensitivity bound was taken from, if it was named by one

    @classmethod
    def build(
        cls,
        sensitivity: SensitivityTable,
        costs: CostTable,
        budgets: Budgets,
        *,
        tie_groups: Sequence[Sequence[str]],
        cost_weight: float,
        cost_metric: str,
        minimize: str,
        options: Sequence[str] | None,
        time_limit_s: float | None,
    ) -> _Problem:
        """Check the settings (``minimize="auto"`` resolved) and build the model; ValueError on bad input."""
        weight = check_cost_weight(cost_weight)
        if cost_metric not in COST_METRICS:
            raise ValueError(f"unknown cost_metric {cost_metric!r}: use one of {list(COST_METRICS)}")
        minimize = check_minimize(minimize)
        if minimize == "auto":
            minimize, budgets = resolve_objective(minimize, budgets)
        if minimize == "latency" and weight > 0:
            raise ValueError("cost_weight weighs a cost against sensitivity; with minimize='latency' leave it at 0")
        if minimize == "latency" and not budgets.given():
            raise ValueError(
                "minimize='latency' needs a budget to trade against, e.g. sensitivity_budget (the total sensitivity "
                "allowed); without one the fastest plan ignores accuracy"
            )
        if time_limit_s is not None:
            limit = real_number(time_limit_s)
            if limit is None or not math.isfinite(limit) or limit <= 0:
                raise ValueError(f"time_limit_s must be a finite number > 0 or None, got {time_limit_s!r}")
        model = build_model(sensitivity, costs, options, tie_groups, budgets, weight, cost_metric, minimize)
        bound_from = budgets.sensitivity_budget if isinstance(budgets.sensitivity_budget, str) else None
        return cls(model, minimize, weight, cost_metric, tie_groups, time_limit_s, bound_from)

    def meta(self, sensitivity: SensitivityTable, solve_s: float) -> dict[str, Any]:
        """The plan's ``meta``: how it was chosen."""
        meta = solve_meta(
            sensitivity,
            self.minimize,
            self.cost_weight,
            self.cost_metric,
            self.tie_groups,
            solve_s=solve_s,
            time_limit_s=self.time_limit_s,
        )
        if self.bound_from is not None:
            meta["sensitivity_budget_from"] = f"uniform {self.bound_from}"
        return meta


def solve(
    sensitivity: SensitivityTable,
    costs: CostTable,
    *,
    budgets: Budgets | None = None,
    compression_ratio: float | None = None,
    latency_budget: float | None = None,
    energy_budget: float | None = None,
    bops_budget: float | None = None,
    sensitivity_budget: float | str | None = None,
    tie_groups: Sequence[Sequence[str]] = (),
    cost_weight: float = 0.0,
    cost_metric: str = "latency_ms",
    minimize: str = "sensitivity",
    options: Sequence[str] | None = None,
    time_limit_s: float | None = 60.0,
) -> QuantPlan:
    """Pick one option per layer of ``costs`` minimising sensitivity (or latency) under budgets.

    Latency everywhere (budget, objective, ``predicted``) is the predicted end-to-end latency:
    ``costs.base_latency_ms`` + the layers' ``latency_ms`` + the ``costs.transition_ms`` paid.

    Args:
        sensitivity: layer -> option -> score (higher is worse); must cover every layer of ``costs``.
        costs: layer -> option -> :class:`~ohq_lightning.plan.LayerCost` for the target.
        budgets: a :class:`~ohq_lightning.config.Budgets`, or give its fields as the keywords below
            (not both). ``compression_ratio`` bounds plan weight bytes / weight bytes at uniform 8 bits;
            ``latency_budget`` the predicted latency (ms); ``energy_budget`` total ``energy_mj``;
            ``bops_budget`` total ``bops``; ``sensitivity_budget`` the total sensitivity (a number >= 0,
            or an option name: ``"w8a8"`` is uniform w8a8's total as the target runs it, see
            :func:`resolve_sensitivity_budget`).
        tie_groups: groups of layer names that must take the same option.
        cost_weight: weight (>= 0) of the ``cost_metric`` total added to the objective (sensitivity only).
        cost_metric: one of :data:`COST_METRICS`.
        minimize: ``"sensitivity"`` (default); ``"latency"``, ties going to the lower total sensitivity
            (needs latency and a budget); or ``"auto"``: sensitivity when a resource budget is given,
            else latency bounded by uniform w8a8's sensitivity
            (:meth:`~ohq_lightning.config.SearchConfig.objective`).
        options: the candidate options (default: ``costs.options``); entries the target marks
            unsupported are never chosen.
        time_limit_s: solver time limit per solve (``None``: none). A plan HiGHS found but did not prove
            optimal in time comes back with status ``"Feasible"`` and a :class:`RuntimeWarning`.

    Returns:
        A :class:`~ohq_lightning.plan.QuantPlan` whose ``predicted`` totals are recomputed from the
        assignment (with ``transition_ms`` / ``base_latency_ms`` when the table has such terms).

    Raises:
        ValueError: bad input (unknown option or layer, missing metric, bad budget, a layer or tie group
            with no supported candidate...).
        InfeasibleBudgetError: no assignment meets the budgets.
        RuntimeError: the solver failed otherwise (e.g. stopped on time without a solution).
    """
    loose = dict(
        compression_ratio=compression_ratio,
        latency_budget=latency_budget,
        energy_budget=energy_budget,
        bops_budget=bops_budget,
        sensitivity_budget=sensitivity_budget,
    )
    problem = _Problem.build(
        sensitivity,
        costs,
        budgets_of(budgets, loose),
        tie_groups=tie_groups,
        cost_weight=cost_weight,
        cost_metric=cost_metric,
        minimize=minimize,
        options=options,
        time_limit_s=time_limit_s,
    )
    return _solved_plan(problem, sensitivity, costs)


def _solved_plan(problem: _Problem, sensitivity: SensitivityTable, costs: CostTable) -> QuantPlan:
    """Solve the problem and make its plan; the errors and warning :func:`solve` documents."""
    model, time_limit_s = problem.model, problem.time_limit_s
    start = time.perf_counter()
    status, choice, rows = _solve_levels(model, time_limit_s)
    solve_s = time.perf_counter() - start
    if status == "Infeasible":
        raise infeasible_error(model, time_limit_s)
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
            stacklevel=3,
        )
    choice = prefer_fewer_bytes(model, choice, rows)
    check_choice_meets_budgets(model, choice)
    return make_plan(model, choice, sensitivity, costs, status=status, meta=problem.meta(sensitivity, solve_s))


def _solve_levels(
    model: Model, time_limit_s: float | None
) -> tuple[str, list[int] | None, tuple[tuple[Linear, float], ...]]:
    """Solve the objective's levels in turn (lexicographic); the status, choice and rows of the last program.

    Each further level is minimised with the levels before it held at their optimum (up to a slack
    the size of the solver's tolerance).
    """
    program = Program(solver_objective(model, model.objective[0]), budget_rows(model, model.budgets))
    status, choice = solve_program(model, program, time_limit_s)
    for level in model.objective[1:] if choice is not None else ():
        best = evaluate(model, model.objective[0], choice)
        held = (*program.rows, (model.objective[0], best + _LEXICOGRAPHIC_SLACK * max(abs(best), 1e-12)))
        program = Program(solver_objective(model, level), held)
        next_status, next_choice = solve_program(model, program, time_limit_s)
        if next_choice is not None:
            status, choice = next_status, next_choice
    return status, choice, program.rows


def best_of(
    assignments: Sequence[Mapping[str, str]],
    sensitivity: SensitivityTable,
    costs: CostTable,
    *,
    budgets: Budgets | None = None,
    compression_ratio: float | None = None,
    latency_budget: float | None = None,
    energy_budget: float | None = None,
    bops_budget: float | None = None,
    sensitivity_budget: float | str | None = None,
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
    loose = dict(
        compression_ratio=compression_ratio,
        latency_budget=latency_budget,
        energy_budget=energy_budget,
        bops_budget=bops_budget,
        sensitivity_budget=sensitivity_budget,
    )
    problem = _Problem.build(
        sensitivity,
        costs,
        budgets_of(budgets, loose),
        tie_groups=tie_groups,
        cost_weight=cost_weight,
        cost_metric=cost_metric,
        minimize=minimize,
        options=options,
        time_limit_s=None,
    )
    model = problem.model
    ranked = []
    for assignment in assignments:
        choice = choice_of(model, assignment)
        if choice is None or budget_overruns(model, choice):
            continue
        ranked.append((tuple(evaluate(model, level, choice) for level in model.objective), choice))
    if not ranked:
        return None
    best = min(ranked, key=lambda entry: entry[0])[1]
    return make_plan(model, best, sensitivity, costs, status="Optimal", meta=problem.meta(sensitivity, 0.0))
