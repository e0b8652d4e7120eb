import itertools

import pytest
import torch
from conftest import same_state, state_snapshot
from torch import nn

import ohq_lightning as ohq
from ohq_lightning.config import Budgets

FAST = {"num_samples": 8, "distill_steps": 5, "progress": False}


def test_search_meets_the_compression_ratio_with_a_mixed_plan(tiny_net, tiny_input):
    before = state_snapshot(tiny_net)
    plan = ohq.search(tiny_net, tiny_input, compression_ratio=0.6, **FAST)
    assert plan.predicted["size_ratio"] <= 0.6 + 1e-9
    assert set(plan.assignment) == {"stem.0", "dw.0", "grouped.0", "fc"}
    assert len(set(plan.assignment.values())) > 1
    assert {"layers", "costs", "synthetic", "sensitivity", "solve"} <= set(plan.meta["timings_s"])
    assert plan.layers[0]["type"] == "Conv2d" and "scores" in plan.layers[0]
    assert plan.predicted["latency_ms"] > 0 and plan.budgets == {"compression_ratio": 0.6}
    assert same_state(tiny_net, before) and not ohq.quantized_layers(tiny_net)
    assert ohq.QuantPlan.from_json(plan.to_json()) == plan


def test_lowering_the_ratio_never_lowers_total_sensitivity(tiny_net, tiny_input):
    totals = [
        ohq.search(tiny_net, tiny_input, compression_ratio=r, synthetic="gaussian", **FAST).predicted["sensitivity"]
        for r in (1.0, 0.75, 0.5, 0.3)
    ]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(totals))
    assert totals[-1] > totals[0]


def test_searched_plan_applies_and_runs(tiny_net, tiny_input):
    plan = ohq.search(tiny_net, tiny_input, compression_ratio=0.5, options=["w8a8", "w4a8", "w2a8"], **FAST)
    ohq.apply_plan(tiny_net, plan)
    assert tiny_net(tiny_input).shape == (1, 10)
    assert {n: layer.option for n, layer in ohq.quantized_layers(tiny_net).items()} == plan.assignment


def test_infeasible_budget_names_the_smallest_feasible_ratio(tiny_net, tiny_input):
    with pytest.raises(ohq.InfeasibleBudgetError, match=r"smallest feasible compression_ratio is 0\.25") as info:
        ohq.search(tiny_net, tiny_input, compression_ratio=0.1, **FAST)
    assert info.value.smallest_feasible["compression_ratio"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compression_ratio": -0.5}, "compression_ratio must be a finite number > 0"),
        ({"compression_ratio": 0.0}, "compression_ratio must be a finite number > 0"),
        ({"compression_ratio": "0.5"}, "compression_ratio must be a finite number > 0"),
        ({"compression_ratio": float("nan")}, "finite number"),
        ({"latency_budget": -1.0}, "latency_budget must be a finite number > 0"),
        ({"options": ["w1a8", "w8a8"]}, "between 2 and 8"),
        ({"options": ["w9a8"]}, "between 2 and 8"),
        ({"options": ["int4"]}, "unknown option"),
        ({"sensitivity": "hessian"}, "sensitivity method"),
        ({"synthetic": "imagenet"}, "synthetic input kind"),
        ({"target": "fpga9000"}, "unknown hardware target"),
    ],
)
def test_bad_arguments_are_clear_errors_and_change_nothing(tiny_net, tiny_input, kwargs, message):
    tiny_net.train()
    before = state_snapshot(tiny_net)
    with pytest.raises(ValueError, match=message):
        ohq.search(tiny_net, tiny_input, **{**FAST, **kwargs})
    assert same_state(tiny_net, before) and tiny_net.training


def test_a_compression_ratio_above_one_lets_some_layers_stay_float(tiny_net, tiny_input):
    # 1.0 is INT8 size; a float layer weighs 4x its int8 bytes, so 1.5 buys fp32 for part of the weights
    plan = ohq.search(tiny_net, tiny_input, compression_ratio=1.5, options=["fp32", "w8a8", "w4a8"], **FAST)
    assert 1.0 < plan.predicted["size_ratio"] <= 1.5 + 1e-9
    assert "fp32" in plan.assignment.values()


def test_bad_models_and_inputs_are_clear_errors(tiny_net):
    with pytest.raises(ValueError, match="no quantizable layer"):
        ohq.search(nn.Sequential(nn.ReLU()), torch.randn(1, 3), **FAST)
    before = state_snapshot(tiny_net)
    with pytest.raises(ValueError, match="does not run"):
        ohq.search(tiny_net, torch.randn(1, 4, 16, 16), **FAST)
    assert same_state(tiny_net, before)


def test_a_custom_hardware_target_plugs_into_the_seam(tiny_net, tiny_input):
    class SlowLowBits(ohq.AnalyticalTarget):
        def cost(self, layer, option):
            cost = super().cost(layer, option)
            cost.latency_ms = 1.0 if option.name == "w8a8" else 3.0  # sub-8-bit is slower on this "device"
            cost.source = "table"
            return cost

    target = SlowLowBits(name="slow-low-bits", options=("w8a8", "w4a8"))
    assert isinstance(target, ohq.HardwareTarget)
    plan = ohq.search(tiny_net, tiny_input, target=target, latency_budget=4.5, **FAST)
    assert plan.target == "slow-low-bits" and plan.predicted["latency_ms"] <= 4.5
    assert list(plan.assignment.values()).count("w4a8") == 0


def test_search_can_minimise_latency_under_a_sensitivity_bound(tiny_net, tiny_input):
    accurate = ohq.search(tiny_net, tiny_input, compression_ratio=1.0, **FAST)
    bound = 2 * accurate.predicted["sensitivity"] + 1e-9
    fast = ohq.search(tiny_net, tiny_input, minimize="latency", sensitivity_budget=bound, **FAST)
    assert fast.predicted["sensitivity"] <= bound * (1 + 1e-9)
    assert fast.predicted["latency_ms"] <= accurate.predicted["latency_ms"] + 1e-12
    assert fast.meta["minimize"] == "latency" and fast.budgets["sensitivity_budget"] == bound


def test_search_measures_the_plans_it_picks_on_targets_that_can(tiny_net, tiny_input):
    calls = []

    class Remeasuring(ohq.AnalyticalTarget):
        def costs(self, layers, options=None, *, model=None, example_inputs=None):
            calls.append([])
            return super().costs(layers, options)

        def costs_with_plans(self, layers, options=None, *, model, example_inputs, plans):
            calls.append([dict(plan) for plan in plans])
            return super().costs(layers, options)

    plan = ohq.search(tiny_net, tiny_input, target=Remeasuring(), compression_ratio=0.6, refine_rounds=3, **FAST)
    assert calls[0] == [] and calls[1] == [plan.assignment]  # the first pick was measured, and picked again
    assert len(calls) == 2 and plan.meta["plan_measured"] is True and "refine" in plan.meta["timings_s"]
    plain = ohq.search(tiny_net, tiny_input, compression_ratio=0.6, **FAST)
    assert plain.meta["plan_measured"] is False and "refine" not in plain.meta["timings_s"]


def test_sensitivity_budget_named_by_an_option_bounds_by_that_uniform_plan(tiny_net, tiny_input):
    options = ["fp32", "w8a8", "w4a8"]
    plan = ohq.search(tiny_net, tiny_input, minimize="latency", sensitivity_budget="W8A8", options=options, **FAST)
    uniform = plan.meta["uniform"]
    assert set(uniform) == set(options) and uniform["fp32"]["sensitivity"] == 0.0
    assert plan.meta["sensitivity_budget_from"] == "uniform w8a8"
    assert plan.predicted["sensitivity"] <= uniform["w8a8"]["sensitivity"] * (1 + 1e-6)
    feasible_uniform = [uniform[option]["latency_ms"] for option in ("fp32", "w8a8")]  # w4a8 is over the budget
    assert plan.predicted["latency_ms"] <= min(feasible_uniform) + 1e-9
    with pytest.raises(ValueError, match="not a candidate option"):
        ohq.search(tiny_net, tiny_input, sensitivity_budget="w2a8", options=options, **FAST)
    with pytest.raises(ValueError, match="sensitivity_budget must be a number >= 0 or an option name"):
        Budgets(sensitivity_budget="int8")


def test_a_sensitivity_budget_by_option_counts_layers_the_target_cannot_run_there_at_their_fallback(
    tiny_net, tiny_input
):
    from ohq_lightning.plan import UNSUPPORTED

    class NoInt8Stem(ohq.AnalyticalTarget):
        stem = "stem.0"

        def cost(self, layer, option):
            cost = super().cost(layer, option)
            cost.latency_ms = 5.0 if option.is_float else 1.0
            if layer.name == self.stem and option.name == "w8a8":
                cost.source, cost.latency_ms = UNSUPPORTED, None
            return cost

    target = NoInt8Stem(options=("fp32", "w8a8", "w4a8"))
    plan = ohq.search(tiny_net, tiny_input, target=target, minimize="latency", sensitivity_budget="w8a8", **FAST)
    scores = {row["name"]: row["scores"] for row in plan.layers}
    assert scores[NoInt8Stem.stem]["w8a8"] > 0
    as_run = sum(row["w8a8"] for name, row in scores.items() if name != NoInt8Stem.stem)  # the stem falls back to fp32
    assert plan.budgets["sensitivity_budget"] == pytest.approx(as_run, rel=1e-6)
    uniform = plan.meta["uniform"]["w8a8"]
    assert uniform["fallback"] == 1 and uniform["sensitivity"] == pytest.approx(as_run, rel=1e-9)
    assert uniform["latency_ms"] > 0 and plan.assignment[NoInt8Stem.stem] != "w8a8"
    assert plan.predicted["sensitivity"] <= as_run * (1 + 1e-6)


class _Retimed(ohq.AnalyticalTarget):
    """A target that times plans: ``latency(option, timed)`` prices a layer's option, ``timed`` being
    how many of the plans timed so far ran that layer at that option."""

    def __init__(self, latency, **kwargs):
        super().__init__(options=("fp32", "w8a8"), **kwargs)
        self.latency = latency

    def costs(self, layers, options=None, *, model=None, example_inputs=None):
        return self.costs_with_plans(layers, options, model=model, example_inputs=example_inputs, plans=())

    def costs_with_plans(self, layers, options=None, *, model, example_inputs, plans):
        table = super().costs(layers, options)
        for name, row in table.costs.items():
            for option, cost in row.items():
                cost.latency_ms = self.latency(option, sum(plan[name] == option for plan in plans))
        return table


def test_an_unsettled_refinement_returns_the_best_plan_it_timed_priced_by_the_latest_fit(tiny_net, tiny_input):
    # every option of a plan once timed comes out 2.5 ms slower per layer than first predicted
    target = _Retimed(lambda option, timed: (1.0 if option == "w8a8" else 2.0) + 2.5 * timed)
    common = dict(target=target, minimize="latency", sensitivity_budget=1e9, **FAST)
    plan = ohq.search(tiny_net, tiny_input, refine_rounds=1, **common)
    layers = len(plan.assignment)
    # first pick: all int8 (1 ms a layer); timed, it costs 3.5, so the refit picks all fp32 (2 ms, never timed)
    assert set(plan.assignment.values()) == {"w8a8"}
    assert plan.meta["plan_measured"] is True and plan.meta["refinement_settled"] is False
    assert plan.predicted["latency_ms"] == pytest.approx(3.5 * layers)
    settled = ohq.search(tiny_net, tiny_input, refine_rounds=2, **common)  # fp32 timed too: back to int8
    assert settled.meta["refinement_settled"] is True and set(settled.assignment.values()) == {"w8a8"}


def test_an_unsettled_refinement_under_a_latency_budget_keeps_only_timed_plans_that_still_meet_it(tiny_net, tiny_input):
    # int8 layers cost 1 ms until a plan using them is timed, then 3 ms; fp32 costs 2 ms
    target = _Retimed(lambda option, timed: 2.0 if option == "fp32" else (3.0 if timed else 1.0))
    layers = len(ohq.trace_layers(tiny_net, tiny_input).layers)
    budget = 1.6 * layers  # the first pick runs some layers in int8; once timed, it is over the budget
    plan = ohq.search(tiny_net, tiny_input, target=target, latency_budget=budget, refine_rounds=1, **FAST)
    assert plan.meta["refinement_settled"] is False and plan.meta["plans_measured_in_refinement"] == 1
    assert plan.meta["plan_measured"] is False  # no timed plan meets the budget any more: the last pick stands
    assert plan.predicted["latency_ms"] <= budget


def test_the_default_accuracy_bound_is_checked_against_the_options_before_any_work(tiny_net, tiny_input, monkeypatch):
    import ohq_lightning.pipeline as pipeline

    monkeypatch.setattr(pipeline, "trace_layers", lambda *args: pytest.fail("traced before the settings were checked"))
    with pytest.raises(ValueError, match=r"no sensitivity_budget bounds the plan by uniform w8a8.*not a candidate"):
        ohq.search(tiny_net, tiny_input, options=["fp32", "w4a8"], **FAST)  # minimize=auto, no budget
    with pytest.raises(ValueError, match=r"sensitivity_budget='w2a8' bounds .* not a candidate"):
        ohq.search(tiny_net, tiny_input, sensitivity_budget="w2a8", options=["fp32", "w4a8"], **FAST)


def test_no_refinement_rounds_means_no_refinement(tiny_net, tiny_input):
    calls = []

    class Timing(_Retimed):
        def costs_with_plans(self, layers, options=None, *, model, example_inputs, plans):
            calls.append(list(plans))
            return super().costs_with_plans(layers, options, model=model, example_inputs=example_inputs, plans=plans)

    target = Timing(lambda option, timed: 1.0 if option == "w8a8" else 2.0)
    plan = ohq.search(tiny_net, tiny_input, target=target, sensitivity_budget=1e9, refine_rounds=0, **FAST)
    assert calls == [[]]  # only the profile itself, no plan timed
    assert plan.meta["refinement_settled"] is True and "refine" not in plan.meta["timings_s"]


class _Stopwatch(ohq.AnalyticalTarget):
    """A target whose fit says w4a8 layers cost 0.5 ms, w8a8 1 ms and fp32 2 ms, but whose stopwatch says
    ``measured(plan)``; it records what it was asked to time."""

    def __init__(self, measured, **kwargs):
        super().__init__(options=("fp32", "w8a8", "w4a8"), **kwargs)
        self.measured, self.timed = measured, []

    def cost(self, layer, option):
        cost = super().cost(layer, option)
        cost.latency_ms = 2.0 if option.is_float else option.weight_bits / 8
        return cost

    def time_plans(self, layers, plans, *, model, example_inputs):
        self.timed.append([dict(plan) for plan in plans])
        return [self.measured(plan) for plan in plans]


def test_a_uniform_build_that_meets_the_budgets_and_measures_faster_beats_the_pick(tiny_net, tiny_input):
    # the fit says all-w4a8 is fastest; the stopwatch says any mix with w4a8 is 3x slower than uniform w8a8
    target = _Stopwatch(lambda plan: 3.0 if "w4a8" in plan.values() else (1.0 if "w8a8" in plan.values() else 2.0))
    plan = ohq.search(tiny_net, tiny_input, target=target, minimize="latency", sensitivity_budget=1e9, **FAST)
    guard = plan.meta["fastest_measured"]
    assert guard["winner"] == "uniform w8a8" and guard["plan_over_winner"] == pytest.approx(3.0)
    assert set(plan.assignment.values()) == {"w8a8"} and plan.meta["plan_measured"] is True
    assert [len(plans) for plans in target.timed] == [3]  # the pick, uniform fp32 and uniform w8a8, in one run
    assert set(guard["measured_ms"]) == {"plan", "uniform fp32", "uniform w8a8"}


def test_the_pick_stays_when_it_measures_fastest_and_rivals_must_meet_the_budgets(tiny_net, tiny_input):
    target = _Stopwatch(lambda plan: 0.5 if "w4a8" in plan.values() else 2.0)
    plan = ohq.search(tiny_net, tiny_input, target=target, minimize="latency", sensitivity_budget=1e9, **FAST)
    assert plan.meta["fastest_measured"]["winner"] == "plan" and "w4a8" in plan.assignment.values()
    bounded = _Stopwatch(lambda plan: 0.1 if set(plan.values()) == {"fp32"} else 9.0)
    kept = ohq.search(tiny_net, tiny_input, target=bounded, compression_ratio=0.6, **FAST)  # minimises sensitivity
    assert bounded.timed == [] and kept.meta["fastest_measured"] is None  # no guard unless latency is the goal
    strict = _Stopwatch(lambda plan: 0.1 if set(plan.values()) == {"fp32"} else 9.0)
    fast = ohq.search(
        tiny_net, tiny_input, target=strict, minimize="latency", compression_ratio=0.6, sensitivity_budget=1e9, **FAST
    )
    # uniform fp32 and w8a8 break the size budget and uniform w4a8 is the pick itself: nothing to time
    assert strict.timed == [] and fast.meta["fastest_measured"] is None
    assert set(fast.assignment.values()) == {"w4a8"} and fast.predicted["size_ratio"] <= 0.6 + 1e-9


def test_progress_false_silences_the_targets_bars(tiny_net, tiny_input):
    asked = []

    class Chatty(ohq.AnalyticalTarget):
        def with_progress(self, enabled):
            asked.append(enabled)
            return self

    ohq.search(tiny_net, tiny_input, target=Chatty(), compression_ratio=0.6, **FAST)
    assert asked == [False]
    ohq.search(tiny_net, tiny_input, target=Chatty(), compression_ratio=0.6, **{**FAST, "progress": True})
    assert asked == [False]


def test_the_limit_is_each_layer_at_its_fastest_option_with_no_transition(tiny_net, tiny_input):
    target = _Stopwatch(lambda plan: 1.0)  # fit: w4a8 0.5 ms, w8a8 1 ms, fp32 2 ms per layer, no base
    plan = ohq.search(tiny_net, tiny_input, target=target, compression_ratio=0.6, **FAST)
    layers = len(plan.assignment)
    assert plan.meta["latency_limit_ms"] == pytest.approx(0.5 * layers)  # 4 layers x 0.5 ms
    assert plan.predicted["latency_ms"] >= plan.meta["latency_limit_ms"]
