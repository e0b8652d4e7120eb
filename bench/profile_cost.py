"""Profile cost and trustworthy milliseconds: what one cold latency search costs, and how its predictions hold.

For each model (timm, random init, 1x3xSIZExSIZE), one cold ``search(model, example, target=CPUTarget(...),
minimize="latency", sensitivity_budget="w8a8")`` -- the default objective: the fastest plan with total MQE
sensitivity no worse than uniform INT8's, options fp32/w8a8/w4a8/w2a8 on ONNX Runtime -- in a fresh
temporary cache (profile and synthetic inputs alike) unless ``--cache-dir`` is given. It reports:

- the profile: its seconds (the cpu target's ``meta["profile_s"]`` of the search's first cost table),
  the graphs timed, the FP32 milliseconds of the fit, and the profile's cost in FP32 inferences per
  layer (profile seconds / (layers x FP32 seconds)); the refinement's own cost tables separately;
- the whole search's seconds by stage (``plan.meta["timings_s"]``);
- predicted against measured milliseconds of uniform FP32, uniform INT8 and the plan, deployed on
  ONNX Runtime right after the search (Gaussian calibration inputs) and timed call by call in turn;
  ``prediction_error`` is predicted / measured - 1, ``ratio_prediction_error`` the same for each
  build's time relative to FP32 (which a drift of the whole machine leaves alone);
- the plan's measured latency over the limit (``plan.meta["latency_limit_ms"]``: the table's base plus
  each layer at its fastest option, no transition paid), and the search's fastest-measured guard.

Prints one JSON object. Issue [profile]'s targets (1 thread, cold, 224): MobileNetV3-large profile
<= 160 FP32 inferences per layer, whole search <= 60 s, every prediction within +-10%.

    python bench/profile_cost.py [--models resnet18 mobilenetv3_large_100] [--size 224] [--threads 1]
        [--cache-dir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import timm
import torch

from ohq_lightning import search
from ohq_lightning.deploy import deploy_plan, deploy_uniform, measure_latency
from ohq_lightning.hardware import CPUTarget, set_threads
from ohq_lightning.plan import CostTable, LayerInfo, QuantPlan

RUNTIME = "onnxruntime"
FIT_KEYS = ("samples", "measured_now", "from_cache", "retimed", "fp32_ms", "int8_ms", "median_rel_residual")
NOTES = (
    "profile: the search's first cost table (its meta, recorded by a CPUTarget subclass that only keeps each "
    "table's meta; the search itself is unchanged and cold); refinement: the cost tables refitted with the plans "
    "the search timed; stage_seconds: the search's own plan.meta['timings_s'] ('costs' holds the profile, 'refine' "
    "the refinement, 'uniform_guard' the interleaved timing of the pick beside uniform builds); measured: "
    "deployed after the search and timed interleaved"
)


@dataclass(frozen=True)
class RecordingCPUTarget(CPUTarget):
    """The cpu target, keeping the meta of every cost table it returns (in order; a copy made by
    ``with_progress`` shares the list), so the bench reads the profile a cold search really ran."""

    tables: list[dict[str, Any]] = field(default_factory=list, compare=False, repr=False)

    def costs_with_plans(
        self,
        layers: Sequence[LayerInfo],
        options: Sequence[str] | None = None,
        *,
        model: Any,
        example_inputs: Any,
        plans: Sequence[Mapping[str, str]],
    ) -> CostTable:
        """The cpu target's table; its meta is recorded with the number of whole plans timed beside it."""
        table = super().costs_with_plans(layers, options, model=model, example_inputs=example_inputs, plans=plans)
        self.tables.append({"plans": len(plans), **table.meta})
        return table


def table_summary(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What one cost table's profiling did: its seconds and the graphs it timed, fitted or read from cache."""
    fit = meta["fit"]
    picked = {key: fit[key] for key in FIT_KEYS if key in fit}
    return {"profile_s": round(meta["profile_s"], 2), **{k: round(v, 4) for k, v in picked.items()}}


def profile_summary(tables: Sequence[Mapping[str, Any]], layers: int) -> dict[str, Any]:
    """The first table's profile, its cost in FP32 inferences per layer, and the refinement tables beside it."""
    first = tables[0]
    fp32_s = first["fit"]["fp32_ms"] / 1e3
    return {
        **table_summary(first),
        "layers": layers,
        "fp32_inferences_per_layer": round(first["profile_s"] / (layers * fp32_s), 1),
        "cache_file": first.get("cache_file"),
        "refinement": [table_summary(meta) | {"plans_timed": meta["plans"]} for meta in tables[1:]],
    }


def measure_builds(model: torch.nn.Module, plan: QuantPlan, example: torch.Tensor, threads: int, repeats: int) -> dict:
    """Uniform FP32, uniform INT8 and the plan deployed on ONNX Runtime and timed interleaved: median ms each."""
    calibration = [torch.randn(2, *example.shape[1:])]
    kwargs = {"runtime": RUNTIME, "calibration_inputs": calibration, "threads": threads}
    deployed = {
        "fp32": deploy_uniform(model, "fp32", example, **kwargs),
        "int8": deploy_uniform(model, "w8a8", example, **kwargs),
        "plan": deploy_plan(model, plan, example, **kwargs),
    }
    timings = measure_latency(list(deployed.values()), example, rounds=repeats)
    return {key: timing.median_ms for key, timing in zip(deployed, timings, strict=True)}


def predictions(plan: QuantPlan, measured: Mapping[str, float]) -> dict[str, Any]:
    """Predicted (the plan's table) against measured ms, their errors, and the plan over the latency limit."""
    uniform = plan.meta["uniform"]
    predicted = {
        "fp32": uniform["fp32"].get("latency_ms"),
        "int8": uniform["w8a8"].get("latency_ms"),
        "plan": plan.predicted.get("latency_ms"),
    }
    limit = plan.meta.get("latency_limit_ms")
    known = {key: value for key, value in predicted.items() if value is not None}
    return {
        "measured_ms": {key: round(value, 4) for key, value in measured.items()},
        "predicted_ms": {key: None if value is None else round(value, 4) for key, value in predicted.items()},
        "prediction_error": {key: round(value / measured[key] - 1, 4) for key, value in known.items()},
        "ratio_prediction_error": {
            key: round((known[key] / known["fp32"]) / (measured[key] / measured["fp32"]) - 1, 4)
            for key in ("int8", "plan")
            if key in known and "fp32" in known
        },
        "plan_over_int8_measured": round(measured["plan"] / measured["int8"], 4),
        "plan_over_best_uniform_measured": round(measured["plan"] / min(measured["fp32"], measured["int8"]), 4),
        "latency_limit_ms": None if limit is None else round(limit, 4),
        "plan_measured_over_limit": None if not limit else round(measured["plan"] / limit, 4),
        "plan_predicted_over_limit": None if not limit or "plan" not in known else round(known["plan"] / limit, 4),
    }


def bench_model(name: str, size: int, threads: int, repeats: int, cache_dir: str) -> dict[str, Any]:
    """One cold search of ``name``, then its three builds deployed and timed; everything the issue asks for."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    example = torch.randn(1, 3, size, size)
    target = RecordingCPUTarget(threads=threads, cache_dir=cache_dir, progress=False)
    started = time.perf_counter()
    plan = search(
        model,
        example,
        target=target,
        minimize="latency",
        sensitivity_budget="w8a8",
        cache_dir=cache_dir,
        progress=False,
    )
    search_s = time.perf_counter() - started
    started = time.perf_counter()
    measured = measure_builds(model, plan, example, threads, repeats)
    return {
        "profile": profile_summary(target.tables, len(plan.assignment)),
        "search_s": round(search_s, 2),
        "stage_seconds": {stage: round(seconds, 3) for stage, seconds in plan.meta["timings_s"].items()},
        **predictions(plan, measured),
        "deploy_and_time_s": round(time.perf_counter() - started, 1),
        "plan_option_counts": plan.option_counts(),
        "fastest_measured": plan.meta.get("fastest_measured"),
        "refinement_settled": plan.meta.get("refinement_settled"),
        "plans_measured_in_refinement": plan.meta.get("plans_measured_in_refinement"),
        "plan_measured": plan.meta.get("plan_measured"),
        "latency_anchor": plan.meta.get("latency_anchor"),
        "runtime_version": target.tables[0].get("runtime_version"),
    }


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``bench_model`` in ``--cache-dir`` if given, else in a fresh temporary directory (a cold search)."""
    if args.cache_dir:
        return bench_model(name, args.size, args.threads, args.repeats, args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="ohq_profile_cost_") as cache_dir:
        return bench_model(name, args.size, args.threads, args.repeats, cache_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv3_large_100"])
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="reuse this cache (default: a fresh one per model)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the final timing")
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    models = {name: run_model(name, args) for name in args.models}
    report = {
        "bench": "profile_cost",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "torch": torch.__version__,
        "runtime": RUNTIME,
        "input": [1, 3, args.size, args.size],
        "objective": 'search(target=CPUTarget(threads), minimize="latency", sensitivity_budget="w8a8")',
        "cache": args.cache_dir or "fresh temporary directory per model (cold)",
        "notes": NOTES,
        "models": models,
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
