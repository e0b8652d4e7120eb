"""Choose one option per layer with an integer linear program (PuLP, solved by HiGHS).

The program has one binary variable ``x[layer, option]`` per layer and candidate option, exactly
one option per layer, and by default (``minimize="sensitivity"``) minimises

    sum(sensitivity[l][o] * x[l, o]) + cost_weight * cost(cost_metric)

under any of five budgets (each optional, all combinable; see :class:`~ohq_lightning.config.Budgets`):

* ``compression_ratio`` -- plan weight bytes <= ratio * weight bytes at uniform 8 bits
  (1.0 is INT8 size, see :mod:`ohq_lightning.plan`);
* ``latency_budget`` (ms) -- the plan's predicted latency (below) <= the budget;
* ``energy_budget`` (mJ), ``bops_budget`` (bit operations) -- the sum of that metric over the
  layers <= the budget;
* ``sensitivity_budget`` -- the total sensitivity <= the budget (a number, or an option name:
  ``"w8a8"`` is uniform w8a8's total as the target runs it).

With ``minimize="latency"`` the program minimises the predicted latency instead (ties go to the
lower total sensitivity) under the same budgets, typically a ``sensitivity_budget``;
``minimize="auto"`` picks one by the budgets given.

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

The modules: ``_budgets`` (budgets in, option names resolved), ``_tables`` (table checks),
``_model`` (the linear model), ``_highs`` (PuLP + HiGHS), ``_choice`` (post-solve checks and
tie-breaks), ``_diagnosis`` (smallest feasible budgets), ``_result`` (the plan), ``_solve`` and
``_sweep`` (the public functions). Why HiGHS and how the program is scaled: ``docs/notes/solver.md``.

Example:
    >>> plan = solve(sensitivity_table, cost_table, compression_ratio=0.6)  # doctest: +SKIP
    >>> plan.predicted["size_ratio"] <= 0.6  # doctest: +SKIP
    True
    >>> fast = solve(sensitivity_table, cost_table, minimize="latency", sensitivity_budget=0.05)  # doctest: +SKIP
"""

from ohq_lightning.solver._budgets import (
    BUDGETS,
    SWEEP_BUDGETS,
    check_bound_option,
    resolve_sensitivity_budget,
    uniform_as_run,
)
from ohq_lightning.solver._diagnosis import InfeasibleBudgetError
from ohq_lightning.solver._solve import COST_METRICS, MINIMIZE, best_of, solve
from ohq_lightning.solver._sweep import pareto_sweep

__all__ = [
    "BUDGETS",
    "COST_METRICS",
    "MINIMIZE",
    "SWEEP_BUDGETS",
    "InfeasibleBudgetError",
    "best_of",
    "check_bound_option",
    "pareto_sweep",
    "resolve_sensitivity_budget",
    "solve",
    "uniform_as_run",
]
