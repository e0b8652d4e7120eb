"""``search``: the one place that runs the stages in order (layers -> costs -> synthetic -> MQE -> ILP)."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ohq_lightning.hardware import HardwareTarget, create_target
from ohq_lightning.layers import trace_layers
from ohq_lightning.plan import CostTable, LayerInfo, Option, QuantPlan, SensitivityTable, parse_options
from ohq_lightning.sensitivity import METHODS, MQE_METHODS, SensitivityProvider, mqe_sensitivity
from ohq_lightning.sensitivity_baselines import random_sensitivity, weight_error_sensitivity
from ohq_lightning.solver import best_of, check_budget_values, check_sensitivity_budget, solve
from ohq_lightning.synthetic import example_tensor, synthetic_inputs

__all__ = ["search", "validate_budgets"]

SYNTHETIC_KINDS = ("distilled", "gaussian")


def validate_budgets(
    *,
    compression_ratio: float | None = None,
    latency_budget: float | None = None,
    energy_budget: float | None = None,
    bops_budget: float | None = None,
    sensitivity_budget: float | str | None = None,
) -> dict[str, float | str]:
    """Check the budgets of :func:`search` and return the given ones by name.

    Each must be a finite number > 0, ``compression_ratio`` (plan weight bytes / weight bytes
    at uniform 8 bits) at most 1, and ``sensitivity_budget`` a finite number >= 0 or an option
    name (``"w8a8"``: no more total sensitivity than that option on every layer; returned in its
    canonical spelling).
    """
    given = check_budget_values(
        {
            "compression_ratio": compression_ratio,
            "latency_budget": latency_budget,
            "energy_budget": energy_budget,
            "bops_budget": bops_budget,
        }
    )
    ratio = given.get("compression_ratio")
    if ratio is not None and ratio > 1:
        raise ValueError(
            f"compression_ratio must be in (0, 1]: it is the plan's weight bytes over the weight bytes at uniform "
            f"8 bits (1.0 = INT8 size), got {ratio}"
        )
    if isinstance(sensitivity_budget, str):
        try:
            given["sensitivity_budget"] = Option.parse(sensitivity_budget).name
        except ValueError as error:
            raise ValueError(
                f"sensitivity_budget must be a number >= 0 or an option name such as 'w8a8' (no more total sensitivity "
                f"than that option everywhere), got {sensitivity_budget!r}: {error}"
            ) from error
    elif sensitivity_budget is not None:
        given["sensitivity_budget"] = check_sensitivity_budget(sensitivity_budget)
    return given


def _uniform_as_run(costs: CostTable, scores: SensitivityTable, option: str, options: Sequence[str]) -> dict[str, str]:
    """Every layer at ``option``, except where the target cannot run it: there the least sensitive option it can."""
    assignment = {}
    for layer in costs.layers:
        runnable = [name for name in options if costs.is_supported(layer, name)]
        if option in runnable or not runnable:
            assignment[layer] = option
        else:
            assignment[layer] = min(runnable, key=lambda name: scores.scores[layer][name])
    return assignment


def _resolve_sensitivity_budget(
    budgets: dict[str, Any], scores: SensitivityTable, options: Sequence[str], costs: CostTable
) -> None:
    """Turn ``sensitivity_budget="w8a8"`` into the total sensitivity of uniform w8a8 as the target runs it (in place).

    Layers the target cannot run at that option count at the option the uniform build falls back to
    (see :func:`_uniform_as_run`).
    """
    option = budgets.get("sensitivity_budget")
    if not isinstance(option, str):
        return
    if option not in options:
        raise ValueError(
            f"sensitivity_budget={option!r} bounds the plan by uniform {option}'s total sensitivity, but {option} is "
            f"not a candidate option here ({list(options)})"
        )
    assignment = _uniform_as_run(costs, scores, option, options)
    total = sum(scores.scores[layer][chosen] for layer, chosen in assignment.items())
    budgets["sensitivity_budget"] = total * (1 + 1e-9) + 1e-15  # the uniform plan itself must stay feasible


def _uniform_predictions(costs: CostTable, scores: SensitivityTable, options: Sequence[str]) -> dict[str, Any]:
    """Predicted latency and total sensitivity of every candidate option applied to every layer the target runs it on.

    ``fallback`` counts the layers kept at another option because the target cannot run them at this one.
    """
    found: dict[str, Any] = {}
    for option in options:
        assignment = _uniform_as_run(costs, scores, option, options)
        entry: dict[str, float] = {
            "sensitivity": sum(scores.scores[layer][chosen] for layer, chosen in assignment.items()),
            "fallback": sum(chosen != option for chosen in assignment.values()),
        }
        if all(costs.costs[layer][chosen].latency_ms is not None for layer, chosen in assignment.items()):
            entry["latency_ms"] = costs.predicted_latency_ms(assignment)
        found[option] = entry
    return found


def _baseline_scores(
    sensitivity: str | SensitivityTable | SensitivityProvider,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    options: Sequence[str],
    *,
    seed: int,
    progress: bool,
) -> SensitivityTable:
    """The sensitivity table of anything but MQE: a baseline by name, a given table, or a provider's."""
    if sensitivity == "weight_error":
        table = weight_error_sensitivity(model, layers, options, progress=progress)
    elif sensitivity == "random":
        table = random_sensitivity(layers, options, seed=seed)
    elif isinstance(sensitivity, SensitivityTable):
        table = sensitivity
    else:
        assert callable(sensitivity)
        table = sensitivity(model, layers, options)
        if not isinstance(table, SensitivityTable):
            raise ValueError(f"the sensitivity provider returned a {type(table).__name__}, not a SensitivityTable")
    missing = [
        (layer.name, option) for layer in layers for option in options if option not in table.scores.get(layer.name, {})
    ]
    if missing:
        raise ValueError(
            f"the sensitivity table ({table.method!r}) has no score for {len(missing)} layer/option pairs the search "
            f"needs, e.g. {missing[:4]}: it must cover every quantizable layer at every candidate option"
        )
    return table


def _check_mqe_inputs(example_inputs: Any) -> None:
    """Fail before any work when MQE cannot make synthetic inputs for this model, and say what can be used."""
    try:
        example_tensor(example_inputs)
    except ValueError as error:
        raise ValueError(
            f"MQE scores layers on synthetic inputs: {error}. For such a model use sensitivity='weight_error' "
            "(data-free, no forward pass) or pass a SensitivityTable (e.g. hessian_sensitivity on real batches)"
        ) from error


def search(
    model: nn.Module,
    example_inputs: Any,
    *,
    target: str | HardwareTarget = "analytical",
    compression_ratio: float | None = None,
    latency_budget: float | None = None,
    energy_budget: float | None = None,
    bops_budget: float | None = None,
    options: Sequence[str] | None = None,
    sensitivity: str | SensitivityTable | SensitivityProvider = "quantize",
    synthetic: str = "distilled",
    num_samples: int = 8,
    distill_steps: int = 20,
    sensitivity_budget: float | str | None = None,
    minimize: str = "sensitivity",
    tie_groups: Sequence[Sequence[str]] = (),
    cost_weight: float = 0.0,
    refine_rounds: int = 6,
    seed: int = 0,
    cache_dir: str | Path | bool | None = None,
    progress: bool = True,
) -> QuantPlan:
    """Choose one option per layer of ``model``, data-free, under the given budgets.

    Runs, in order: layer discovery (one traced forward of ``example_inputs``), the target's cost
    table, synthetic inputs, MQE sensitivities, and the ILP. The model is not modified.

    Args:
        model: a float model (e.g. a timm model).
        example_inputs: an input the model runs on (a tensor, a tuple of arguments or a dict of keywords).
        target: a hardware target name (``"analytical"``) or a :class:`~ohq_lightning.hardware.HardwareTarget`.
        compression_ratio: weight bytes of the plan / weight bytes at uniform 8 bits, in (0, 1].
        latency_budget: total predicted latency of the quantizable layers, ms.
        energy_budget: total predicted energy, mJ.
        bops_budget: total bit operations.
        options: candidate options (default: the target's), e.g. ``["w8a8", "w4a8", "w2a8"]``.
        sensitivity: a name from :data:`~ohq_lightning.sensitivity.METHODS`: MQE's ``"quantize"`` or
            ``"random_mask"`` reading, or a data-free baseline (``"weight_error"``, ``"random"``; see
            :mod:`ohq_lightning.sensitivity_baselines`); or a precomputed
            :class:`~ohq_lightning.plan.SensitivityTable` covering every layer and option; or a provider
            called as ``sensitivity(model, layers, options)`` that returns one (e.g. the Hessian baseline
            with its data). Synthetic inputs are made only for MQE.
        synthetic: ``"distilled"`` (BatchNorm-statistics matching) or ``"gaussian"``.
        num_samples: synthetic inputs used by MQE.
        distill_steps: optimisation steps of the distilled inputs.
        sensitivity_budget: total MQE sensitivity must not exceed this (>= 0), or an option name:
            ``"w8a8"`` allows no more total sensitivity than uniform ``w8a8`` (use it with
            ``minimize="latency"``: the fastest plan estimated to be as accurate as uniform INT8).
            Layers the target cannot run at that option count at the least sensitive option it can.
        minimize: ``"sensitivity"`` (default) or ``"latency"`` (needs a budget, e.g. ``sensitivity_budget``).
        tie_groups: groups of layer names that must share one option.
        cost_weight: weight of the target's latency in the objective (0: sensitivity only).
        refine_rounds: with a target that measures plans (``cpu``): up to this many times, time the
            plan picked end to end, refit the costs with it and solve again, until the plan picked
            is one that was measured (``plan.meta["plan_measured"]``). If the picks still change
            after that many rounds (``plan.meta["refinement_settled"]`` False), the best plan it
            timed is returned, priced by the latest fit.
        seed: seed of everything random in the search.
        cache_dir: cache of synthetic inputs (``False`` disables it).
        progress: show progress bars.

    Returns:
        A :class:`~ohq_lightning.plan.QuantPlan`; ``plan.meta`` records the stages' timings, the
        layers left in float and why, and the settings.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> plan = search(model, torch.randn(1, 3, 64, 64), compression_ratio=0.6, progress=False)  # doctest: +SKIP
        >>> plan.predicted["size_ratio"] <= 0.6  # doctest: +SKIP
        True
    """
    budgets = validate_budgets(
        compression_ratio=compression_ratio,
        latency_budget=latency_budget,
        energy_budget=energy_budget,
        bops_budget=bops_budget,
        sensitivity_budget=sensitivity_budget,
    )
    if isinstance(sensitivity, str):
        if sensitivity not in METHODS:
            raise ValueError(f"unknown sensitivity method {sensitivity!r}; use one of {METHODS}")
    elif not isinstance(sensitivity, SensitivityTable) and not callable(sensitivity):
        raise ValueError(
            f"sensitivity must be a method name ({METHODS}), a SensitivityTable or a provider "
            f"(model, layers, options) -> SensitivityTable, got {type(sensitivity).__name__}"
        )
    uses_mqe = isinstance(sensitivity, str) and sensitivity in MQE_METHODS
    if uses_mqe:
        _check_mqe_inputs(example_inputs)
    if synthetic not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic input kind {synthetic!r}; use one of {SYNTHETIC_KINDS}")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    hardware = create_target(target)
    option_names = [o.name for o in parse_options(hardware.options if options is None else options)]

    timings: dict[str, float] = {}
    started = time.perf_counter()
    trace = trace_layers(model, example_inputs)
    timings["layers"] = time.perf_counter() - started

    started = time.perf_counter()
    costs = hardware.costs(trace.layers, option_names, model=model, example_inputs=example_inputs)
    timings["costs"] = time.perf_counter() - started

    started = time.perf_counter()
    if uses_mqe:
        inputs = synthetic_inputs(
            model,
            example_inputs,
            kind=synthetic,
            num_samples=int(num_samples),
            seed=seed,
            steps=distill_steps,
            cache_dir=cache_dir,
            progress=progress,
        )
        timings["synthetic"] = time.perf_counter() - started
        started = time.perf_counter()
        scores = mqe_sensitivity(
            model, inputs, trace.layers, option_names, method=str(sensitivity), seed=seed, progress=progress
        )
    else:
        scores = _baseline_scores(sensitivity, model, trace.layers, option_names, seed=seed, progress=progress)
    timings["sensitivity"] = time.perf_counter() - started

    budget_from = budgets.get("sensitivity_budget") if isinstance(budgets.get("sensitivity_budget"), str) else None
    _resolve_sensitivity_budget(budgets, scores, option_names, costs)
    settings = dict(minimize=minimize, tie_groups=tie_groups, cost_weight=cost_weight, options=option_names, **budgets)
    solve_plan = functools.partial(solve, scores, **settings)
    started = time.perf_counter()
    plan = solve_plan(costs)
    timings["solve"] = time.perf_counter() - started

    measured: list[dict[str, str]] = []
    settled = True
    if getattr(hardware, "measures_plans", False):
        started = time.perf_counter()
        for _ in range(refine_rounds):  # measure the plan picked, refit, pick again, until it was measured
            if plan.assignment in measured:
                break
            measured.append(dict(plan.assignment))
            costs = hardware.costs(  # type: ignore[call-arg]
                trace.layers, option_names, model=model, example_inputs=example_inputs, measure_also=measured
            )
            plan = solve_plan(costs)
        settled = plan.assignment in measured
        if not settled:  # the last pick was never timed: keep the best plan that was, priced by the latest fit
            plan = best_of(measured, scores, costs, **settings) or plan
        timings["refine"] = time.perf_counter() - started

    infos = {layer.name: layer for layer in trace.layers}
    for row in plan.layers:
        info = infos[row["name"]]
        row.update(
            type=info.type.rsplit(".", 1)[-1],
            kind=info.kind,
            in_shape=info.in_shape,
            out_shape=info.out_shape,
            macs=info.macs,
            scores=dict(scores.scores[row["name"]]),
        )
    plan.meta.update(
        timings_s=timings,
        skipped_layers=dict(trace.skipped),
        sensitivity_method=scores.method,
        synthetic=synthetic if uses_mqe else None,
        num_samples=int(num_samples) if uses_mqe else None,
        seed=seed,
        cost_source=costs.meta.get("source", ""),
        plan_measured=plan.assignment in measured,
        refinement_settled=settled,
        plans_measured_in_refinement=len(measured),
        uniform=_uniform_predictions(costs, scores, option_names),
    )
    if budget_from is not None:
        plan.meta["sensitivity_budget_from"] = f"uniform {budget_from}"
    return plan
