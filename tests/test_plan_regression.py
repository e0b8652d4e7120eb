"""The same cost and sensitivity tables, budgets and seed give the same plans as when they were stored.

The stored plans come from ``tests/regression_cases.py``; a refactor that changes any of them changed
behaviour (regenerate only for an intended change, and say so in the CHANGELOG).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from regression_cases import MODELS, SEARCH_CASES, run_search, solve_cases

from ohq_lightning import CostTable, SensitivityTable, solve

DATA = Path(__file__).parent / "data" / "regression"


def _stored(name: str) -> tuple[dict, CostTable, SensitivityTable]:
    document = json.loads((DATA / f"{name}.json").read_text())
    return document, CostTable.from_dict(document["costs"]), SensitivityTable.from_dict(document["sensitivity"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_solve_returns_the_stored_plans(name: str) -> None:
    document, costs, scores = _stored(name)
    cases = solve_cases(costs, scores)
    assert set(cases) == set(document["solve_plans"])
    for key, kwargs in cases.items():
        assert solve(scores, costs, **kwargs).assignment == document["solve_plans"][key], key
    # the cases are not all the same plan: they exercise different budgets
    assert len({json.dumps(plan, sort_keys=True) for plan in document["solve_plans"].values()}) >= 6


@pytest.mark.parametrize("name", sorted(MODELS))
def test_search_returns_the_stored_plans(name: str) -> None:
    document, costs, scores = _stored(name)
    for key, case in SEARCH_CASES.items():
        assert run_search(name, costs, scores, case) == document["search_plans"][key], key
