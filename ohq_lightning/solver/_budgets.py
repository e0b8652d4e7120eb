"""The budgets a plan is solved under: a :class:`~ohq_lightning.config.Budgets` or the loose keywords that build one.

:class:`~ohq_lightning.config.Budgets` checks every value; this module only gathers them and turns an
option name given as ``sensitivity_budget`` (``"w8a8"``) into a number, using the tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ohq_lightning.config import RESOURCE_BUDGETS, Budgets, settings_from
from ohq_lightning.plan import CostTable, SensitivityTable

__all__ = [
    "BUDGETS",
    "SWEEP_BUDGETS",
    "budgets_of",
    "check_bound_option",
    "resolve_sensitivity_budget",
    "uniform_as_run",
]

BUDGETS: Mapping[str, str] = RESOURCE_BUDGETS
"""Budget keyword -> the :class:`~ohq_lightning.plan.LayerCost` metric it bounds (each must be > 0)."""

SWEEP_BUDGETS: tuple[str, ...] = (*BUDGETS, "sensitivity_budget")
"""Budgets :func:`pareto_sweep` may sweep: :data:`BUDGETS` and ``sensitivity_budget`` (total sensitivity, >= 0)."""

_UNIFORM_MARGIN = 1e-9  # a bound taken from a uniform plan's total sits this far above it (relative) ...
_UNIFORM_FLOOR = 1e-15  # ... plus this, so that the uniform plan itself stays feasible


def budgets_of(budgets: Budgets | None, loose: Mapping[str, Any]) -> Budgets:
    """``budgets``, or the :class:`~ohq_lightning.config.Budgets` that the loose budget keywords build.

    ``loose`` maps budget names to values (``None``: not given); the rules are those of every entry
    point (:func:`~ohq_lightning.config.settings_from`): giving both is a ``ValueError``.
    """
    given = {name: value for name, value in loose.items() if value is not None}
    return settings_from(budgets, None, given, caller="solve")[0]


def uniform_as_run(costs: CostTable, scores: SensitivityTable, option: str, options: Sequence[str]) -> dict[str, str]:
    """Every layer at ``option``, except where the target cannot run it: there the least sensitive option it can.

    That is uniform ``option`` as the target would run it (layers without any runnable option keep ``option``).
    """
    assignment = {}
    for layer in costs.layers:
        runnable = [name for name in options if costs.is_supported(layer, name)]
        if option in runnable or not runnable:
            assignment[layer] = option
        else:
            assignment[layer] = min(runnable, key=lambda name: scores.scores[layer][name])
    return assignment


def check_bound_option(budgets: Budgets, options: Sequence[str]) -> None:
    """``ValueError`` when ``sensitivity_budget`` names an option that is not one of the candidate ``options``."""
    option = budgets.sensitivity_budget
    if isinstance(option, str) and option not in options:
        raise ValueError(
            f"sensitivity_budget={option!r} bounds the plan by uniform {option}'s total sensitivity, but {option} is "
            f"not a candidate option here ({list(options)})"
        )


def resolve_sensitivity_budget(
    budgets: Budgets, scores: SensitivityTable, options: Sequence[str], costs: CostTable
) -> Budgets:
    """``budgets`` with an option name as ``sensitivity_budget`` replaced by that option's total sensitivity.

    ``sensitivity_budget="w8a8"`` becomes the total sensitivity of uniform w8a8 as the target runs it
    (see :func:`uniform_as_run`), a hair above it so that plan stays feasible. Other budgets come back
    unchanged. The option must be one of ``options`` (the candidates), else ``ValueError``.
    """
    option = budgets.sensitivity_budget
    if not isinstance(option, str):
        return budgets
    check_bound_option(budgets, options)
    assignment = uniform_as_run(costs, scores, option, options)
    terms = {layer: scores.scores[layer][chosen] for layer, chosen in assignment.items()}
    bad = [f"{layer} at {assignment[layer]}" for layer, value in terms.items() if not math.isfinite(float(value))]
    if bad:
        raise ValueError(
            f"sensitivity_budget={option!r} is uniform {option}'s total sensitivity, but the sensitivity table has no "
            f"finite score for {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}"
        )
    total = sum(terms.values())
    return budgets.replace(sensitivity_budget=total * (1 + _UNIFORM_MARGIN) + _UNIFORM_FLOOR)
