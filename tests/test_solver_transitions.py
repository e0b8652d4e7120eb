"""Tests for :mod:`ohq_lightning.solver` with transition costs, base latency and ``minimize="latency"``.

Every plan's latency here is ``base_latency_ms + sum(layer latency) + sum(transitions paid)``, a
transition being paid at a boundary where exactly one side runs an integer option; brute force
over every assignment is the reference.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from ohq_lightning.plan import UNSUPPORTED, CostTable, LayerCost, SensitivityTable
from ohq_lightning.solver import InfeasibleBudgetError, pareto_sweep, solve

STORAGE_BITS = {"fp32": 32, "bf16": 16, "w8a8": 8, "w6a8": 6, "w4a8": 4, "w2a8": 2}
FLOATS = ("fp32", "bf16")
INTS = ("w8a8", "w6a8", "w4a8", "w2a8")
TOTALS = {  # budget -> the plan total it bounds
    "latency_budget": "latency",
    "compression_ratio": "size_ratio",
    "sensitivity_budget": "sensitivity",
    "bops_budget": "bops",
}


# ----------------------------------------------------------------------------- fixtures


def make_chain(
    n_layers: int,
    options: list[str],
    seed: int,
    *,
    base: float | None = None,
    transition_p: float = 0.8,
) -> tuple[SensitivityTable, CostTable]:
    """Random tables for a chain of layers; float options score 0, integer ones score more the fewer their bits."""
    rng = random.Random(seed)
    scores: dict[str, dict[str, float]] = {}
    costs: dict[str, dict[str, LayerCost]] = {}
    int8: dict[str, float] = {}
    transitions: dict[str, float] = {}
    for i in range(n_layers):
        name = f"layer{i}"
        numel = rng.randint(16, 1024)
        macs = numel * rng.randint(1, 32)
        int8[name] = float(numel)
        costs[name], scores[name] = {}, {}
        for option in options:
            bits = STORAGE_BITS[option]
            speed = rng.uniform(0.6, 1.6) if option in FLOATS else bits / 8 * rng.uniform(0.5, 1.5)
            costs[name][option] = LayerCost(
                weight_bytes=numel * bits / 8.0,
                bops=float(macs * bits * 8),
                latency_ms=macs * speed * 1e-5,
                energy_mj=None,
            )
            scores[name][option] = 0.0 if option in FLOATS else rng.uniform(0.05, 1.0) * 2.0 ** -(bits / 2)
        if rng.random() < transition_p:
            transitions[name] = macs * rng.uniform(0.05, 0.5) * 1e-5
    table = CostTable(
        target="chain",
        options=list(options),
        costs=costs,
        int8_weight_bytes=int8,
        transition_ms=transitions,
        base_latency_ms=base,
    )
    return SensitivityTable(method="kl", scores=scores), table


def is_int(option: str) -> bool:
    return option not in FLOATS


def transitions_paid(costs: CostTable, assignment: dict[str, str]) -> list[float]:
    """The transition paid after each layer (0 where none)."""
    layers = costs.layers
    paid = [0.0] * len(layers)
    for i, (a, b) in enumerate(itertools.pairwise(layers)):
        if is_int(assignment[a]) != is_int(assignment[b]):
            paid[i] = costs.transition_ms.get(a, 0.0)
    return paid


def totals(sens: SensitivityTable, costs: CostTable, assignment: dict[str, str]) -> dict[str, float]:
    """Every total a budget or objective reads, straight from the tables."""
    chosen = [costs.costs[layer][option] for layer, option in assignment.items()]
    base = costs.base_latency_ms or 0.0
    return {
        "latency": math.fsum([base, *(c.latency_ms for c in chosen), *transitions_paid(costs, assignment)]),
        "size_ratio": math.fsum(c.weight_bytes for c in chosen) / sum(costs.int8_weight_bytes.values()),
        "sensitivity": math.fsum(sens.scores[layer][option] for layer, option in assignment.items()),
        "bops": math.fsum(c.bops for c in chosen),
    }


def all_plans(
    sens: SensitivityTable, costs: CostTable, options: list[str], tie_groups: list[list[str]] = ()
) -> list[tuple[dict[str, str], dict[str, float]]]:
    """Every assignment that honours the tie groups and that the target can run, with its totals."""
    plans = []
    for combo in itertools.product(options, repeat=len(costs.layers)):
        assignment = dict(zip(costs.layers, combo, strict=True))
        if not all(costs.costs[layer][option].supported for layer, option in assignment.items()):
            continue
        if all(len({assignment[layer] for layer in group}) == 1 for group in tie_groups):
            plans.append((assignment, totals(sens, costs, assignment)))
    return plans


def meets(total: dict[str, float], budgets: dict[str, float], slack: float = 0.0) -> bool:
    return all(total[TOTALS[name]] <= value * (1 + slack) + slack for name, value in budgets.items())


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def random_options(rng: random.Random) -> list[str]:
    """A float option and one or two integer ones, shuffled."""
    options = [rng.choice(FLOATS), *rng.sample(INTS, rng.randint(1, 2))]
    rng.shuffle(options)
    return options


# ----------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("seed", range(48))
def test_matches_brute_force(seed: int) -> None:
    rng = random.Random(7000 + seed)
    options = random_options(rng)
    base = rng.choice([None, 0.0, rng.uniform(0.1, 2.0)])
    sens, costs = make_chain(rng.randint(3, 5), options, seed, base=base)
    tie_groups = [rng.sample(costs.layers, 2)] if seed % 3 == 0 else []
    plans = all_plans(sens, costs, options, tie_groups)
    minimize = "latency" if seed % 2 else "sensitivity"
    names = rng.sample(sorted(TOTALS), rng.randint(1, 2))
    if minimize == "sensitivity" and seed % 4 == 0:
        names = ["latency_budget", *(n for n in names if n != "latency_budget")]
    budgets = {}
    for name in names:
        values = [total[TOTALS[name]] for _, total in plans]
        budgets[name] = rng.uniform(0.8 * min(values), 1.05 * max(values))
    cost_weight = rng.choice([0.0, 0.05, 0.5]) if minimize == "sensitivity" else 0.0

    def objective(total: dict[str, float]) -> float:
        if minimize == "latency":
            return total["latency"]
        return total["sensitivity"] + cost_weight * total["latency"]

    feasible = [(assignment, total) for assignment, total in plans if meets(total, budgets)]
    kwargs = dict(budgets, tie_groups=tie_groups, minimize=minimize, cost_weight=cost_weight)
    if not feasible:
        with pytest.raises(InfeasibleBudgetError):
            solve(sens, costs, **kwargs)
        return
    plan = solve(sens, costs, **kwargs)
    got = totals(sens, costs, plan.assignment)
    best = min(objective(total) for _, total in feasible)
    assert close(objective(got), best), (plan.assignment, got, best)
    assert meets(got, budgets, slack=1e-9)
    for group in tie_groups:
        assert len({plan.assignment[layer] for layer in group}) == 1
    assert plan.predicted["latency_ms"] == pytest.approx(got["latency"], rel=1e-12)
    assert plan.predicted["transition_ms"] == pytest.approx(math.fsum(transitions_paid(costs, plan.assignment)))
    assert plan.budgets == budgets and plan.meta["minimize"] == minimize
    if minimize == "latency":  # ties in latency go to the lower total sensitivity
        fastest = [t["sensitivity"] for _, t in feasible if t["latency"] <= best * (1 + 1e-9) + 1e-12]
        assert got["sensitivity"] <= min(fastest) + 1e-9


@pytest.mark.parametrize("seed", range(24))
def test_smallest_feasible_matches_brute_force(seed: int) -> None:
    rng = random.Random(8000 + seed)
    options = random_options(rng)
    sens, costs = make_chain(4, options, 100 + seed, base=rng.choice([None, 0.5]))
    name = ("latency_budget", "sensitivity_budget", "compression_ratio")[seed % 3]
    minimize = "latency" if seed % 2 else "sensitivity"
    plans = all_plans(sens, costs, options)
    budgets: dict[str, float] = {}
    if seed % 4 >= 2 or name == "sensitivity_budget":  # another budget, feasible alone, held meanwhile
        other = {"latency_budget": "bops_budget", "compression_ratio": "latency_budget"}.get(name, "compression_ratio")
        values = sorted(total[TOTALS[other]] for _, total in plans)
        budgets[other] = values[len(values) // 2]
    least = min(total[TOTALS[name]] for _, total in plans if meets(total, budgets))
    if least <= 0:
        pytest.skip("a zero-sensitivity plan meets every budget")
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(sens, costs, minimize=minimize, **budgets, **{name: least * 0.9})
    smallest = info.value.smallest_feasible[name]
    assert math.isclose(smallest, least, rel_tol=1e-9)
    plan = solve(sens, costs, minimize=minimize, **budgets, **{name: smallest})
    assert plan.predicted[{"latency_budget": "latency_ms"}.get(name, TOTALS[name])] <= smallest * (1 + 1e-9)
    with pytest.raises(InfeasibleBudgetError):
        solve(sens, costs, minimize=minimize, **budgets, **{name: smallest * (1 - 1e-6)})


def mark_unsupported(costs: CostTable, layer: str, option: str) -> None:
    """Mark one entry as the CUDA target marks a kernel it lacks: no latency, the reason in meta."""
    cost = costs.costs[layer][option]
    costs.costs[layer][option] = LayerCost(cost.weight_bytes, cost.bops, None, None, UNSUPPORTED)
    costs.meta.setdefault("unsupported", {}).setdefault(layer, {})[option] = "no kernel"


@pytest.mark.parametrize("seed", range(16))
def test_matches_brute_force_with_unsupported_entries(seed: int) -> None:
    rng = random.Random(9000 + seed)
    options = random_options(rng)
    sens, costs = make_chain(rng.randint(3, 5), options, 200 + seed, base=rng.choice([None, 0.4]))
    for layer in costs.layers:  # some integer options cannot run (a depthwise conv on CUDA); floats always can
        for option in options:
            if is_int(option) and rng.random() < 0.4:
                mark_unsupported(costs, layer, option)
    plans = all_plans(sens, costs, options)
    minimize = "latency" if seed % 2 else "sensitivity"
    name = rng.choice(["latency_budget", "sensitivity_budget", "compression_ratio"])
    values = [total[TOTALS[name]] for _, total in plans]
    budgets = {name: rng.uniform(0.8 * min(values), 1.05 * max(values))}
    if minimize == "latency" and name == "latency_budget":
        budgets["sensitivity_budget"] = max(t["sensitivity"] for _, t in plans)
    feasible = [total for _, total in plans if meets(total, budgets)]
    if not feasible:
        with pytest.raises(InfeasibleBudgetError) as info:
            solve(sens, costs, minimize=minimize, **budgets)
        least = min(t[TOTALS[name]] for _, t in plans if meets(t, {k: v for k, v in budgets.items() if k != name}))
        assert math.isclose(info.value.smallest_feasible[name], least, rel_tol=1e-9, abs_tol=1e-12)
        return
    plan = solve(sens, costs, minimize=minimize, **budgets)
    assert all(costs.costs[layer][option].supported for layer, option in plan.assignment.items())
    got = totals(sens, costs, plan.assignment)
    key = "latency" if minimize == "latency" else "sensitivity"
    assert close(got[key], min(t[key] for t in feasible))
    assert meets(got, budgets, slack=1e-9)
    assert plan.predicted["latency_ms"] == pytest.approx(got["latency"], rel=1e-12)


# ----------------------------------------------------------------------------- hand-built chains


def three_layer_chain(base: float | None = None) -> tuple[SensitivityTable, CostTable]:
    """a, b, c: b loses accuracy at int8, a and c lose none; transitions after a (0.5 ms) and b (0.25 ms)."""
    latency = {"fp32": 1.0, "w8a8": 0.25}
    costs = {
        layer: {
            opt: LayerCost(weight_bytes=100.0 * STORAGE_BITS[opt] / 8, bops=1.0, latency_ms=lat)
            for opt, lat in latency.items()
        }
        for layer in "abc"
    }
    scores = {"a": {"fp32": 0.0, "w8a8": 0.0}, "b": {"fp32": 0.0, "w8a8": 1.0}, "c": {"fp32": 0.0, "w8a8": 0.0}}
    table = CostTable(
        target="hand",
        options=["fp32", "w8a8"],
        costs=costs,
        int8_weight_bytes=dict.fromkeys("abc", 100.0),
        transition_ms={"a": 0.5, "b": 0.25},
        base_latency_ms=base,
    )
    return SensitivityTable(method="kl", scores=scores), table


def test_float_layer_between_int8_layers_pays_two_transitions() -> None:
    sens, costs = three_layer_chain(base=2.0)
    plan = solve(sens, costs)
    assert plan.assignment == {"a": "w8a8", "b": "fp32", "c": "w8a8"}
    assert plan.predicted["transition_ms"] == 0.75
    assert plan.predicted["base_latency_ms"] == 2.0
    assert plan.predicted["latency_ms"] == 2.0 + 0.25 + 1.0 + 0.25 + 0.75
    assert [row["transition_after_ms"] for row in plan.layers] == [0.5, 0.25, 0.0]
    assert plan.predicted["sensitivity"] == 0.0


def test_latency_budget_counts_transitions_and_base() -> None:
    sens, costs = three_layer_chain(base=2.0)
    # a w8a8 / b fp32 / c w8a8 costs 4.25 ms; all fp32 costs 5.0; all w8a8 costs 2.75 (but scores 1.0)
    plan = solve(sens, costs, latency_budget=4.25)
    assert plan.assignment == {"a": "w8a8", "b": "fp32", "c": "w8a8"}
    plan = solve(sens, costs, latency_budget=4.2)  # the two transitions no longer fit: all int8
    assert set(plan.assignment.values()) == {"w8a8"}
    assert plan.predicted == pytest.approx(
        {"size_ratio": 1.0, "weight_bytes": 300.0, "bops": 3.0, "sensitivity": 1.0, "latency_ms": 2.75}
        | {"transition_ms": 0.0, "base_latency_ms": 2.0}
    )
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(sens, costs, latency_budget=2.5)
    assert info.value.smallest_feasible["latency_budget"] == pytest.approx(2.75)
    with pytest.raises(InfeasibleBudgetError, match=r"smallest feasible latency_budget is 2\.75"):
        solve(sens, costs, latency_budget=1.5)  # below the base latency alone


def test_minimize_latency_with_sensitivity_budget() -> None:
    sens, costs = three_layer_chain(base=1.0)
    fastest = solve(sens, costs, minimize="latency", sensitivity_budget=1.0)
    assert set(fastest.assignment.values()) == {"w8a8"}
    assert fastest.predicted["latency_ms"] == 1.75
    exact = solve(sens, costs, minimize="latency", sensitivity_budget=0.0)  # zero-score plans only
    assert exact.assignment == {"a": "w8a8", "b": "fp32", "c": "w8a8"}  # 3.25 ms beats all fp32 (4.0 ms)
    assert exact.budgets == {"sensitivity_budget": 0.0} and exact.meta["minimize"] == "latency"


def test_minimize_latency_ties_go_to_lower_sensitivity_then_fewer_bytes() -> None:
    options = ["w8a8", "w6a8", "w4a8", "fp32"]
    latency = {"w8a8": 1.0, "w6a8": 1.0, "w4a8": 1.0, "fp32": 3.0}
    costs = {
        layer: {
            opt: LayerCost(weight_bytes=float(STORAGE_BITS[opt]), bops=1.0, latency_ms=latency[opt]) for opt in options
        }
        for layer in ("x", "y")
    }
    scores = {
        "x": {"w8a8": 0.1, "w6a8": 0.2, "w4a8": 0.3, "fp32": 0.0},
        "y": {"w8a8": 0.1, "w6a8": 0.1, "w4a8": 0.2, "fp32": 0.0},
    }
    table = CostTable(target="t", options=options, costs=costs, int8_weight_bytes={"x": 8.0, "y": 8.0})
    plan = solve(SensitivityTable(method="kl", scores=scores), table, minimize="latency", compression_ratio=1.0)
    assert plan.assignment == {"x": "w8a8", "y": "w6a8"}


def test_tie_group_merges_transitions_between_the_same_units() -> None:
    rng = random.Random(3)
    sens, costs = make_chain(4, ["fp32", "w8a8", "w4a8"], 5, base=0.3, transition_p=1.0)
    groups = [["layer0", "layer2"], ["layer1", "layer3"]]  # every boundary lies between the two units
    plans = all_plans(sens, costs, costs.options, groups)
    for _ in range(6):
        budget = rng.uniform(min(t["latency"] for _, t in plans), max(t["latency"] for _, t in plans))
        plan = solve(sens, costs, latency_budget=budget, tie_groups=groups)
        best = min(t["sensitivity"] for _, t in plans if t["latency"] <= budget)
        assert close(plan.predicted["sensitivity"], best)
        assert plan.predicted["latency_ms"] == pytest.approx(totals(sens, costs, plan.assignment)["latency"])
    # a group of adjacent layers never pays the transition inside it
    plan = solve(sens, costs, tie_groups=[["layer1", "layer2"]], minimize="latency", compression_ratio=4.0)
    assert plan.layers[1]["transition_after_ms"] == 0.0


def test_fewer_bytes_pass_respects_transitions() -> None:
    # b scores 0 everywhere and is faster at w8a8, but moving it there from fp32 adds two transitions
    latency = {"a": {"fp32": 1.0, "w8a8": 1.0}, "b": {"fp32": 1.0, "w8a8": 0.5}, "c": {"fp32": 1.0, "w8a8": 1.0}}
    costs = {
        layer: {
            opt: LayerCost(weight_bytes=100.0 * STORAGE_BITS[opt] / 8, bops=1.0, latency_ms=lat)
            for opt, lat in row.items()
        }
        for layer, row in latency.items()
    }
    scores = {"a": {"fp32": 0.0, "w8a8": 1.0}, "b": {"fp32": 0.0, "w8a8": 0.0}, "c": {"fp32": 0.0, "w8a8": 1.0}}
    table = CostTable(
        target="t",
        options=["fp32", "w8a8"],
        costs=costs,
        int8_weight_bytes=dict.fromkeys("abc", 100.0),
        transition_ms={"a": 0.5, "b": 0.5},
    )
    sens = SensitivityTable(method="kl", scores=scores)
    plan = solve(sens, table, latency_budget=3.0)
    assert plan.assignment == {"a": "fp32", "b": "fp32", "c": "fp32"}
    assert plan.predicted["latency_ms"] == 3.0
    plan = solve(sens, table, latency_budget=3.5)  # b at w8a8 with its two transitions fits: 1 + 0.5 + 1 + 1.0
    assert plan.assignment["b"] == "w8a8" and plan.predicted["latency_ms"] == 3.5


def test_unsupported_middle_layer_pays_its_transitions() -> None:
    sens, costs = three_layer_chain(base=2.0)
    sens.scores["b"]["w8a8"] = 0.0  # b would run at int8 for free, but the target has no int8 kernel for it
    mark_unsupported(costs, "b", "w8a8")
    fastest = solve(sens, costs, minimize="latency", sensitivity_budget=1.0)
    assert fastest.assignment == {"a": "w8a8", "b": "fp32", "c": "w8a8"}  # 4.25 ms beats all fp32 (5.0)
    assert fastest.predicted["latency_ms"] == pytest.approx(4.25)
    assert fastest.predicted["transition_ms"] == pytest.approx(0.75)
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(sens, costs, latency_budget=3.0)  # all int8 (2.75 ms) would fit, were b able to run it
    assert info.value.smallest_feasible["latency_budget"] == pytest.approx(4.25)
    with pytest.raises(ValueError, match=r"layer 'b' has no supported option.*no kernel.*\['fp32'\]"):
        solve(sens, costs, options=["w8a8"], latency_budget=10.0)


# ----------------------------------------------------------------------------- other behaviour


def test_no_transitions_reported_only_when_the_table_has_them() -> None:
    sens, costs = make_chain(4, ["fp32", "w8a8"], 9, transition_p=0.0)
    plan = solve(sens, costs)
    assert "transition_ms" not in plan.predicted and "base_latency_ms" not in plan.predicted
    assert all("transition_after_ms" not in row for row in plan.layers)


def test_all_integer_options_never_pay() -> None:
    sens, costs = make_chain(5, ["w8a8", "w4a8"], 10, base=1.0, transition_p=1.0)
    plan = solve(sens, costs, latency_budget=1e6)
    assert plan.predicted["transition_ms"] == 0.0
    assert plan.predicted["latency_ms"] == pytest.approx(1.0 + sum(row["latency_ms"] for row in plan.layers))


def test_metric_checked_at_the_chosen_options_only() -> None:
    sens, costs = make_chain(3, ["fp32", "w8a8", "w4a8"], 11)
    for row in costs.costs.values():
        row["fp32"].latency_ms = None
    with pytest.raises(ValueError, match="gives no such metric"):
        solve(sens, costs, latency_budget=1.0)
    plan = solve(sens, costs, latency_budget=1e6, options=["w8a8", "w4a8"])
    assert "latency_ms" in plan.predicted


def test_pareto_sweep_over_sensitivity_budget() -> None:
    sens, costs = make_chain(6, ["fp32", "w8a8", "w4a8"], 12, base=0.5)
    values = [0.0, 0.01, 0.05, 0.1, 0.3, 1.0, 10.0]
    plans = pareto_sweep(sens, costs, budget="sensitivity_budget", values=values, minimize="latency")
    assert [p.meta["sweep"]["value"] for p in plans] == values
    latencies = [p.predicted["latency_ms"] for p in plans]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(latencies))
    assert all(p.predicted["sensitivity"] <= v + 1e-12 for p, v in zip(plans, values, strict=True))


def test_sensitivity_budget_with_minimize_sensitivity_is_a_constraint() -> None:
    sens, costs = make_chain(5, ["fp32", "w8a8", "w4a8"], 13)
    plan = solve(sens, costs, compression_ratio=0.9, sensitivity_budget=10.0)
    assert plan.budgets == {"compression_ratio": 0.9, "sensitivity_budget": 10.0}
    assert plan.predicted == solve(sens, costs, compression_ratio=0.9).predicted
    least = min(t["sensitivity"] for _, t in all_plans(sens, costs, costs.options) if t["size_ratio"] <= 0.5)
    with pytest.raises(InfeasibleBudgetError, match="sensitivity_budget") as info:
        solve(sens, costs, compression_ratio=0.5, sensitivity_budget=least / 2)
    assert info.value.smallest_feasible["sensitivity_budget"] == pytest.approx(least, rel=1e-9)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", [-1e-9, -1.0, math.nan, math.inf, "0.1", True])
def test_bad_sensitivity_budget(value: object) -> None:
    sens, costs = make_chain(3, ["fp32", "w8a8"], 0)
    with pytest.raises(ValueError, match="sensitivity_budget"):
        solve(sens, costs, sensitivity_budget=value)  # type: ignore[arg-type]


def test_bad_minimize() -> None:
    sens, costs = make_chain(3, ["fp32", "w8a8"], 0)
    with pytest.raises(ValueError, match="minimize"):
        solve(sens, costs, minimize="speed", sensitivity_budget=1.0)
    with pytest.raises(ValueError, match="needs a budget"):
        solve(sens, costs, minimize="latency")
    with pytest.raises(ValueError, match="cost_weight"):
        solve(sens, costs, minimize="latency", sensitivity_budget=1.0, cost_weight=1.0)
    for row in costs.costs.values():
        row["w8a8"].latency_ms = None
    with pytest.raises(ValueError, match="minimize='latency' needs 'latency_ms'"):
        solve(sens, costs, minimize="latency", sensitivity_budget=1.0)


@pytest.mark.parametrize(
    ("transition_ms", "base", "match"),
    [
        ({"layer0": -1.0}, None, "transition_ms"),
        ({"layer0": math.nan}, None, "transition_ms"),
        ({"nope": 1.0}, None, "nope"),
        ({}, math.inf, "base_latency_ms"),
    ],
)
def test_bad_latency_terms(transition_ms: dict[str, float], base: float | None, match: str) -> None:
    sens, costs = make_chain(3, ["fp32", "w8a8"], 0)
    costs.transition_ms, costs.base_latency_ms = transition_ms, base
    with pytest.raises(ValueError, match=match):
        solve(sens, costs)


def test_pareto_sweep_knows_sensitivity_budget() -> None:
    sens, costs = make_chain(3, ["fp32", "w8a8"], 0)
    with pytest.raises(ValueError, match="unknown budget"):
        pareto_sweep(sens, costs, budget="accuracy_budget", values=[0.1])
    with pytest.raises(ValueError, match="sensitivity_budget"):
        pareto_sweep(sens, costs, budget="sensitivity_budget", values=[-1.0])
