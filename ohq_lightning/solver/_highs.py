"""Running a :class:`~._model.Program` through PuLP and HiGHS, and reading the answer back.

HiGHS (not PuLP's bundled CBC) is the backend for correctness reasons told in ``docs/notes/solver.md``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pulp

from ohq_lightning.solver._model import Linear, Model, Program, within

__all__ = ["highs_solver", "solve_program"]

_ROW_SCALE = 1e6  # budget rows are written as sum(metric / limit * _ROW_SCALE) <= _ROW_SCALE
_ROW_RANGE = 1e3  # ... unless the limit is this many times smaller than the largest term (see _scaled_row)


def highs_solver(time_limit_s: float | None) -> pulp.LpSolver:
    """HiGHS through PuLP, quiet, single-threaded, with a zero relative gap (the optimum, not a near one)."""
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


def solve_program(model: Model, program: Program, time_limit_s: float | None) -> tuple[str, list[int] | None]:
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
        elif not within(form.constant, limit):  # a constant row: it holds or it does not
            return "Infeasible", None
    with _quiet_stdout():
        prob.solve(highs_solver(time_limit_s))
    status = _status_name(prob)
    if status not in ("Optimal", "Feasible"):
        return status, None
    choice = [
        max((o for o in range(n_options) if vrow[o] is not None), key=lambda o, vrow=vrow: vrow[o].value() or 0.0)
        for vrow in x
    ]
    return status, choice


def _expression(form: Linear, x: Sequence[Sequence[Any]], z: Sequence[Any]) -> Any:
    """The non-constant part of ``form`` over the variables, skipping zero coefficients and absent variables."""
    terms = [
        c * v
        for crow, vrow in zip(form.table, x, strict=True)
        for c, v in zip(crow, vrow, strict=True)
        if c and v is not None
    ]
    return pulp.lpSum(terms + [c * v for c, v in zip(form.switch, z, strict=False) if c])


def _scaled_row(form: Linear, limit: float) -> tuple[Linear, float]:
    """``form <= limit`` as ``scaled <= bound``, the limit scaled to ``_ROW_SCALE``.

    A limit near zero (a held objective whose optimum is 0) scales by the largest term over
    ``_ROW_RANGE`` instead, so no coefficient grows past ``_ROW_SCALE * _ROW_RANGE`` (HiGHS refuses
    matrix values from 1e15 on, and PuLP does not notice).
    """
    largest = max((abs(v) for v in itertools.chain(*form.table, form.switch)), default=0.0)
    size = max(abs(limit), largest / _ROW_RANGE) or 1.0
    table = [[value / size * _ROW_SCALE for value in row] for row in form.table]
    bound = limit / size * _ROW_SCALE - form.constant / size * _ROW_SCALE
    return Linear(table, tuple(c / size * _ROW_SCALE for c in form.switch)), bound


def _status_name(prob: pulp.LpProblem) -> str:
    """PuLP's status, with 'Feasible' for a solution found before the solver stopped on time."""
    if prob.status == pulp.LpStatusOptimal:
        return "Feasible" if prob.sol_status == pulp.LpSolutionIntegerFeasible else "Optimal"
    return str(pulp.LpStatus.get(prob.status, prob.status))
