"""What the Hydra job writes: ``report.json`` (every figure of the run), ``report.md``, ``plan.json`` and pictures.

Every figure in the report is measured in the run: accuracies on the test split of the data,
latencies by timing the deployed models on this machine, sizes from the weights. What is
predicted (the search's latency model) is labelled as such beside what was measured.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ohq_lightning.cli.config import JobConfig
from ohq_lightning.plan import QuantPlan
from ohq_lightning.report import format_plan_table, format_table, plot_accuracy_latency, plot_plan

__all__ = ["build_report", "summary_table", "write_reports"]


def build_report(
    cfg: JobConfig,
    *,
    data: dict[str, Any],
    plan: QuantPlan,
    results: dict[str, dict[str, Any]],
    objective: dict[str, Any],
    runtime: str,
    threads: int,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """The report of a job (what ``report.json`` holds) from its config, data description, plan and results."""
    return {
        "model": cfg.model.name,
        "weights": cfg.model.checkpoint
        or ("timm pretrained" if cfg.model.pretrained else f"trained here ({cfg.train.epochs} epochs)"),
        "data": data,
        "hardware": dict(cfg.hardware),
        "cost_source": plan.meta.get("cost_source", ""),
        "objective": objective,
        "runtime": runtime,
        "threads": threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        **results,
        "ratios": _ratios(results, plan.meta.get("latency_limit_ms")),
        "plan": {
            "option_counts": plan.option_counts(),
            "predicted": plan.predicted,
            "budgets": plan.budgets,
            "measured_during_search": plan.meta.get("plan_measured"),
            "refinement_settled": plan.meta.get("refinement_settled"),
            "latency_limit_ms": plan.meta.get("latency_limit_ms"),
            "fastest_measured": plan.meta.get("fastest_measured"),
        },
        "seconds": {**{k: round(v, 2) for k, v in seconds.items()}, "search": plan.meta.get("timings_s", {})},
        "config": asdict(cfg),
    }


def _ratios(results: dict[str, dict[str, Any]], limit_ms: float | None) -> dict[str, float | None]:
    ohq, int8, fp32 = (results[key]["latency_ms"] for key in ("ohq", "int8", "fp32"))
    return {
        "ohq_over_int8": ohq / int8,
        "ohq_over_fp32": ohq / fp32,
        "ohq_over_best_uniform": ohq / min(int8, fp32),
        "ohq_over_limit": ohq / limit_ms if limit_ms else None,  # measured plan over the predicted limit
        "ohq_accuracy_minus_int8": results["ohq"]["accuracy"] - results["int8"]["accuracy"],
    }


def summary_table(report: dict[str, Any]) -> str:
    """The FP32 / INT8 / OHQ comparison as a Markdown table."""
    rows = []
    for key, label in (("fp32", "FP32"), ("int8", "uniform INT8"), ("ohq", "OHQ plan")):
        entry = report[key]
        rows.append(
            [
                label,
                100 * entry["accuracy"],
                entry["size_bytes"] / 1e6,
                entry["latency_ms"],
                entry.get("predicted_latency_ms"),
                entry["latency_ms"] / report["fp32"]["latency_ms"],
            ]
        )
    headers = [
        "model",
        "accuracy %",
        "size MB",
        f"measured ms ({report['runtime']}, {report['threads']} thr)",
        f"predicted ms ({report['cost_source'] or '?'})",
        "x FP32 time",
    ]
    return format_table(headers, rows)


def _limit_line(report: dict[str, Any]) -> str:
    """What the device allows, beside the plan's measured time (empty when the target gives no latency)."""
    limit, ratio = report["plan"]["latency_limit_ms"], report["ratios"]["ohq_over_limit"]
    if limit is None or ratio is None:
        return ""
    return (
        f"The limit by the search's latency model (each layer at its fastest option in context, no transition "
        f"paid): {limit:.3f} ms; the plan measures {ratio:.3f}x that."
    )


def write_reports(report: dict[str, Any], plan: QuantPlan, root: Path, *, plots: bool = True) -> None:
    """Write ``report.json``, ``report.md``, ``plan.json`` and (``plots``) the PNG pictures to ``root``."""
    plan.save(root / "plan.json")
    (root / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    data = report["data"]
    lines = [
        f"# OHQ report: {report['model']} on {data['name']} ({data['image_size']}x{data['image_size']})",
        "",
        f"Weights: {report['weights']}. Hardware target: `{report['hardware'].get('name')}` "
        f"(costs {report['cost_source'] or 'unknown'}); deployed and timed in {report['runtime']} with "
        f"{report['threads']} thread(s) on this machine. Accuracy of the deployed models on {data['test']} test "
        "images.",
        "",
        summary_table(report),
        "",
        f"OHQ plan / uniform INT8 latency: {report['ratios']['ohq_over_int8']:.3f}; OHQ / best uniform: "
        f"{report['ratios']['ohq_over_best_uniform']:.3f}; fake-quant (PyTorch) accuracy of the plan: "
        f"{100 * report['ohq']['fake_quant_accuracy']:.2f}% (calibration only, without fine-tuning: "
        f"{100 * report['ohq']['calibration_only_accuracy']:.2f}%).",
        _limit_line(report),
        "",
        "## Plan",
        "",
        format_plan_table(plan),
        "",
        "## Seconds",
        "",
        "```json",
        json.dumps(report["seconds"], indent=2),
        "```",
    ]
    if plots:
        plot_plan(plan, root / "plan.png", title=f"OHQ plan for {report['model']}")
        points = {key.upper(): report[key] for key in ("fp32", "int8", "ohq")}
        plot_accuracy_latency(points, root / "accuracy_latency.png", title=f"{report['model']} on {data['name']}")
        lines[8:8] = ["![plan](plan.png) ![accuracy vs latency](accuracy_latency.png)", ""]
    (root / "report.md").write_text("\n".join(lines) + "\n")
