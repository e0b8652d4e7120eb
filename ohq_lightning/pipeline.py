"""``search``: the one place that runs the stages in order (layers -> costs -> sensitivity -> ILP -> refinement).

Each stage is a call into its own package (``layers``, ``hardware``, ``sensitivity``, ``solver``); this
module only orders them, times them and records what they did in the plan's ``meta``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ohq_lightning._util.timing import stage_seconds
from ohq_lightning.config import DEFAULT_ACCURACY_BOUND, Budgets, SearchConfig, settings_from
from ohq_lightning.hardware import (
    HardwareTarget,
    PlanMeasuringTarget,
    PlanTimingTarget,
    ShowsProgress,
    create_target,
)
from ohq_lightning.layers import LayerTrace, trace_layers
from ohq_lightning.plan import CostTable, QuantPlan, SensitivityTable, parse_options
from ohq_lightning.sensitivity import compute_sensitivity
from ohq_lightning.sensitivity.synthetic import example_tensor
from ohq_lightning.solver import best_of, check_bound_option, solve, uniform_as_run

__all__ = ["search"]


def _check_bound_option(budgets: Budgets, given: Budgets, options: Sequence[str]) -> None:
    """Fail before any work when the sensitivity bound names an option that is not a candidate."""
    if given.sensitivity_budget is None and budgets.sensitivity_budget not in (None, *options):
        raise ValueError(  # the default bound of minimising latency: say where it came from
            f"minimising latency with no sensitivity_budget bounds the plan by uniform {DEFAULT_ACCURACY_BOUND}'s "
            f"total sensitivity, but {DEFAULT_ACCURACY_BOUND} is not a candidate option here ({list(options)}): "
            "give a sensitivity_budget or a resource budget, or add it to the options"
        )
    check_bound_option(budgets, options)


def _check_mqe_inputs(example_inputs: Any) -> None:
    """Fail before any work when MQE cannot make synthetic inputs for this model, and say what can be used."""
    try:
        example_tensor(example_inputs)
    except ValueError as error:
        raise ValueError(
            f"MQE scores layers on synthetic inputs: {error}. For such a model use sensitivity='weight_error' "
            "(data-free, no forward pass) or pass a SensitivityTable (e.g. hessian_sensitivity on real batches)"
        ) from error


@dataclasses.dataclass
class _Problem:
    """What the solve and refinement stages share: the tables, the options and the objective."""

    scores: SensitivityTable
    costs: CostTable
    options: list[str]
    minimize: str
    budgets: Budgets
    config: SearchConfig

    def solve(self, costs: CostTable | None = None) -> QuantPlan:
        """The ILP's plan under ``costs`` (default: the first cost table)."""
        return solve(self.scores, costs or self.costs, budgets=self.budgets, **self.solve_settings())

    def solve_settings(self) -> dict[str, Any]:
        """The keywords :func:`~ohq_lightning.solver.solve` and ``best_of`` share, besides the budgets."""
        return dict(
            minimize=self.minimize,
            tie_groups=self.config.tie_groups,
            cost_weight=self.config.cost_weight,
            options=self.options,
        )


@dataclasses.dataclass
class _Refinement:
    """What refinement ends with: the plan, the costs of the latest fit, the plans timed, and whether picks settled."""

    plan: QuantPlan
    costs: CostTable
    measured: list[dict[str, str]]
    settled: bool


def _refine(
    hardware: PlanMeasuringTarget,
    problem: _Problem,
    plan: QuantPlan,
    trace: LayerTrace,
    model: nn.Module,
    example_inputs: Any,
) -> _Refinement:
    """Time the plan picked end to end, refit the costs with it and solve again, until a timed plan is picked.

    An optimiser is drawn to exactly the layers whose fitted costs are too optimistic, so its first pick
    is the plan most worth timing. When the picks have not settled after ``refine_rounds``, the result
    is the best plan that was timed, priced by the latest fit: never one no timing has checked.
    """
    measured: list[dict[str, str]] = []
    costs = problem.costs
    for _ in range(problem.config.refine_rounds):
        if plan.assignment in measured:
            break
        measured.append(dict(plan.assignment))
        costs = hardware.costs_with_plans(
            trace.layers, problem.options, model=model, example_inputs=example_inputs, plans=measured
        )
        plan = problem.solve(costs)
    settled = plan.assignment in measured
    if not settled:
        plan = best_of(measured, problem.scores, costs, budgets=problem.budgets, **problem.solve_settings()) or plan
    return _Refinement(plan, costs, measured, settled)


def _uniform_rivals(problem: _Problem, costs: CostTable, plan: QuantPlan) -> dict[str, dict[str, str]]:
    """The uniform builds (each option as the target runs it) that meet the budgets by ``costs``, by name."""
    rivals: dict[str, dict[str, str]] = {}
    for option in problem.options:
        uniform = uniform_as_run(costs, problem.scores, option, problem.options)
        if uniform == plan.assignment or uniform in rivals.values():
            continue
        if best_of([uniform], problem.scores, costs, budgets=problem.budgets, **problem.solve_settings()) is not None:
            rivals[f"uniform {option}"] = uniform
    return rivals


def _fastest_measured(
    hardware: PlanTimingTarget,
    problem: _Problem,
    refined: _Refinement,
    trace: LayerTrace,
    model: nn.Module,
    example_inputs: Any,
) -> tuple[QuantPlan, dict[str, Any]]:
    """The pick, or a uniform build that meets the same budgets and measured faster beside it.

    The pick and its rivals are timed end to end in one interleaved run; a rival that wins is
    returned priced by the latest fit. The record says what was timed, which won and by how much.
    """
    rivals = _uniform_rivals(problem, refined.costs, refined.plan)
    if not rivals:
        return refined.plan, {}
    candidates = {"plan": dict(refined.plan.assignment), **rivals}
    timed = hardware.time_plans(trace.layers, list(candidates.values()), model=model, example_inputs=example_inputs)
    measured_ms = dict(zip(candidates, (float(ms) for ms in timed), strict=True))
    winner = min(measured_ms, key=measured_ms.__getitem__)
    record = {
        "measured_ms": measured_ms,
        "winner": winner,
        "plan_over_winner": measured_ms["plan"] / measured_ms[winner],
    }
    if winner == "plan":
        return refined.plan, record
    settings = problem.solve_settings()
    plan = best_of([candidates[winner]], problem.scores, refined.costs, budgets=problem.budgets, **settings)
    assert plan is not None  # it met the budgets when it was chosen as a rival
    return plan, record


def _uniform_predictions(costs: CostTable, scores: SensitivityTable, options: Sequence[str]) -> dict[str, Any]:
    """Predicted latency and total sensitivity of every option applied to every layer the target runs it on.

    ``fallback`` counts the layers kept at another option because the target cannot run them at this one.
    """
    found: dict[str, Any] = {}
    for option in options:
        assignment = uniform_as_run(costs, scores, option, options)
        entry: dict[str, float] = {
            "sensitivity": sum(scores.scores[layer][chosen] for layer, chosen in assignment.items()),
            "fallback": sum(chosen != option for chosen in assignment.values()),
        }
        if all(costs.costs[layer][chosen].latency_ms is not None for layer, chosen in assignment.items()):
            entry["latency_ms"] = costs.predicted_latency_ms(assignment)
        found[option] = entry
    return found


def _latency_limit(costs: CostTable, options: Sequence[str]) -> float | None:
    """What the device allows by the table: the base plus each layer at its fastest runnable option, no
    transition paid (no plan can beat it; a plan's distance to it is what mixing still could win)."""
    fastest = []
    for layer in costs.layers:
        runnable = [costs.costs[layer][o].latency_ms for o in options if costs.is_supported(layer, o)]
        if not runnable or any(ms is None for ms in runnable):
            return None
        fastest.append(min(runnable))
    return (costs.base_latency_ms or 0.0) + sum(fastest)


def _describe_rows(plan: QuantPlan, trace: LayerTrace, scores: SensitivityTable) -> QuantPlan:
    """The plan with each row carrying its layer's type, shapes, MACs and scores (a new plan; rows are frozen)."""
    infos = {layer.name: layer for layer in trace.layers}
    rows = [
        dataclasses.replace(
            row,
            type=infos[row.name].type.rsplit(".", 1)[-1],
            kind=infos[row.name].kind,
            in_shape=infos[row.name].in_shape,
            out_shape=infos[row.name].out_shape,
            macs=infos[row.name].macs,
            scores=dict(scores.scores[row.name]),
        )
        for row in plan.layers
    ]
    return dataclasses.replace(plan, layers=rows)


def search(
    model: nn.Module,
    example_inputs: Any,
    *,
    target: str | Mapping[str, Any] | HardwareTarget = "analytical",
    budgets: Budgets | None = None,
    config: SearchConfig | None = None,
    cache_dir: str | Path | bool | None = None,
    progress: bool = True,
    **settings: Any,
) -> QuantPlan:
    """Choose one option per layer of ``model``, data-free, under the given budgets.

    Runs, in order: layer discovery (one traced forward of ``example_inputs``), the target's cost
    table, the sensitivity table (MQE on synthetic inputs by default), the ILP, and, with a target
    that times whole plans (``cpu``), refinement: time the plan picked, refit, solve again. The model
    is not modified.

    Args:
        model: a float model (e.g. a timm model).
        example_inputs: an input the model runs on (a tensor, a tuple of arguments or a dict of keywords).
        target: a target name (``"analytical"``, ``"cpu"``...), a config dict with a ``"name"`` key, or a
            :class:`~ohq_lightning.hardware.HardwareTarget`.
        budgets: a :class:`~ohq_lightning.config.Budgets`; or give its fields as keywords
            (``compression_ratio=0.6``, ``latency_budget=5.0``, ``sensitivity_budget="w8a8"``...).
        config: a :class:`~ohq_lightning.config.SearchConfig`; or give its fields as keywords
            (``options``, ``sensitivity``, ``synthetic``, ``num_samples``, ``distill_steps``,
            ``minimize``, ``tie_groups``, ``cost_weight``, ``refine_rounds``, ``seed``). With the default
            ``minimize="auto"``, a resource budget means "least sensitivity under it", and no budget means
            "the fastest plan no more sensitive than uniform INT8".
        cache_dir: cache of synthetic inputs (``False`` disables it).
        progress: show progress bars.

    Returns:
        A :class:`~ohq_lightning.plan.QuantPlan`; ``plan.meta`` records the stages' timings, the layers
        left in float and why, and the settings.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> plan = search(model, torch.randn(1, 3, 64, 64), compression_ratio=0.6, progress=False)  # doctest: +SKIP
        >>> plan.predicted["size_ratio"] <= 0.6  # doctest: +SKIP
        True
    """
    given, config = settings_from(budgets, config, settings, caller="search")
    minimize, budgets = config.objective(given)
    if config.uses_mqe:
        _check_mqe_inputs(example_inputs)
    hardware = create_target(target)
    if not progress and isinstance(hardware, ShowsProgress):
        hardware = hardware.with_progress(False)
    options = [o.name for o in parse_options(hardware.options if config.options is None else config.options)]
    _check_bound_option(budgets, given, options)
    timings: dict[str, float] = {}
    with stage_seconds(timings, "layers"):
        trace = trace_layers(model, example_inputs)
    with stage_seconds(timings, "costs"):
        costs = hardware.costs(trace.layers, options, model=model, example_inputs=example_inputs)
    scores = compute_sensitivity(
        config, model, example_inputs, trace.layers, options, cache_dir=cache_dir, progress=progress, timings=timings
    )
    problem = _Problem(scores, costs, options, minimize, budgets, config)
    with stage_seconds(timings, "solve"):
        plan = problem.solve()
    refined = _Refinement(plan, costs, [], settled=True)
    if isinstance(hardware, PlanMeasuringTarget) and config.refine_rounds > 0:
        with stage_seconds(timings, "refine"):
            refined = _refine(hardware, problem, plan, trace, model, example_inputs)
    plan, costs, measured = refined.plan, refined.costs, refined.measured
    guard: dict[str, Any] = {}
    if minimize == "latency" and isinstance(hardware, PlanTimingTarget):
        with stage_seconds(timings, "uniform_guard"):
            plan, guard = _fastest_measured(hardware, problem, refined, trace, model, example_inputs)
    plan = _describe_rows(plan, trace, scores)
    plan.meta.update(
        timings_s=timings,
        skipped_layers=dict(trace.skipped),
        sensitivity_method=scores.method,
        synthetic=config.synthetic if config.uses_mqe else None,
        num_samples=config.num_samples if config.uses_mqe else None,
        seed=config.seed,
        cost_source=costs.meta.get("source", ""),
        plan_measured=plan.assignment in measured or bool(guard),
        fastest_measured=guard or None,
        refinement_settled=refined.settled,
        plans_measured_in_refinement=len(measured),
        uniform=_uniform_predictions(costs, scores, options),
        latency_limit_ms=_latency_limit(costs, options),
        latency_anchor=costs.meta.get("anchor"),
    )
    return plan
