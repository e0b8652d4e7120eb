"""Does the ILP return the optimum? ``solve`` with HiGHS (the library's backend) against PuLP's bundled CBC.

Random small problems (1 to ``--max-layers`` layers, 1 to 4 of w2a8/w4a8/w8a8/fp32, transitions
on about half the layers, a compression ratio and/or latency budget, or minimum latency under a
sensitivity budget) are solved by both backends and checked against brute force over every
assignment: a wrong optimum, a wrong "infeasible", a plan for an infeasible problem and a solver
error each count as a failure. Then the median seconds of one ``solve`` on 20-, 60- and 120-layer
problems with six options, for both backends in the same run (the figures to compare are the
ratios). CBC is swapped in for this bench only, by replacing the library's solver factory.

Prints one JSON object.

    python bench/ilp_solver.py [--problems 2000] [--max-layers 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import platform
import random
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pulp

import ohq_lightning.solver._highs as highs_glue
from ohq_lightning.plan import CostTable, LayerCost, SensitivityTable
from ohq_lightning.solver import InfeasibleBudgetError, solve

BITS = {"w2a8": 2, "w3a8": 3, "w4a8": 4, "w5a8": 5, "w6a8": 6, "w8a8": 8, "fp32": 32}
SMALL_OPTIONS = ("w2a8", "w4a8", "w8a8", "fp32")
LARGE_OPTIONS = ("w2a8", "w3a8", "w4a8", "w5a8", "w6a8", "w8a8")


def _cbc(time_limit_s: float | None) -> pulp.LpSolver:
    """PuLP's bundled CBC with the settings the library used before HiGHS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, gapRel=0, timeLimit=time_limit_s)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run ``solve`` on ``name`` (``"highs"``: the library as it is; ``"cbc"``: PuLP's CBC)."""
    original = highs_glue.highs_solver
    if name == "cbc":
        highs_glue.highs_solver = _cbc
    try:
        yield
    finally:
        highs_glue.highs_solver = original


def random_problem(rng: random.Random, max_layers: int) -> tuple[SensitivityTable, CostTable, dict[str, Any]]:
    """Tables and solve arguments of one random problem (rounded values make exact ties likely)."""
    options = rng.sample(SMALL_OPTIONS, rng.randint(1, len(SMALL_OPTIONS)))
    costs, scores, int8, transitions = {}, {}, {}, {}
    for index in range(rng.randint(1, max_layers)):
        name = f"layer{index}"
        size = float(rng.randint(1, 1000))
        int8[name] = size
        costs[name] = {
            o: LayerCost(size * BITS[o] / 8, size * BITS[o] * 8, round(rng.uniform(0, 5), rng.choice([0, 3, 6])))
            for o in options
        }
        scores[name] = {o: round(rng.uniform(0, 10), rng.choice([0, 1, 6])) for o in options}
        if rng.random() < 0.5:
            transitions[name] = rng.uniform(0, 2)
    table = CostTable("bench", options, costs, int8, transition_ms=transitions)
    sensitivity = SensitivityTable("kl", scores)
    everything = [
        dict(zip(table.layers, choice, strict=True)) for choice in itertools.product(options, repeat=len(int8))
    ]
    latencies = [table.predicted_latency_ms(a) for a in everything]
    arguments: dict[str, Any] = {}
    if rng.random() < 0.5:
        arguments["minimize"] = "latency"
        totals = [sum(scores[n][o] for n, o in a.items()) for a in everything]
        arguments["sensitivity_budget"] = rng.uniform(min(totals), max(totals) * 1.1)
        if rng.random() < 0.5:
            arguments["compression_ratio"] = rng.uniform(0.05, 1.0)
    else:
        arguments["compression_ratio"] = rng.uniform(0.05, 1.0)
        latency_budget = rng.uniform(min(latencies), max(latencies) * 1.1)
        if rng.random() < 0.5 and latency_budget > 0:  # a budget must be > 0 (every latency may be 0)
            arguments["latency_budget"] = latency_budget
    return sensitivity, table, arguments


def brute_force(sensitivity: SensitivityTable, costs: CostTable, arguments: dict[str, Any]) -> float | None:
    """The optimal objective value over every assignment (``None``: no assignment meets the budgets)."""
    limits = {
        "weight_bytes": arguments.get("compression_ratio", math.inf) * sum(costs.int8_weight_bytes.values()),
        "latency": arguments.get("latency_budget", math.inf),
        "sensitivity": arguments.get("sensitivity_budget", math.inf),
    }
    best = None
    for choice in itertools.product(costs.options, repeat=len(costs.layers)):
        plan = dict(zip(costs.layers, choice, strict=True))
        totals = {
            "weight_bytes": sum(costs.costs[n][o].weight_bytes for n, o in plan.items()),
            "latency": costs.predicted_latency_ms(plan),
            "sensitivity": sum(sensitivity.scores[n][o] for n, o in plan.items()),
        }
        if all(totals[k] <= limits[k] * (1 + 1e-9) for k in limits):
            value = totals["latency" if arguments.get("minimize") == "latency" else "sensitivity"]
            best = value if best is None else min(best, value)
    return best


def check(sensitivity: SensitivityTable, costs: CostTable, arguments: dict[str, Any], best: float | None) -> str:
    """``"ok"`` or the kind of failure of one ``solve`` against the brute-force optimum."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = solve(sensitivity, costs, **arguments)
    except InfeasibleBudgetError:
        return "ok" if best is None else "wrongly_infeasible"
    except Exception:  # any solver crash is a failure to count
        return "error"
    if best is None:
        return "plan_for_infeasible"
    if arguments.get("minimize") == "latency":
        value = costs.predicted_latency_ms(plan.assignment)
    else:
        value = sum(sensitivity.scores[n][o] for n, o in plan.assignment.items())
    return "ok" if math.isclose(value, best, rel_tol=1e-6, abs_tol=1e-6) else "wrong_optimum"


def large_problem(layers: int, seed: int) -> tuple[SensitivityTable, CostTable]:
    """A monotone table (scores fall and costs grow with the bits) with transitions, for timing."""
    rng = random.Random(seed)
    costs, scores, int8, transitions = {}, {}, {}, {}
    for index in range(layers):
        name = f"block{index}.conv"
        numel, macs = rng.randint(16, 4096), rng.randint(16, 4096) * rng.randint(1, 64)
        int8[name] = float(numel)
        costs[name] = {
            o: LayerCost(numel * BITS[o] / 8, float(macs * BITS[o] * 8), macs * BITS[o] * rng.uniform(0.5, 1.5) * 1e-5)
            for o in LARGE_OPTIONS
        }
        scores[name] = {o: rng.uniform(0, 1) * 2.0 ** -BITS[o] for o in LARGE_OPTIONS}
        transitions[name] = rng.uniform(0, 0.05)
    return SensitivityTable("kl", scores), CostTable(
        "bench", list(LARGE_OPTIONS), costs, int8, transition_ms=transitions
    )


def solve_seconds(layers: int, seeds: int) -> dict[str, float]:
    """Median seconds of a compression-ratio solve and of a latency-under-sensitivity solve."""
    ratio, latency = [], []
    for seed in range(seeds):
        sensitivity, costs = large_problem(layers, seed)
        started = time.perf_counter()
        solve(sensitivity, costs, compression_ratio=0.6)
        ratio.append(time.perf_counter() - started)
        bound = 3 * sum(min(row.values()) for row in sensitivity.scores.values())
        started = time.perf_counter()
        solve(sensitivity, costs, minimize="latency", sensitivity_budget=bound)
        latency.append(time.perf_counter() - started)
    return {"compression_ratio": statistics.median(ratio), "min_latency": statistics.median(latency)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=2000, help="random problems checked by brute force (2000)")
    parser.add_argument("--max-layers", type=int, default=6, help="largest random problem, in layers (6)")
    parser.add_argument("--timing-seeds", type=int, default=5, help="problems timed per size (5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    rng = random.Random(args.seed)
    problems = [random_problem(rng, args.max_layers) for _ in range(args.problems)]
    optima = [brute_force(*problem) for problem in problems]
    outcomes: dict[str, Counter] = {"highs": Counter(), "cbc": Counter()}
    failures: dict[str, list[int]] = {"highs": [], "cbc": []}
    for name in outcomes:
        with backend(name):
            for index, (problem, best) in enumerate(zip(problems, optima, strict=True)):
                outcome = check(*problem, best)
                outcomes[name][outcome] += 1
                if outcome != "ok":
                    failures[name].append(index)
    timing: dict[str, dict[str, dict[str, float]]] = {}
    for layers in (20, 60, 120):
        timing[str(layers)] = {}
        for name in ("highs", "cbc"):
            with backend(name):
                timing[str(layers)][name] = solve_seconds(layers, args.timing_seeds)
    result = {
        "bench": "ilp_solver",
        "settings": vars(args),
        "host": {"python": platform.python_version(), "pulp": pulp.__version__},
        "brute_force": {
            "problems": args.problems,
            "infeasible_problems": sum(best is None for best in optima),
            "outcomes": {name: dict(counter) for name, counter in outcomes.items()},
            "failed_problem_indices": {name: indices[:20] for name, indices in failures.items()},
        },
        "solve_seconds": {
            layers: {
                **{f"{name}_{kind}": round(value, 4) for name, row in rows.items() for kind, value in row.items()},
                **{
                    f"highs_over_cbc_{kind}": round(rows["highs"][kind] / rows["cbc"][kind], 3)
                    for kind in rows["highs"]
                },
            }
            for layers, rows in timing.items()
        },
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
