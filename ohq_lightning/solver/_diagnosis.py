"""What to tell the user when no plan meets the budgets: the smallest value of each budget that is feasible."""

from __future__ import annotations

import math
from collections.abc import Mapping

from ohq_lightning.solver._highs import solve_program
from ohq_lightning.solver._model import FORM_OF, Linear, Model, Program, budget_rows, evaluate, normalised

__all__ = ["InfeasibleBudgetError", "infeasible_error"]


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


def infeasible_error(model: Model, time_limit_s: float | None) -> InfeasibleBudgetError | RuntimeError:
    """The error to raise when the main program (under the model's budgets) is infeasible."""
    budgets = model.budgets
    if not budgets:
        return RuntimeError("the ILP solver (HiGHS) reported an infeasible program without budgets")
    smallest: dict[str, float] = {}
    parts = []
    for name in budgets:
        value, held = _smallest_feasible(model, name, time_limit_s)
        smallest[name] = value
        note = ""
        if len(budgets) > 1:
            note = " (with the other budgets held)" if held else " (alone: the other budgets could not be held)"
        parts.append(f"the smallest feasible {name} is {_format_up(value)}{note}")
    given = ", ".join(f"{name}: {value:.6g}" for name, value in budgets.items())
    message = f"no plan meets the budgets {{{given}}}: " + "; ".join(parts)
    return InfeasibleBudgetError(message, smallest, budgets)


def _smallest_feasible(model: Model, name: str, time_limit_s: float | None) -> tuple[float, bool]:
    """Smallest feasible value of budget ``name``; True when the other budgets could be held."""
    form = model.forms[FORM_OF[name]]
    others = budget_rows(model, [other for other in model.budgets if other != name])
    value, held = None, False
    if others:
        _, choice = solve_program(model, Program(normalised(form), others), time_limit_s)
        if choice is not None:
            value, held = evaluate(model, form, choice), True
    if value is None:
        value = _least(model, form, time_limit_s)
    if name == "compression_ratio":
        value /= model.int8_bytes
    return value, held


def _least(model: Model, form: Linear, time_limit_s: float | None) -> float:
    """The least value of ``form`` without budgets (an ILP only when it has switch terms)."""
    if form.switch:
        _, choice = solve_program(model, Program(normalised(form), ()), time_limit_s)
        if choice is not None:
            return evaluate(model, form, choice)
    least = (
        min(value for value, ok in zip(row, allowed, strict=True) if ok)
        for row, allowed in zip(form.table, model.allowed, strict=True)
    )
    return math.fsum([*least, form.constant])


def _format_up(value: float) -> str:
    """``value`` to 6 significant digits, rounded up so the printed number is never below it."""
    text = f"{value:.6g}"
    if float(text) >= value:
        return text
    step = 10.0 ** (math.floor(math.log10(abs(value))) - 5)
    return f"{value + step:.6g}"
