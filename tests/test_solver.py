"""Tests for :mod:`ohq_lightning.solver`: the ILP against brute force, budgets, ties, errors, sweeps."""

from __future__ import annotations

import itertools
import math
import pickle
import random
import re

import pytest

import ohq_lightning.solver._solve as solve_module
from ohq_lightning.config import RESOURCE_BUDGETS, Budgets
from ohq_lightning.plan import UNSUPPORTED, CostTable, LayerCost, PlanRow, QuantPlan, SensitivityTable
from ohq_lightning.solver import (
    BUDGETS,
    InfeasibleBudgetError,
    best_of,
    pareto_sweep,
    resolve_sensitivity_budget,
    solve,
    uniform_as_run,
)

OPTION_POOL = {"w2a8": 2, "w3a8": 3, "w4a8": 4, "w5a8": 5, "w6a8": 6, "w8a8": 8}


# ----------------------------------------------------------------------------- fixtures


def make_tables(
    n_layers: int,
    options: list[str],
    seed: int,
    *,
    zero_layers: tuple[int, ...] = (),
    latency: bool = True,
    energy: bool = True,
    monotone: bool = True,
) -> tuple[SensitivityTable, CostTable]:
    """Random tables; ``monotone`` makes costs grow and scores fall with the bits, else all is random."""
    rng = random.Random(seed)
    scores: dict[str, dict[str, float]] = {}
    costs: dict[str, dict[str, LayerCost]] = {}
    int8: dict[str, float] = {}
    for i in range(n_layers):
        name = f"block{i}.conv"
        numel = rng.randint(16, 4096)
        macs = numel * rng.randint(1, 64)
        int8[name] = float(numel)
        costs[name] = {}
        scores[name] = {}
        for option in options:
            bits = OPTION_POOL[option] if monotone else rng.randint(2, 8)
            costs[name][option] = LayerCost(
                weight_bytes=numel * bits / 8.0,
                bops=float(macs * bits * 8),
                latency_ms=macs * bits * rng.uniform(0.5, 1.5) * 1e-5 if latency else None,
                energy_mj=macs * bits * rng.uniform(0.5, 1.5) * 1e-7 if energy else None,
                source="analytical",
            )
            score = rng.uniform(0.0, 1.0) * (2.0 ** -OPTION_POOL[option] if monotone else 1.0)
            scores[name][option] = 0.0 if i in zero_layers else score
    return SensitivityTable(method="kl", scores=scores), CostTable(
        target="test-target", options=list(options), costs=costs, int8_weight_bytes=int8
    )


def mark_unsupported(costs: CostTable, layer: str, option: str, reason: str = "no kernel") -> None:
    """Mark one entry as a target that cannot run it does: no latency or energy, the reason in meta."""
    cost = costs.costs[layer][option]
    costs.costs[layer][option] = LayerCost(cost.weight_bytes, cost.bops, None, None, UNSUPPORTED)
    costs.meta.setdefault("unsupported", {}).setdefault(layer, {})[option] = reason


def runnable(costs: CostTable, assignment: dict[str, str]) -> bool:
    """True when the target can run every layer of ``assignment`` at its option."""
    return all(costs.costs[layer][option].supported for layer, option in assignment.items())


def metric_total(costs: CostTable, assignment: dict[str, str], metric: str) -> float:
    """Sum of one metric over an assignment."""
    return math.fsum(getattr(costs.costs[layer][option], metric) for layer, option in assignment.items())


def limit_of(costs: CostTable, name: str, value: float) -> float:
    """The bound a budget puts on its metric total."""
    return value * sum(costs.int8_weight_bytes.values()) if name == "compression_ratio" else value


def objective(
    sens: SensitivityTable, costs: CostTable, assignment: dict[str, str], cost_weight: float, cost_metric: str
) -> float:
    """The solver's objective, evaluated directly."""
    total = math.fsum(sens.scores[layer][option] for layer, option in assignment.items())
    return total + (cost_weight * metric_total(costs, assignment, cost_metric) if cost_weight else 0.0)


def brute_force(
    sens: SensitivityTable,
    costs: CostTable,
    budgets: dict[str, float],
    tie_groups: list[list[str]] = (),  # type: ignore[assignment]
    cost_weight: float = 0.0,
    cost_metric: str = "latency_ms",
) -> tuple[float, dict[str, str]] | None:
    """Best (objective, assignment) over every runnable assignment, or None when none meets the budgets."""
    best: tuple[float, dict[str, str]] | None = None
    for combo in itertools.product(costs.options, repeat=len(costs.layers)):
        assignment = dict(zip(costs.layers, combo, strict=True))
        if any(len({assignment[layer] for layer in group}) > 1 for group in tie_groups):
            continue
        if not runnable(costs, assignment):
            continue
        if any(
            metric_total(costs, assignment, BUDGETS[name]) > limit_of(costs, name, value)
            for name, value in budgets.items()
        ):
            continue
        value = objective(sens, costs, assignment, cost_weight, cost_metric)
        if best is None or value < best[0]:
            best = (value, assignment)
    return best


def brute_min_metric(costs: CostTable, metric: str, tie_groups: list[list[str]] = ()) -> float:  # type: ignore[assignment]
    """Smallest total of a metric over all runnable assignments that honour the tie groups."""
    best = math.inf
    for combo in itertools.product(costs.options, repeat=len(costs.layers)):
        assignment = dict(zip(costs.layers, combo, strict=True))
        if all(len({assignment[layer] for layer in group}) == 1 for group in tie_groups) and runnable(
            costs, assignment
        ):
            best = min(best, metric_total(costs, assignment, metric))
    return best


def random_budgets(rng: random.Random, costs: CostTable) -> dict[str, float]:
    """One to three budgets between about 0.8x the least and 1.05x the largest achievable total."""
    budgets = {}
    for name in rng.sample(sorted(BUDGETS), rng.randint(1, 3)):
        metric = BUDGETS[name]
        values = [[getattr(c, metric) for c in row.values() if c.supported] for row in costs.costs.values()]
        low, high = sum(min(row) for row in values), sum(max(row) for row in values)
        value = rng.uniform(0.8 * low, 1.05 * high)
        budgets[name] = value / sum(costs.int8_weight_bytes.values()) if name == "compression_ratio" else value
    return budgets


def close(a: float, b: float) -> bool:
    """Objectives equal to 1e-6 (relative, or absolute near zero)."""
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


# ----------------------------------------------------------------------------- optimality


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed: int) -> None:
    rng = random.Random(1000 + seed)
    options = rng.sample(sorted(OPTION_POOL), rng.randint(2, 3))
    n_layers = rng.randint(3, 5)
    sens, costs = make_tables(n_layers, options, seed, monotone=seed % 2 == 0, zero_layers=(0,) if seed % 5 else ())
    budgets = random_budgets(rng, costs)
    tie_groups = [rng.sample(costs.layers, 2)] if seed % 3 == 0 else []
    cost_weight = rng.choice([0.0, 0.0, 0.1, 1.0])
    cost_metric = rng.choice(["latency_ms", "energy_mj", "bops", "weight_bytes"])
    if cost_metric in ("bops", "weight_bytes"):
        cost_weight *= 1e-6
    expected = brute_force(sens, costs, budgets, tie_groups, cost_weight, cost_metric)
    kwargs = dict(budgets, tie_groups=tie_groups, cost_weight=cost_weight, cost_metric=cost_metric)

    if expected is None:
        with pytest.raises(InfeasibleBudgetError):
            solve(sens, costs, **kwargs)
        return
    plan = solve(sens, costs, **kwargs)
    assert close(objective(sens, costs, plan.assignment, cost_weight, cost_metric), expected[0])
    for name, value in budgets.items():
        assert metric_total(costs, plan.assignment, BUDGETS[name]) <= limit_of(costs, name, value) * (1 + 1e-9)
    for group in tie_groups:
        assert len({plan.assignment[layer] for layer in group}) == 1


@pytest.mark.parametrize("seed", range(10))
def test_smallest_feasible_matches_brute_force(seed: int) -> None:
    sens, costs = make_tables(4, ["w2a8", "w4a8", "w8a8"], 50 + seed, monotone=seed % 2 == 0)
    name = sorted(BUDGETS)[seed % len(BUDGETS)]
    metric = BUDGETS[name]
    tie_groups = [costs.layers[:2]] if seed % 3 else []
    least = brute_min_metric(costs, metric, tie_groups)
    if name == "compression_ratio":
        least /= sum(costs.int8_weight_bytes.values())
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(sens, costs, tie_groups=tie_groups, **{name: least * 0.9})
    assert math.isclose(info.value.smallest_feasible[name], least, rel_tol=1e-9)
    assert info.value.budgets == {name: pytest.approx(least * 0.9)}


def _hand_tables(
    sizes: dict[str, float], scores: dict[str, dict[str, float]], latency: dict[str, dict[str, float]] | None = None
) -> tuple[SensitivityTable, CostTable]:
    """Tables written out by hand: weight bytes follow the bits, latency is given or zero."""
    options = list(next(iter(scores.values())))
    costs = {
        name: {
            o: LayerCost(
                weight_bytes=size * OPTION_POOL.get(o, 32) / 8,
                bops=size * OPTION_POOL.get(o, 32) * 8,
                latency_ms=(latency or {}).get(name, {}).get(o, 0.0),
            )
            for o in options
        }
        for name, size in sizes.items()
    }
    return SensitivityTable("kl", scores), CostTable("t", options, costs, dict(sizes))


def test_a_knapsack_that_cbc_preprocessing_got_wrong() -> None:
    # PuLP's bundled CBC 2.10 answered 2.0 ("optimal") here; moving layer0 instead of layer1 costs 1.0.
    scores = {
        "layer0": {"w2a8": 2.0, "w4a8": 0.0, "fp32": 0.0},
        "layer1": {"w2a8": 1.0, "w4a8": 0.0, "fp32": 0.0},
        "layer2": {"w2a8": 0.0, "w4a8": 0.0, "fp32": 0.0},
    }
    sens, costs = _hand_tables({"layer0": 1.0, "layer1": 1.0, "layer2": 3.0}, scores)
    plan = solve(sens, costs, compression_ratio=0.3125)
    assert plan.assignment == {"layer0": "w4a8", "layer1": "w2a8", "layer2": "w2a8"}
    assert plan.predicted["sensitivity"] == 1.0


def test_scores_a_subnormal_apart_are_a_tie() -> None:
    # Normalising by a span of 2e-313 once made an infinite coefficient, which PuLP refuses.
    sens, costs = _hand_tables({"layer0": 1.0}, {"layer0": {"w2a8": 0.0, "w4a8": 2.2250738585e-313}})
    assert solve(sens, costs, compression_ratio=1.0).assignment == {"layer0": "w2a8"}


def test_a_held_objective_of_zero_keeps_every_row() -> None:
    # Minimising latency reaches 0 ms; holding it for the sensitivity level once scaled its row by 1e25,
    # which HiGHS refuses (and PuLP then failed with an IndexError).
    scores = {"l0": {"w8a8": 7.0, "w4a8": 0.1}, "l1": {"w8a8": 5.9, "w4a8": 1.0}}
    latency = {"l0": {"w8a8": 3.154, "w4a8": 0.0}, "l1": {"w8a8": 4.66, "w4a8": 0.0}}
    sens, costs = _hand_tables({"l0": 388.0, "l1": 56.0}, scores, latency)
    plan = solve(sens, costs, minimize="latency", latency_budget=8.0, sensitivity_budget=2.09)
    assert plan.assignment == {"l0": "w4a8", "l1": "w4a8"}
    assert plan.predicted["latency_ms"] == 0.0


def test_no_budget_picks_each_layers_best_option() -> None:
    sens, costs = make_tables(12, ["w2a8", "w4a8", "w8a8"], 7, monotone=False)
    plan = solve(sens, costs)
    for layer, option in plan.assignment.items():
        assert sens.scores[layer][option] == min(sens.scores[layer].values())


def test_zero_sensitivity_layers_take_fewest_bytes() -> None:
    options = ["w2a8", "w4a8", "w8a8"]
    zero = (0, 2, 5, 9)
    sens, costs = make_tables(10, options, 3, zero_layers=zero)
    for kwargs in ({}, {"compression_ratio": 0.8}, {"latency_budget": 1e9}, {"cost_weight": 0.0}):
        plan = solve(sens, costs, **kwargs)
        for i in zero:
            assert plan.assignment[f"block{i}.conv"] == "w2a8", kwargs


def test_all_zero_sensitivity_is_uniform_smallest() -> None:
    sens, costs = make_tables(6, ["w8a8", "w4a8", "w2a8"], 4, zero_layers=tuple(range(6)))
    plan = solve(sens, costs, compression_ratio=1.0)
    assert set(plan.assignment.values()) == {"w2a8"}
    assert plan.predicted["sensitivity"] == 0.0


# ----------------------------------------------------------------------------- budgets and ties


def test_tie_groups_respected() -> None:
    sens, costs = make_tables(8, ["w2a8", "w4a8", "w8a8"], 11, monotone=False)
    groups = [
        ["block0.conv", "block3.conv", "block5.conv"],
        ["block1.conv", "block2.conv"],
        ["block2.conv", "block7.conv"],
    ]
    for ratio in (0.4, 0.6, 0.9):
        plan = solve(sens, costs, compression_ratio=ratio, tie_groups=groups)
        assert len({plan.assignment[layer] for layer in groups[0]}) == 1
        # overlapping groups merge: 1, 2 and 7 share one option
        assert len({plan.assignment[layer] for layer in ("block1.conv", "block2.conv", "block7.conv")}) == 1
        assert plan.predicted["size_ratio"] <= ratio + 1e-9


def test_compression_ratio_met_and_monotone() -> None:
    sens, costs = make_tables(10, ["w2a8", "w3a8", "w4a8", "w6a8", "w8a8"], 21)
    previous = -math.inf
    for ratio in [1.0 - 0.05 * k for k in range(16)]:  # 1.0 down to 0.25 (all 2-bit)
        plan = solve(sens, costs, compression_ratio=ratio)
        assert plan.predicted["size_ratio"] <= ratio + 1e-9
        assert plan.predicted["sensitivity"] >= previous - 1e-12
        previous = plan.predicted["sensitivity"]
    with pytest.raises(InfeasibleBudgetError):
        solve(sens, costs, compression_ratio=0.2)


def test_combined_budgets_all_met() -> None:
    sens, costs = make_tables(12, ["w2a8", "w4a8", "w8a8"], 5)
    full = solve(sens, costs)
    budgets = {
        "compression_ratio": 0.7,
        "latency_budget": 0.8 * full.predicted["latency_ms"],
        "energy_budget": 0.9 * full.predicted["energy_mj"],
        "bops_budget": 0.85 * full.predicted["bops"],
    }
    plan = solve(sens, costs, **budgets)
    assert plan.budgets == budgets
    assert plan.predicted["size_ratio"] <= budgets["compression_ratio"] + 1e-9
    assert plan.predicted["latency_ms"] <= budgets["latency_budget"] * (1 + 1e-9)
    assert plan.predicted["energy_mj"] <= budgets["energy_budget"] * (1 + 1e-9)
    assert plan.predicted["bops"] <= budgets["bops_budget"] * (1 + 1e-9)
    assert plan.predicted["sensitivity"] >= full.predicted["sensitivity"]


def test_cost_weight_trades_sensitivity_for_latency() -> None:
    sens, costs = make_tables(10, ["w2a8", "w4a8", "w8a8"], 8)
    plain = solve(sens, costs)
    weighted = solve(sens, costs, cost_weight=1e3, cost_metric="latency_ms")
    assert weighted.predicted["latency_ms"] <= plain.predicted["latency_ms"]
    assert weighted.predicted["sensitivity"] >= plain.predicted["sensitivity"]
    assert weighted.meta["cost_weight"] == 1e3


def test_options_subset() -> None:
    sens, costs = make_tables(6, ["w2a8", "w4a8", "w8a8"], 9)
    plan = solve(sens, costs, options=["w4a8", "w8a8"])
    assert set(plan.assignment.values()) <= {"w4a8", "w8a8"}
    assert plan.options == ["w4a8", "w8a8"]


# ----------------------------------------------------------------------------- infeasibility


def test_infeasible_names_smallest_ratio() -> None:
    sens, costs = make_tables(7, ["w2a8", "w4a8", "w8a8"], 13)
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(sens, costs, compression_ratio=0.1)
    error = info.value
    assert isinstance(error, ValueError)
    smallest = error.smallest_feasible["compression_ratio"]
    assert smallest == pytest.approx(0.25)  # every layer at 2 bits
    assert str(error) == (
        "no plan meets the budgets {compression_ratio: 0.1}: the smallest feasible compression_ratio is 0.25"
    )
    plan = solve(sens, costs, compression_ratio=smallest)
    assert plan.predicted["size_ratio"] <= smallest + 1e-9
    with pytest.raises(InfeasibleBudgetError):
        solve(sens, costs, compression_ratio=smallest * (1 - 1e-6))


def test_infeasible_with_ties_and_non_uniform_minimum() -> None:
    sens, costs = make_tables(6, ["w2a8", "w4a8", "w8a8"], 14, monotone=False)
    groups = [costs.layers[:3]]
    least = brute_min_metric(costs, "weight_bytes", groups) / sum(costs.int8_weight_bytes.values())
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(sens, costs, compression_ratio=least * 0.99, tie_groups=groups)
    smallest = info.value.smallest_feasible["compression_ratio"]
    assert smallest == pytest.approx(least, rel=1e-12)
    numbers = [float(x) for x in re.findall(r"is ([0-9.e+-]+)", str(info.value))]
    assert numbers and numbers[0] >= smallest  # the message rounds up, never down
    solve(sens, costs, compression_ratio=smallest, tie_groups=groups)
    solve(sens, costs, compression_ratio=numbers[0], tie_groups=groups)
    with pytest.raises(InfeasibleBudgetError):
        solve(sens, costs, compression_ratio=smallest * (1 - 1e-6), tie_groups=groups)


def test_infeasible_pair_reports_each_with_the_other_held() -> None:
    sens, costs = make_tables(8, ["w2a8", "w4a8", "w8a8"], 15, monotone=False)
    lat_min = brute_min_metric(costs, "latency_ms")
    ratio_min = brute_min_metric(costs, "weight_bytes") / sum(costs.int8_weight_bytes.values())
    budgets = {"compression_ratio": ratio_min * 1.02, "latency_budget": lat_min * 1.02}
    try:
        solve(sens, costs, **budgets)
    except InfeasibleBudgetError as error:
        assert set(error.smallest_feasible) == set(budgets)
        assert "with the other budgets held" in str(error)
        for name, value in error.smallest_feasible.items():
            assert value > budgets[name]
            solve(sens, costs, **{**budgets, name: value})  # feasible with the other held
    else:
        pytest.skip("this instance happens to be feasible")


def test_infeasible_falls_back_to_alone() -> None:
    sens, costs = make_tables(5, ["w2a8", "w4a8", "w8a8"], 16)
    lat_min = brute_min_metric(costs, "latency_ms")
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(sens, costs, compression_ratio=0.9, latency_budget=lat_min * 0.5)
    error = info.value
    assert error.smallest_feasible["latency_budget"] == pytest.approx(lat_min, rel=1e-9)
    assert error.smallest_feasible["compression_ratio"] == pytest.approx(0.25)
    assert "alone" in str(error)


def test_infeasible_error_pickles() -> None:
    error = InfeasibleBudgetError("msg", {"compression_ratio": 0.25}, {"compression_ratio": 0.1})
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == "msg"
    assert clone.smallest_feasible == {"compression_ratio": 0.25}
    assert clone.budgets == {"compression_ratio": 0.1}


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("ratio", [0.0, -0.5, math.nan, math.inf])
def test_bad_ratio(ratio: float) -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 0)
    with pytest.raises(ValueError, match="compression_ratio"):
        solve(sens, costs, compression_ratio=ratio)


@pytest.mark.parametrize("name", ["latency_budget", "energy_budget", "bops_budget"])
def test_non_positive_budget(name: str) -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 0)
    with pytest.raises(ValueError, match=name):
        solve(sens, costs, **{name: 0.0})


def test_unknown_option() -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 0)
    with pytest.raises(ValueError, match="w3a8"):
        solve(sens, costs, options=["w3a8", "w8a8"])


def test_option_missing_from_sensitivity_row() -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 0)
    del sens.scores["block1.conv"]["w4a8"]
    with pytest.raises(ValueError, match=r"block1\.conv.*w4a8"):
        solve(sens, costs)


def test_layer_missing_from_sensitivity() -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 0)
    del sens.scores["block2.conv"]
    with pytest.raises(ValueError, match=r"block2\.conv"):
        solve(sens, costs)


@pytest.mark.parametrize(
    ("name", "table_kwargs"), [("latency_budget", {"latency": False}), ("energy_budget", {"energy": False})]
)
def test_budget_on_missing_metric(name: str, table_kwargs: dict[str, bool]) -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 0, **table_kwargs)
    with pytest.raises(ValueError, match="gives no such metric"):
        solve(sens, costs, **{name: 1.0})
    plan = solve(sens, costs)  # fine without that budget; the missing metric is left out of predicted
    assert BUDGETS[name] not in plan.predicted


def test_cost_metric_missing_or_unknown() -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 0, latency=False)
    with pytest.raises(ValueError, match="gives no such metric"):
        solve(sens, costs, cost_weight=1.0, cost_metric="latency_ms")
    with pytest.raises(ValueError, match="cost_metric"):
        solve(sens, costs, cost_weight=1.0, cost_metric="watts")
    with pytest.raises(ValueError, match="cost_weight"):
        solve(sens, costs, cost_weight=-1.0)


def test_unknown_tie_group_layer() -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 0)
    with pytest.raises(ValueError, match="nope"):
        solve(sens, costs, tie_groups=[["block0.conv", "nope"]])
    with pytest.raises(ValueError, match="list of layer names"):
        solve(sens, costs, tie_groups=["block0.conv"])


def test_nan_score_rejected() -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 0)
    sens.scores["block0.conv"]["w4a8"] = math.nan
    with pytest.raises(ValueError, match="not a finite number"):
        solve(sens, costs)


# ----------------------------------------------------------------------------- sweep and plan


def test_pareto_sweep_in_order_and_monotone() -> None:
    sens, costs = make_tables(10, ["w2a8", "w4a8", "w6a8", "w8a8"], 31)
    values = [0.1, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
    plans = pareto_sweep(sens, costs, budget="compression_ratio", values=values, tie_groups=[costs.layers[:2]])
    assert [p.meta["sweep"]["value"] for p in plans] == values[1:]  # 0.1 is below the all-2-bit size and skipped
    assert [p.budgets["compression_ratio"] for p in plans] == values[1:]
    assert [p.meta["sweep"]["index"] for p in plans] == list(range(1, len(values)))
    sensitivities = [p.predicted["sensitivity"] for p in plans]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(sensitivities))
    for plan in plans:
        assert plan.assignment[costs.layers[0]] == plan.assignment[costs.layers[1]]


def test_pareto_sweep_bad_input() -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 0)
    with pytest.raises(ValueError, match="unknown budget"):
        pareto_sweep(sens, costs, budget="ratio", values=[0.5])
    with pytest.raises(ValueError, match="swept"):
        pareto_sweep(sens, costs, budget="compression_ratio", values=[0.5], compression_ratio=0.5)
    with pytest.raises(ValueError, match="compression_ratio"):
        pareto_sweep(sens, costs, budget="compression_ratio", values=[0.5, -1.0])


def test_plan_contents() -> None:
    sens, costs = make_tables(5, ["w2a8", "w4a8", "w8a8"], 41)
    plan = solve(sens, costs, compression_ratio=0.6, bops_budget=1e12)
    assert plan.status == "Optimal"
    assert plan.target == "test-target"
    assert plan.budgets == {"compression_ratio": 0.6, "bops_budget": 1e12}
    assert list(plan.assignment) == costs.layers
    assert [row["name"] for row in plan.layers] == costs.layers
    assert set(plan.predicted) == {"size_ratio", "weight_bytes", "bops", "sensitivity", "latency_ms", "energy_mj"}
    assert plan.meta["solver"] == "pulp-highs" and plan.meta["solve_s"] >= 0 and plan.meta["cost_weight"] == 0.0
    for row in plan.layers:
        cost = costs.costs[row["name"]][row["option"]]
        assert row["option"] == plan.assignment[row["name"]]
        assert row["sensitivity"] == sens.scores[row["name"]][row["option"]]
        assert (row["weight_bytes"], row["bops"], row["latency_ms"], row["energy_mj"], row["source"]) == (
            cost.weight_bytes,
            cost.bops,
            cost.latency_ms,
            cost.energy_mj,
            cost.source,
        )
    for metric in ("weight_bytes", "bops", "latency_ms", "energy_mj"):
        assert plan.predicted[metric] == pytest.approx(metric_total(costs, plan.assignment, metric), rel=1e-12)
    assert plan.predicted["size_ratio"] == pytest.approx(
        plan.predicted["weight_bytes"] / sum(costs.int8_weight_bytes.values()), rel=1e-12
    )


def test_plan_json_round_trip(tmp_path) -> None:
    sens, costs = make_tables(6, ["w2a8", "w4a8", "w8a8"], 42, latency=False)
    plan = solve(sens, costs, compression_ratio=0.55, tie_groups=[costs.layers[1:3]])
    assert QuantPlan.from_json(plan.to_json()) == plan
    path = plan.save(tmp_path / "plans" / "plan.json")
    assert QuantPlan.from_json(path) == plan


def test_plan_meta_and_extra_sensitivity_layers_ignored() -> None:
    sens, costs = make_tables(4, ["w4a8", "w8a8"], 43)
    sens.scores["not.in.costs"] = {"w4a8": 1.0, "w8a8": 0.0}
    plan = solve(sens, costs, tie_groups=(("block0.conv", "block1.conv"),), time_limit_s=30)
    assert "not.in.costs" not in plan.assignment
    assert plan.meta["tie_groups"] == [["block0.conv", "block1.conv"]]
    assert plan.meta["time_limit_s"] == 30
    assert plan.meta["sensitivity_method"] == "kl"


def test_numpy_scalars_accepted() -> None:
    np = pytest.importorskip("numpy")
    sens, costs = make_tables(4, ["w4a8", "w8a8"], 44)
    sens.scores = {layer: {o: np.float32(v) for o, v in row.items()} for layer, row in sens.scores.items()}
    plan = solve(sens, costs, compression_ratio=np.float32(0.75))
    assert plan.predicted["size_ratio"] <= 0.75 + 1e-9
    assert isinstance(plan.layers[0]["sensitivity"], float)
    assert QuantPlan.from_json(plan.to_json()) == plan


# ----------------------------------------------------------------------------- solver status handling


def test_stopped_on_time_with_a_solution_returns_feasible_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 45)
    monkeypatch.setattr(solve_module, "solve_program", lambda model, program, limit: ("Feasible", [1, 1, 1]))
    with pytest.warns(RuntimeWarning, match="before proving the plan optimal"):
        plan = solve(sens, costs, compression_ratio=1.0, time_limit_s=1)
    assert plan.status == "Feasible"
    assert set(plan.assignment.values()) == {"w8a8"}


def test_stopped_on_time_without_a_solution_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 46)
    monkeypatch.setattr(solve_module, "solve_program", lambda model, program, limit: ("Not Solved", None))
    with pytest.raises(RuntimeError, match=r"Not Solved.*time_limit_s"):
        solve(sens, costs, time_limit_s=1)


def test_bad_time_limit() -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 0)
    for bad in (0, -1.0, math.nan, "10"):
        with pytest.raises(ValueError, match="time_limit_s"):
            solve(sens, costs, time_limit_s=bad)  # type: ignore[arg-type]
    assert solve(sens, costs, time_limit_s=None).status == "Optimal"


# ----------------------------------------------------------------------------- entries the target cannot run


def mark_random_unsupported(rng: random.Random, costs: CostTable, fraction: float) -> None:
    """Mark about ``fraction`` of the entries unsupported, every layer keeping at least one option it runs."""
    for layer in costs.layers:
        for option in rng.sample(costs.options, len(costs.options) - 1):
            if rng.random() < fraction:
                mark_unsupported(costs, layer, option)


def dw_table(latency: bool = True) -> tuple[SensitivityTable, CostTable]:
    """conv, dw, fc at w4a8 / w8a8; the target cannot run dw at w4a8, where dw scores 0 with the fewest bytes."""
    bits = {"w4a8": 4, "w8a8": 8}
    numel = {"conv": 100, "dw": 1000, "fc": 100}
    lat = {"w4a8": 0.5, "w8a8": 1.0}
    costs = {
        layer: {
            opt: LayerCost(n * b / 8, float(n * b * 8), lat[opt] * n / 100 if latency else None)
            for opt, b in bits.items()
        }
        for layer, n in numel.items()
    }
    scores = {"conv": {"w4a8": 0.2, "w8a8": 0.0}, "dw": {"w4a8": 0.0, "w8a8": 0.5}, "fc": {"w4a8": 0.3, "w8a8": 0.0}}
    table = CostTable("gpu", ["w4a8", "w8a8"], costs, {layer: float(n) for layer, n in numel.items()})
    mark_unsupported(table, "dw", "w4a8", "depthwise int4 has no kernel")
    return SensitivityTable("kl", scores), table


@pytest.mark.parametrize("seed", range(24))
def test_matches_brute_force_with_unsupported_entries(seed: int) -> None:
    rng = random.Random(5000 + seed)
    options = rng.sample(sorted(OPTION_POOL), rng.randint(2, 3))
    sens, costs = make_tables(rng.randint(3, 5), options, 300 + seed, monotone=seed % 2 == 0)
    mark_random_unsupported(rng, costs, 0.4)
    budgets = random_budgets(rng, costs)  # any metric: latency and energy are missing only where unsupported
    tie_groups = [rng.sample(costs.layers, 2)] if seed % 3 == 0 else []
    cost_weight = rng.choice([0.0, 0.5]) if "latency_budget" not in budgets else 0.0
    kwargs = dict(budgets, tie_groups=tie_groups, cost_weight=cost_weight)
    if brute_force(sens, costs, {}, tie_groups) is None:  # the tied layers share no option they both run
        with pytest.raises(ValueError, match="tie group"):
            solve(sens, costs, **kwargs)
        return
    expected = brute_force(sens, costs, budgets, tie_groups, cost_weight)
    if expected is None:
        with pytest.raises(InfeasibleBudgetError):
            solve(sens, costs, **kwargs)
        return
    plan = solve(sens, costs, **kwargs)
    assert runnable(costs, plan.assignment)
    assert close(objective(sens, costs, plan.assignment, cost_weight, "latency_ms"), expected[0])
    for name, value in budgets.items():
        assert metric_total(costs, plan.assignment, BUDGETS[name]) <= limit_of(costs, name, value) * (1 + 1e-9)
    assert plan.predicted["latency_ms"] == pytest.approx(metric_total(costs, plan.assignment, "latency_ms"))


@pytest.mark.parametrize("seed", range(8))
def test_smallest_feasible_skips_unsupported_entries(seed: int) -> None:
    rng = random.Random(6000 + seed)
    sens, costs = make_tables(4, ["w2a8", "w4a8", "w8a8"], 70 + seed, monotone=seed % 2 == 0)
    for layer in rng.sample(costs.layers, 2):  # the cheapest option of two layers cannot run
        cheapest = min(costs.options, key=lambda o, row=costs.costs[layer]: row[o].weight_bytes)
        mark_unsupported(costs, layer, cheapest)
    name = ("compression_ratio", "latency_budget", "bops_budget", "energy_budget")[seed % 4]
    tie_groups = [costs.layers[:2]] if seed % 3 else []
    least = brute_min_metric(costs, BUDGETS[name], tie_groups)
    if name == "compression_ratio":
        least /= sum(costs.int8_weight_bytes.values())
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(sens, costs, tie_groups=tie_groups, **{name: least * 0.9})
    assert math.isclose(info.value.smallest_feasible[name], least, rel_tol=1e-9)
    plan = solve(sens, costs, tie_groups=tie_groups, **{name: info.value.smallest_feasible[name]})
    assert runnable(costs, plan.assignment)


def test_unsupported_entry_never_chosen_even_when_optimal() -> None:
    sens, costs = dw_table()
    assert solve(sens, costs).assignment == {"conv": "w8a8", "dw": "w8a8", "fc": "w8a8"}
    # a tight size budget: dw at w4a8 would save the most bytes at no loss, but it cannot run
    plan = solve(sens, costs, compression_ratio=0.95)
    assert plan.assignment == {"conv": "w4a8", "dw": "w8a8", "fc": "w4a8"}
    assert plan.layers[1]["source"] == "analytical"
    # all scores zero: the fewer-bytes pass must not move dw to the entry it cannot run
    zero = SensitivityTable("kl", {layer: dict.fromkeys(row, 0.0) for layer, row in sens.scores.items()})
    assert solve(zero, costs).assignment == {"conv": "w4a8", "dw": "w8a8", "fc": "w4a8"}
    assert solve(zero, costs, cost_weight=1.0, cost_metric="weight_bytes").assignment["dw"] == "w8a8"


def test_latency_budget_and_minimize_latency_with_unsupported_entries() -> None:
    sens, costs = dw_table()
    assert costs.costs["dw"]["w4a8"].latency_ms is None
    plan = solve(sens, costs, latency_budget=11.5)  # dw at w8a8 (10 ms) + conv, fc: one of them at w4a8
    assert plan.assignment["dw"] == "w8a8" and plan.predicted["latency_ms"] == pytest.approx(11.5)
    assert plan.predicted["sensitivity"] == pytest.approx(0.7)
    fast = solve(sens, costs, minimize="latency", sensitivity_budget=10.0)
    assert fast.assignment == {"conv": "w4a8", "dw": "w8a8", "fc": "w4a8"}
    assert fast.predicted["latency_ms"] == pytest.approx(11.0)
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(sens, costs, latency_budget=6.0)  # it would fit if dw could run at w4a8 (6.0 ms)
    assert info.value.smallest_feasible["latency_budget"] == pytest.approx(11.0)
    # a supported entry without latency is still refused for a latency budget
    costs.costs["conv"]["w8a8"].latency_ms = None
    with pytest.raises(ValueError, match="gives no such metric"):
        solve(sens, costs, latency_budget=20.0)


def test_smallest_feasible_ratio_accounts_for_unsupported_entries() -> None:
    sens, costs = dw_table()
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(sens, costs, compression_ratio=0.5)  # all w4a8 would be 0.5; dw must stay at w8a8
    assert info.value.smallest_feasible["compression_ratio"] == pytest.approx((50 + 1000 + 50) / 1200)
    assert "0.916667" in str(info.value)


def test_tie_group_takes_an_option_every_member_runs() -> None:
    sens, costs = dw_table()
    plan = solve(sens, costs, tie_groups=[["conv", "dw"]])
    assert plan.assignment["conv"] == plan.assignment["dw"] == "w8a8"
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(sens, costs, compression_ratio=0.9, tie_groups=[["conv", "dw"]])
    assert info.value.smallest_feasible["compression_ratio"] == pytest.approx((100 + 1000 + 50) / 1200)


def test_layer_without_a_supported_candidate_is_named() -> None:
    sens, costs = dw_table()
    with pytest.raises(ValueError, match=r"layer 'dw' has no supported option.*depthwise int4 has no kernel") as info:
        solve(sens, costs, options=["w4a8"])
    assert not isinstance(info.value, InfeasibleBudgetError)
    assert "['w8a8']" in str(info.value)  # what it can run instead
    mark_unsupported(costs, "conv", "w8a8", "no int8 kernel")
    with pytest.raises(ValueError, match=r"tie group \['conv', 'dw'\] has no option that every member supports"):
        solve(sens, costs, tie_groups=[["conv", "dw"]])
    mark_unsupported(costs, "dw", "w8a8")
    with pytest.raises(ValueError, match=r"layer 'dw'.*no option in the table runs it"):
        solve(sens, costs)
    with pytest.raises(ValueError, match="layer 'dw'"):
        pareto_sweep(sens, costs, budget="compression_ratio", values=[0.9, 1.0])


def test_missing_score_allowed_only_at_unsupported_entries() -> None:
    sens, costs = dw_table()
    del sens.scores["dw"]["w4a8"]  # a scorer may skip what the target cannot run
    assert solve(sens, costs, compression_ratio=0.95).assignment["dw"] == "w8a8"
    del sens.scores["conv"]["w4a8"]
    with pytest.raises(ValueError, match=r"no score for layer 'conv'"):
        solve(sens, costs)


def test_pareto_sweep_respects_unsupported_entries() -> None:
    sens, costs = dw_table()
    plans = pareto_sweep(sens, costs, budget="compression_ratio", values=[0.5, 0.9, 0.95, 1.0])
    assert [p.meta["sweep"]["value"] for p in plans] == [0.95, 1.0]  # 0.5 and 0.9 need dw at w4a8
    assert all(p.assignment["dw"] == "w8a8" for p in plans)
    plans = pareto_sweep(sens, costs, budget="latency_budget", values=[6.0, 11.0, 12.0])
    assert [p.meta["sweep"]["value"] for p in plans] == [11.0, 12.0]
    assert all(p.assignment["dw"] == "w8a8" and "latency_ms" in p.predicted for p in plans)


def test_minimize_latency_breaks_latency_ties_by_sensitivity_not_by_bytes() -> None:
    """Sub-8-bit weights on the int8 kernel cost the same time: the less sensitive option must win the tie.

    The sensitivity differences here are tiny next to the whole sensitivity range (dominated by 2-bit
    scores), which a weighted secondary objective lost to the fewer-bytes tie-break.
    """
    names = [f"layer{i}" for i in range(40)]
    costs, scores, int8 = {}, {}, {}
    for i, name in enumerate(names):
        int8[name] = 1000.0
        costs[name] = {
            option: LayerCost(1000.0 * bits / 8, 1.0, latency, None, "measured")
            for option, bits, latency in (("w8a8", 8, 1.0 + 0.01 * i), ("w4a8", 4, 1.0 + 0.01 * i), ("w2a8", 2, 0.9))
        }
        scores[name] = {"w8a8": 1e-4, "w4a8": 3e-4, "w2a8": 50.0}
    sensitivity = SensitivityTable(method="kl", scores=scores)
    table = CostTable(target="t", options=["w8a8", "w4a8", "w2a8"], costs=costs, int8_weight_bytes=int8)
    plan = solve(sensitivity, table, minimize="latency", sensitivity_budget=40 * 3e-4 + 1e-9)
    assert set(plan.assignment.values()) == {"w8a8"}
    assert plan.predicted["latency_ms"] == pytest.approx(sum(1.0 + 0.01 * i for i in range(40)))


@pytest.mark.parametrize("seed", range(6))
def test_best_of_picks_what_solve_would_among_the_candidates_and_drops_those_over_a_budget(seed: int) -> None:
    sens, costs = make_tables(4, ["w2a8", "w4a8", "w8a8"], seed)
    mark_unsupported(costs, "block0.conv", "w2a8")
    rng = random.Random(seed)
    candidates = [dict(zip(costs.layers, rng.choices(costs.options, k=4), strict=True)) for _ in range(12)]
    budgets = {"compression_ratio": 0.6, "cost_weight": 3.0}
    fits = [
        a
        for a in candidates
        if runnable(costs, a) and metric_total(costs, a, "weight_bytes") <= limit_of(costs, "compression_ratio", 0.6)
    ]
    plan = best_of(candidates, sens, costs, **budgets)
    if not fits:
        assert plan is None
        return
    best = min(fits, key=lambda a: objective(sens, costs, a, 3.0, "latency_ms"))
    assert plan is not None and plan.assignment == best
    assert plan.predicted["size_ratio"] <= 0.6 + 1e-9
    assert best_of([candidates[0]], sens, costs, compression_ratio=1e-6) is None


# ----------------------------------------------------------------------------- Budgets objects and option-named bounds


def test_budgets_object_gives_the_plan_of_the_same_keywords() -> None:
    sens, costs = make_tables(6, ["w2a8", "w4a8", "w8a8"], 51)
    loose = solve(sens, costs, compression_ratio=0.6, latency_budget=50.0)
    typed = solve(sens, costs, budgets=Budgets(compression_ratio=0.6, latency_budget=50.0))
    assert typed.assignment == loose.assignment and typed.budgets == loose.budgets == {
        "compression_ratio": 0.6,
        "latency_budget": 50.0,
    }
    assert BUDGETS == RESOURCE_BUDGETS
    with pytest.raises(ValueError, match="not both"):
        solve(sens, costs, budgets=Budgets(compression_ratio=0.6), latency_budget=50.0)
    with pytest.raises(ValueError, match="budgets must be a Budgets"):
        solve(sens, costs, budgets={"compression_ratio": 0.6})  # type: ignore[arg-type]
    candidates = [dict.fromkeys(costs.layers, option) for option in costs.options]
    assert best_of(candidates, sens, costs, budgets=Budgets(compression_ratio=0.6)) == best_of(
        candidates, sens, costs, compression_ratio=0.6
    )


def test_compression_ratio_above_one_is_a_budget_like_any_other() -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 52)
    plan = solve(sens, costs, budgets=Budgets(compression_ratio=2.0))
    assert plan.budgets == {"compression_ratio": 2.0} and set(plan.assignment.values()) == {"w8a8"}


def test_option_named_sensitivity_budget_is_uniform_totals_as_the_target_runs_it() -> None:
    sens, costs = make_tables(5, ["w2a8", "w4a8", "w8a8"], 53)
    mark_unsupported(costs, "block1.conv", "w8a8")
    uniform = uniform_as_run(costs, sens, "w8a8", costs.options)
    least = min(["w2a8", "w4a8"], key=lambda o: sens.scores["block1.conv"][o])
    assert uniform == {**dict.fromkeys(costs.layers, "w8a8"), "block1.conv": least}
    total = sum(sens.scores[layer][option] for layer, option in uniform.items())
    resolved = resolve_sensitivity_budget(Budgets(sensitivity_budget="W8A8"), sens, costs.options, costs)
    assert total < resolved.sensitivity_budget <= total * (1 + 1e-9) + 1e-15
    same = Budgets(compression_ratio=0.5)
    assert resolve_sensitivity_budget(same, sens, costs.options, costs) is same
    plan = solve(sens, costs, minimize="latency", sensitivity_budget="w8a8")
    assert plan.budgets == {"sensitivity_budget": resolved.sensitivity_budget}
    assert plan.meta["sensitivity_budget_from"] == "uniform w8a8"
    assert plan.assignment == solve(sens, costs, minimize="latency", budgets=resolved).assignment
    assert plan.predicted["sensitivity"] <= total * (1 + 1e-9) + 1e-15
    with pytest.raises(ValueError, match="not a candidate option"):
        solve(sens, costs, minimize="latency", sensitivity_budget="w8a8", options=["w2a8", "w4a8"])


def test_minimize_auto_picks_the_objective_by_the_budgets() -> None:
    sens, costs = make_tables(5, ["w2a8", "w4a8", "w8a8"], 54)
    auto = solve(sens, costs, minimize="auto", compression_ratio=0.6)
    assert auto.assignment == solve(sens, costs, compression_ratio=0.6).assignment
    assert auto.meta["minimize"] == "sensitivity"
    fastest = solve(sens, costs, minimize="auto")
    assert fastest.assignment == solve(sens, costs, minimize="latency", sensitivity_budget="w8a8").assignment
    assert fastest.meta["minimize"] == "latency" and fastest.meta["sensitivity_budget_from"] == "uniform w8a8"
    bounded = solve(sens, costs, minimize="auto", sensitivity_budget=0.1)
    assert bounded.meta["minimize"] == "latency" and bounded.budgets == {"sensitivity_budget": 0.1}
    with pytest.raises(ValueError, match="cost_weight"):
        solve(sens, costs, minimize="auto", cost_weight=1.0)


def test_pareto_sweep_takes_the_other_budgets_as_an_object() -> None:
    sens, costs = make_tables(6, ["w2a8", "w4a8", "w8a8"], 55)
    values = [0.4, 0.6, 0.8]
    typed = pareto_sweep(sens, costs, budget="compression_ratio", values=values, budgets=Budgets(latency_budget=1e3))
    loose = pareto_sweep(sens, costs, budget="compression_ratio", values=values, latency_budget=1e3)
    assert [p.assignment for p in typed] == [p.assignment for p in loose]
    assert [p.budgets for p in typed] == [{"compression_ratio": v, "latency_budget": 1e3} for v in values]
    with pytest.raises(ValueError, match="swept"):
        pareto_sweep(sens, costs, budget="compression_ratio", values=values, budgets=Budgets(compression_ratio=0.5))
    with pytest.raises(ValueError, match="not both"):
        pareto_sweep(sens, costs, budget="compression_ratio", values=values, budgets=Budgets(), bops_budget=1.0)


def test_budgets_check_every_value_once() -> None:
    assert Budgets.from_mapping({"compression_ratio": 0.5, "latency_budget": None}).resources() == {
        "compression_ratio": 0.5
    }
    with pytest.raises(ValueError, match="unknown budget 'int8_budget'"):
        Budgets.from_mapping({"int8_budget": 1.0})
    with pytest.raises(ValueError, match="bops_budget"):
        Budgets(bops_budget=0.0)
    assert Budgets(sensitivity_budget=0).sensitivity_budget == 0.0
    for bad in ("int8", -1.0, math.nan):
        with pytest.raises(ValueError, match="sensitivity_budget"):
            Budgets(sensitivity_budget=bad)


def test_plan_rows_are_typed_and_read_like_the_old_dicts() -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 56)
    plan = solve(sens, costs, compression_ratio=0.8)
    row = plan.layers[0]
    assert isinstance(row, PlanRow) and row["name"] == row.name == costs.layers[0]
    assert set(row.to_dict()) == {
        "name",
        "option",
        "sensitivity",
        "weight_bytes",
        "bops",
        "latency_ms",
        "energy_mj",
        "source",
    }
    assert "transition_after_ms" not in row and row.get("macs", 7) == 7
    with pytest.raises(KeyError):
        row["type"]


def test_an_option_named_bound_on_broken_tables_names_the_layer_not_the_bound() -> None:
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 54)
    sens.scores["block2.conv"]["w8a8"] = math.nan
    with pytest.raises(ValueError, match=r"no finite score for block2\.conv at w8a8"):
        solve(sens, costs, minimize="latency", sensitivity_budget="w8a8")
    sens, costs = make_tables(3, ["w4a8", "w8a8"], 55)
    for option in costs.options:  # a layer the target cannot run at all: the table check speaks first
        mark_unsupported(costs, "block1.conv", option)
    with pytest.raises(ValueError, match=r"block1\.conv"):
        solve(sens, costs, minimize="latency", sensitivity_budget="w8a8")
