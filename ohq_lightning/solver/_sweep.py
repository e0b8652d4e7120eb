"""``pareto_sweep``: one :func:`solve` per value of one budget, for a trade-off curve."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ohq_lightning.config import Budgets
from ohq_lightning.plan import CostTable, QuantPlan, SensitivityTable
from ohq_lightning.solver._budgets import SWEEP_BUDGETS, budgets_of
from ohq_lightning.solver._diagnosis import InfeasibleBudgetError
from ohq_lightning.solver._solve import solve

__all__ = ["pareto_sweep"]


def pareto_sweep(
    sensitivity: SensitivityTable,
    costs: CostTable,
    *,
    budget: str,
    values: Sequence[float],
    budgets: Budgets | None = None,
    **solve_kwargs: Any,
) -> list[QuantPlan]:
    """Solve once per value of one budget and return the plans in the order of ``values``.

    ``budget`` is one of :data:`SWEEP_BUDGETS` (``"compression_ratio"``, ``"latency_budget"``,
    ``"energy_budget"``, ``"bops_budget"``, ``"sensitivity_budget"``; sweep the last with
    ``minimize="latency"`` for a latency / sensitivity front). The other budgets stay fixed: give
    them as ``budgets=Budgets(...)`` or as keywords (not both, and not ``budget`` itself); the other
    ``solve_kwargs`` go to :func:`solve` unchanged. Values for which no plan exists
    (:class:`InfeasibleBudgetError`) are skipped, so the result may be shorter than ``values``;
    each plan records its point in ``plan.meta["sweep"] = {"budget", "value", "index"}`` (``index``
    into ``values``) and, as always, in ``plan.budgets``. Bad input still raises ``ValueError``.
    """
    if budget not in SWEEP_BUDGETS:
        raise ValueError(f"unknown budget {budget!r}: use one of {sorted(SWEEP_BUDGETS)}")
    loose = {name: solve_kwargs.pop(name) for name in SWEEP_BUDGETS if name in solve_kwargs}
    fixed = budgets_of(budgets, loose)
    if getattr(fixed, budget) is not None:
        raise ValueError(f"{budget!r} is swept; do not pass it in solve_kwargs or budgets as well")
    plans: list[QuantPlan] = []
    for index, value in enumerate(values):
        try:
            plan = solve(sensitivity, costs, budgets=fixed.replace(**{budget: value}), **solve_kwargs)
        except InfeasibleBudgetError:
            continue
        plan.meta["sweep"] = {"budget": budget, "value": float(value), "index": index}
        plans.append(plan)
    return plans
