"""Tests for the cpu target's additive fit, the ILP on the tables it emits, and its timing cache.

The fit (:func:`ohq_lightning.hardware.cpu.fit.fit_additive`) is checked against a known truth,
the solver against brute force on tables shaped like the cpu target's (per-layer latencies that
are deltas against FP32: zero, negative where int8 is faster, positive where it is slower; zero
and positive transitions), and the profile's timing cache against files that parse but hold
figures no cost can rest on.
"""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import make_tiny_net
from test_solver_transitions import all_plans, close, meets

from ohq_lightning._util.timing import Timing, TimingSettings
from ohq_lightning.hardware import CPUTarget
from ohq_lightning.hardware.cache import TimingCache
from ohq_lightning.hardware.cpu import fit as fit_module
from ohq_lightning.hardware.cpu._profile import REFERENCE, Profiler
from ohq_lightning.hardware.cpu.fit import design_row, fit_additive
from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import CostTable, LayerCost, SensitivityTable
from ohq_lightning.solver import InfeasibleBudgetError, solve

# ----------------------------------------------------------------------------- the fit

BASE = 10.0
KAPPA = np.array([-1.2, -0.4, 0.0, 0.3, -2.0, -0.05, 0.15, -0.8])  # int8 faster, equal, slower in context
TRANSITIONS = np.array([0.2, 0.0, 0.35, 0.1, 0.0, 0.25, 0.05])  # T >= 0, some boundaries free
TRUTH = np.concatenate([[BASE], KAPPA, TRANSITIONS])
COUNT = len(KAPPA)
EXACT_MS = 1e-4
"""Noiseless recovery tolerance (ms): ``lsq_linear``'s default solver (trf) stops at its own tolerance, 4e-6 to
7e-6 ms off over random truths of 3-12 layers; 1e-4 ms (0.1 us) is still far below any timing's resolution."""


def target_samples(count: int, seed: int, per_layer: float = 3.0) -> list[str]:
    """The plans the cpu target times: all-FP32, all-INT8 and random mixes (int8 with p 0.2, 0.5, 0.8 in turn)."""
    rng = np.random.default_rng(seed)
    plans = {"0" * count, "1" * count}
    wanted = 2 + math.ceil(per_layer * count)
    index = 0
    while len(plans) < wanted and index < 50 * wanted:
        p = (0.2, 0.5, 0.8)[index % 3]
        plans.add("".join("1" if bit else "0" for bit in rng.random(count) < p))
        index += 1
    return sorted(plans)


def measured_like_the_profiler(latency_ms: dict[str, float]) -> dict[str, float]:
    """The ``measured`` dict the fit is given: the profiler caches ratios to FP32 and multiplies them back."""
    fp32_ms = latency_ms["0" * COUNT]
    cache = TimingCache(None, {"test": "fit"})
    for bits, value in latency_ms.items():
        cache.put(bits, Timing(value / fp32_ms, 0.0, 10))
    cache.put(REFERENCE, Timing(fp32_ms, 0.0, 30))
    return Profiler(None, cache, TimingSettings(), progress=False).measured(list(latency_ms))  # never deploys


def true_latency(bits: str) -> float:
    return float(design_row(bits) @ TRUTH)


def coefficients(fit) -> np.ndarray:
    return np.concatenate([[fit.base], fit.kappa, fit.transitions])


def test_the_design_identifies_every_coefficient():
    rows = np.stack([design_row(bits) for bits in target_samples(COUNT, seed=0)])
    assert np.linalg.matrix_rank(rows) == rows.shape[1] == 2 * COUNT  # base, 8 deltas, 7 transitions


def test_the_fit_recovers_base_deltas_and_transitions_from_noiseless_samples():
    samples = target_samples(COUNT, seed=0)
    measured = measured_like_the_profiler({bits: true_latency(bits) for bits in samples})
    fit = fit_additive(measured, COUNT, seed=0)
    assert fit.base == pytest.approx(BASE, abs=EXACT_MS)
    np.testing.assert_allclose(fit.kappa, KAPPA, rtol=0, atol=EXACT_MS)
    np.testing.assert_allclose(fit.transitions, TRANSITIONS, rtol=0, atol=EXACT_MS)
    for combo in itertools.product("01", repeat=COUNT):  # every plan, timed or not
        bits = "".join(combo)
        assert fit.predict(bits) == pytest.approx(true_latency(bits), abs=4 * EXACT_MS)
    assert fit.stats["max_rel_residual"] < 1e-5 and fit.stats["holdout_max_rel_error"] < 1e-5
    assert fit.stats["fp32_ms"] == pytest.approx(BASE) and fit.stats["int8_ms"] == pytest.approx(BASE + KAPPA.sum())


@pytest.mark.parametrize("seed", range(4))
def test_the_fit_stays_within_its_statistical_error_on_noisy_samples(seed):
    """2% multiplicative noise (a sample's ratio to FP32 off by 2%, as on a busy machine).

    Tolerance: ordinary least squares with noise of standard deviation at most ``sigma`` has
    coefficient standard deviations ``sigma * sqrt(diag((X'X)^-1))`` and a prediction at plan ``x``
    ``sigma * sqrt(x'(X'X)^-1 x)``; ``sigma = 2%`` of the slowest sample bounds every sample's. Each
    error must be within 4 of those: a 4-sigma miss has a chance of about 6e-5 per figure, the
    bounds ``T >= 0`` only pull estimates towards the truth here, and over 200 seeds the worst
    miss was 2.8 sigma. These are 0.5-0.8 ms on the coefficients and up to 2 ms on predictions of
    unseen plans with many precision changes: 26 samples for 16 unknowns is not many.
    """
    samples = target_samples(COUNT, seed=0)
    rows = np.stack([design_row(bits) for bits in samples])
    truth = {bits: true_latency(bits) for bits in samples}
    rng = np.random.default_rng(1000 + seed)
    noisy = {bits: value * (1 + 0.02 * rng.standard_normal()) for bits, value in truth.items()}
    fit = fit_additive(measured_like_the_profiler(noisy), COUNT, seed=0)

    sigma = 0.02 * max(truth.values())
    inverse = np.linalg.inv(rows.T @ rows)
    coefficient_sd = sigma * np.sqrt(np.diag(inverse))
    assert np.all(np.abs(coefficients(fit) - TRUTH) <= 4 * coefficient_sd)
    plans = np.stack([design_row("".join(combo)) for combo in itertools.product("01", repeat=COUNT)])
    prediction_sd = sigma * np.sqrt(np.einsum("ij,jk,ik->i", plans, inverse, plans))
    errors = plans @ coefficients(fit) - plans @ TRUTH
    assert np.all(np.abs(errors) <= 4 * prediction_sd)
    assert np.all(fit.transitions >= 0)


# ----------------------------------------------------------------------------- the ILP on cpu-like tables


def cpu_like_tables(seed: int) -> tuple[SensitivityTable, CostTable, list[str]]:
    """A table as the cpu target writes it: FP32 entries 0, integer options one delta per layer (one int8
    kernel), negative where int8 is faster, zero, or positive where it is slower; transitions 0 or positive."""
    rng = random.Random(seed)
    options = ["fp32", *rng.sample(["w8a8", "w4a8", "w2a8"], rng.randint(1, 2))]
    rng.shuffle(options)
    bits = {"fp32": 32, "w8a8": 8, "w4a8": 4, "w2a8": 2}
    names = [f"layer{i}" for i in range(rng.randint(3, 5))]
    costs: dict[str, dict[str, LayerCost]] = {}
    scores: dict[str, dict[str, float]] = {}
    int8_bytes: dict[str, float] = {}
    deltas = {name: rng.choice([0.0, -rng.uniform(0.05, 1.0), rng.uniform(0.01, 0.3)]) for name in names}
    for name in names:
        numel = rng.randint(16, 1024)
        int8_bytes[name] = float(numel)
        costs[name] = {
            option: LayerCost(
                weight_bytes=numel * bits[option] / 8,
                bops=float(numel * bits[option] * 8),
                latency_ms=0.0 if option == "fp32" else deltas[name],
                energy_mj=None,
                source="fitted",
            )
            for option in options
        }
        zero = rng.random() < 0.2  # a layer that loses nothing at any precision
        scores[name] = {
            option: 0.0 if option == "fp32" or zero else rng.uniform(0.05, 1.0) * 2.0 ** -(bits[option] / 2)
            for option in options
        }
    transitions = {name: rng.choice([0.0, 0.0, rng.uniform(0.01, 0.4)]) for name in names[:-1]}
    base = sum(-delta for delta in deltas.values() if delta < 0) + rng.uniform(0.2, 2.0)  # every plan takes > 0 ms
    table = CostTable(
        target="cpu",
        options=options,
        costs=costs,
        int8_weight_bytes=int8_bytes,
        transition_ms=transitions,
        base_latency_ms=base,
    )
    return SensitivityTable("kl", scores), table, options


def enumerate_plans(
    sens: SensitivityTable, costs: CostTable, options: list[str]
) -> list[tuple[dict[str, str], dict[str, float]]]:
    """Every plan with its totals, its latency as :meth:`CostTable.predicted_latency_ms` gives it."""
    plans = all_plans(sens, costs, options)
    for assignment, total in plans:
        assert total["latency"] == pytest.approx(costs.predicted_latency_ms(assignment), abs=1e-12)
        total["latency"] = costs.predicted_latency_ms(assignment)
    return plans


def test_the_tables_have_what_the_cpu_target_emits():
    entries = [
        cost.latency_ms
        for seed in range(24)
        for row in cpu_like_tables(seed)[1].costs.values()
        for option, cost in row.items()
        if option != "fp32"
    ]
    transitions = [value for seed in range(24) for value in cpu_like_tables(seed)[1].transition_ms.values()]
    assert min(entries) < 0 and 0.0 in entries and max(entries) > 0 and 0.0 in transitions


@pytest.mark.parametrize("seed", range(24))
def test_minimize_latency_under_a_sensitivity_budget_matches_brute_force(seed):
    sens, costs, options = cpu_like_tables(seed)
    plans = enumerate_plans(sens, costs, options)
    rng = random.Random(500 + seed)
    budgets = {"sensitivity_budget": rng.uniform(0.0, 1.05 * max(total["sensitivity"] for _, total in plans))}
    feasible = [total for _, total in plans if meets(total, budgets)]  # all-FP32 scores 0: never empty
    plan = solve(sens, costs, minimize="latency", **budgets)
    latency = costs.predicted_latency_ms(plan.assignment)
    best = min(total["latency"] for total in feasible)
    assert close(latency, best), (plan.assignment, latency, best)
    assert plan.predicted["latency_ms"] == pytest.approx(latency, rel=1e-12, abs=1e-12)
    sensitivity = math.fsum(sens.scores[name][option] for name, option in plan.assignment.items())
    assert sensitivity <= budgets["sensitivity_budget"] * (1 + 1e-9) + 1e-12
    fastest = [total["sensitivity"] for total in feasible if total["latency"] <= best + 1e-9]
    assert sensitivity <= min(fastest) + 1e-9  # ties in latency (one int8 kernel per layer) go to accuracy


@pytest.mark.parametrize("seed", range(24))
def test_minimize_sensitivity_under_a_latency_budget_matches_brute_force(seed):
    sens, costs, options = cpu_like_tables(seed)
    plans = enumerate_plans(sens, costs, options)
    rng = random.Random(900 + seed)
    latencies = [total["latency"] for _, total in plans]
    budgets = {"latency_budget": rng.uniform(0.9 * min(latencies), 1.05 * max(latencies))}
    feasible = [total for _, total in plans if meets(total, budgets)]
    if not feasible:
        with pytest.raises(InfeasibleBudgetError) as info:
            solve(sens, costs, minimize="sensitivity", **budgets)
        assert math.isclose(info.value.smallest_feasible["latency_budget"], min(latencies), rel_tol=1e-9)
        return
    plan = solve(sens, costs, minimize="sensitivity", **budgets)
    latency = costs.predicted_latency_ms(plan.assignment)
    assert latency <= budgets["latency_budget"] * (1 + 1e-9)
    sensitivity = math.fsum(sens.scores[name][option] for name, option in plan.assignment.items())
    assert close(sensitivity, min(total["sensitivity"] for total in feasible))
    assert plan.predicted["latency_ms"] == pytest.approx(latency, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------- the timing cache

QUICK = TimingSettings(warmup=1, min_repeats=3, max_repeats=20, max_seconds=0.02, rel_spread=0.05)


@pytest.mark.parametrize("median", [math.nan, 0.0, -1.0, math.inf, "fast"])
def test_a_cache_file_holding_a_timing_no_cost_can_rest_on_is_rebuilt(tmp_path, median):
    cache = TimingCache(tmp_path, {"cpu": "x"})
    cache.put("good", Timing(1.0, 0.01, 10))
    cache.put("bad", Timing(2.0, 0.01, 10))
    cache.save()
    assert cache.path is not None
    data = json.loads(cache.path.read_text())
    data["entries"]["bad"]["median_ms"] = median
    cache.path.write_text(json.dumps(data))  # NaN and Infinity are written as JSON's extensions: the file parses
    with pytest.warns(UserWarning, match="rebuilding"):
        again = TimingCache(tmp_path, {"cpu": "x"})
    assert len(again) == 0 and again.get("good") is None


def test_a_cache_file_with_an_infinite_spread_is_kept(tmp_path):
    cache = TimingCache(tmp_path, {"cpu": "x"})
    cache.put("few repeats", Timing(1.0, math.inf, 3))  # what the timer records below four repeats
    cache.save()
    assert TimingCache(tmp_path, {"cpu": "x"}).get("few repeats") == Timing(1.0, math.inf, 3)


def test_ratios_without_their_fp32_reference_are_dropped():
    cache = TimingCache(None, {"cpu": "x"})
    cache.put("0101", Timing(0.8, 0.01, 10))
    with pytest.warns(UserWarning, match="no FP32 reference"):
        Profiler(None, cache, QUICK, progress=False)  # never deploys until asked to time
    assert len(cache) == 0


@pytest.mark.parametrize("corruption", ["nan reference", "zero reference", "missing reference", "nan sample"])
def test_the_cpu_target_rebuilds_a_cache_that_parses_but_cannot_be_used(tmp_path, corruption):
    model = make_tiny_net()
    example = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    layers = trace_layers(model, example).layers
    target = CPUTarget(samples_per_layer=2, timing=QUICK, cache_dir=tmp_path, progress=False)
    path = target.costs(layers, model=model, example_inputs=example).meta["cache_file"]
    with open(path) as stream:
        data = json.load(stream)
    entries = data["entries"]
    sample = next(key for key in entries if key != REFERENCE)
    if corruption == "missing reference":
        del entries[REFERENCE]
    else:
        key = sample if corruption == "nan sample" else REFERENCE
        entries[key]["median_ms"] = 0.0 if corruption == "zero reference" else math.nan
    with open(path, "w") as stream:
        json.dump(data, stream)
    # Before the fix: NaN gave a table of NaN silently, 0 a ZeroDivisionError, a missing reference an AttributeError.
    with pytest.warns(UserWarning, match="rebuilding"):
        table = target.costs(layers, model=model, example_inputs=example)
    fit = table.meta["fit"]
    assert fit["measured_now"] == fit["samples"] and fit["from_cache"] == 0
    assert math.isfinite(table.base_latency_ms) and fit["fp32_ms"] > 0
    assert all(math.isfinite(cost.latency_ms) for row in table.costs.values() for cost in row.values())
    warm = target.costs(layers, model=model, example_inputs=example)  # the rebuilt file is good again
    assert warm.meta["fit"]["measured_now"] == 0
    scale = warm.meta["anchor"]["fp32_ms"] / table.meta["anchor"]["fp32_ms"]  # each call anchors afresh
    assert warm.base_latency_ms == pytest.approx(
        table.base_latency_ms * scale, rel=1e-3
    )  # lsq_linear stops at its own tolerance


def test_the_fit_keeps_close_to_the_uniform_plans_where_the_mixes_disagree_with_them(monkeypatch):
    # an all-INT8 graph faster than the sum of its parts (ORT fuses more when every layer is integer):
    # the additive model cannot fit it and the mixes alone; the uniform plans weigh more, so it stays close
    samples = target_samples(COUNT, seed=0)
    measured = {bits: true_latency(bits) for bits in samples}
    measured["1" * COUNT] -= 0.8
    weighted = fit_additive(measured, COUNT, seed=0)
    weighted_miss = abs(weighted.predict("1" * COUNT) - measured["1" * COUNT])
    monkeypatch.setattr(fit_module, "_weights", lambda keys, count: np.ones(len(keys)))
    plain = fit_additive(measured, COUNT, seed=0)
    plain_miss = abs(plain.predict("1" * COUNT) - measured["1" * COUNT])
    assert weighted_miss < 0.25 * 0.8 and weighted_miss < 0.5 * plain_miss
