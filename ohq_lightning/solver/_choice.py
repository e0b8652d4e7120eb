"""A choice (one option index per unit), checked and polished after the solver returns it.

Exact ties are common (a randomly initialised layer scores zero at every option), and then the
plan should take the option with fewer weight bytes; the solver's tie-break term leans that way,
and :func:`prefer_fewer_bytes` finishes the job exactly. The budget checks here recompute totals
in full precision, guarding against a solver answer that is off beyond float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ohq_lightning.solver._model import FORM_OF, Linear, Model, evaluate, within

__all__ = ["budget_overruns", "check_choice_meets_budgets", "choice_of", "prefer_fewer_bytes"]

_TIE_RTOL = 1e-12  # objective coefficients this close count as equal in the post-solve pass


def choice_of(model: Model, assignment: Mapping[str, str]) -> list[int] | None:
    """``assignment`` as one option index per unit; None when a unit's members disagree or cannot run it."""
    index = {name: i for i, name in enumerate(model.options)}
    choice = []
    for u, unit in enumerate(model.units):
        picked = {assignment.get(model.layers[i]) for i in unit}
        if len(picked) != 1 or (option := index.get(picked.pop())) is None or not model.allowed[u][option]:
            return None
        choice.append(option)
    return choice


def _move_delta(model: Model, form: Linear, choice: Sequence[int], u: int, option: int) -> float:
    """How much the switch terms of ``form`` change when unit ``u`` moves to ``option``."""
    delta = []
    for k in model.unit_switches[u] if form.switch else ():
        a, b = model.switches[k]
        other = model.integer[choice[b if a == u else a]]
        before, after = model.integer[choice[u]] != other, model.integer[option] != other
        if before != after:
            delta.append(form.switch[k] if after else -form.switch[k])
    return math.fsum(delta)


def _same_value(model: Model, form: Linear, choice: Sequence[int], u: int, option: int) -> bool:
    """True when moving unit ``u`` to ``option`` leaves ``form`` unchanged (up to ``_TIE_RTOL``)."""
    here = form.table[u][choice[u]]
    there = form.table[u][option] + _move_delta(model, form, choice, u, option)
    return math.isclose(there, here, rel_tol=_TIE_RTOL, abs_tol=0.0)


def prefer_fewer_bytes(model: Model, choice: list[int], rows: Sequence[tuple[Linear, float]]) -> list[int]:
    """Move units to an option with the same objective and fewer weight bytes while budgets allow."""
    choice = list(choice)
    weight = model.forms["weight_bytes"].table
    used = [evaluate(model, form, choice) for form, _ in rows]
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
                if all(within(total, limit) for total, (_, limit) in zip(moved, rows, strict=True)):
                    choice[u], used, changed = o, moved, True
                    break
    return choice


def budget_overruns(model: Model, choice: Sequence[int]) -> list[tuple[str, float, float]]:
    """``(budget, total, limit)`` for each of the model's budgets ``choice`` breaks beyond float rounding."""
    totals = [(name, evaluate(model, model.forms[FORM_OF[name]], choice), model.limits[name]) for name in model.budgets]
    return [(name, total, limit) for name, total, limit in totals if not within(total, limit)]


def check_choice_meets_budgets(model: Model, choice: Sequence[int]) -> None:
    """Guard against a solver answer that breaks a budget beyond float rounding or picks a forbidden option."""
    for u, option in enumerate(choice):
        if not model.allowed[u][option]:
            members = [model.layers[i] for i in model.units[u]]
            raise RuntimeError(
                f"the ILP solver picked {model.options[option]!r} for {members}, which the target cannot run"
            )
    overruns = budget_overruns(model, choice)
    if overruns:
        name, total, limit = overruns[0]
        raise RuntimeError(
            f"the ILP solver returned a plan with {FORM_OF[name]} {total!r} over the {name} limit {limit!r} "
            "(numerical tolerance); try a slightly different budget"
        )
