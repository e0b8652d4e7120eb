"""The Hydra job: train (if needed), search + quantization-aware fine-tuning, deploy and measure, report.

Every figure in the report is measured in this run: accuracies on the test split of the data,
latencies by timing the deployed models on this machine, sizes from the weights. What is
predicted (the search's latency model) is labelled as such beside what was measured.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
import warnings
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ohq_lightning._util.timing import TimingSettings, set_threads
from ohq_lightning.cli.config import JobConfig, OHQConfig
from ohq_lightning.cli.data import ImageData, build_data
from ohq_lightning.cli.evaluate import evaluate_plan
from ohq_lightning.cli.model import build_model, classifier
from ohq_lightning.plan import QuantPlan
from ohq_lightning.report import format_plan_table, format_table

__all__ = ["objective", "run_job", "summary_table", "write_reports"]

_RESOURCE_BUDGETS = ("compression_ratio", "latency_budget", "energy_budget", "bops_budget")
_log = logging.getLogger(__name__)


def objective(ohq: OHQConfig) -> dict[str, Any]:
    """The budgets and objective for :class:`~ohq_lightning.OHQCallback` from the ``ohq`` config.

    ``minimize: auto``: with a resource budget, minimise sensitivity under it; without one,
    minimise latency with total sensitivity no worse than uniform INT8's (``sensitivity_budget:
    w8a8``, unless a sensitivity budget is given). A given ``plan`` needs no objective.

    Example:
        >>> objective(OHQConfig())
        {'minimize': 'latency', 'sensitivity_budget': 'w8a8'}
        >>> objective(OHQConfig(compression_ratio=0.5))
        {'minimize': 'sensitivity', 'compression_ratio': 0.5}
    """
    if ohq.plan is not None:
        return {}
    budgets: dict[str, Any] = {key: getattr(ohq, key) for key in _RESOURCE_BUDGETS if getattr(ohq, key) is not None}
    minimize = ohq.minimize
    if minimize == "auto":
        minimize = "sensitivity" if budgets else "latency"
    if ohq.sensitivity_budget is not None:
        budgets["sensitivity_budget"] = ohq.sensitivity_budget
    elif minimize == "latency":
        budgets["sensitivity_budget"] = "w8a8"
    return {"minimize": minimize, **budgets}


def _trainer(cfg: JobConfig, root: Path, name: str, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        max_epochs=epochs,
        logger=CSVLogger(str(root), name=name, version=""),
        enable_checkpointing=True,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=10,
        default_root_dir=str(root / name),
        callbacks=callbacks,
    )


class _NoTips(logging.Filter):
    """Drop Lightning's advertising tips (``💡 Tip: ... try installing ...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def _quiet_lightning() -> None:
    """One copy of each Lightning message: its own handler prints it; Hydra's root handler would print it again."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.propagate = False
        for handler in logger.handlers:
            if not any(isinstance(f, _NoTips) for f in handler.filters):
                handler.addFilter(_NoTips())


def _hardware_settings(cfg: JobConfig) -> dict[str, Any]:
    """The hardware config, with the job's progress-bar setting for targets that show one."""
    from ohq_lightning.hardware import create_target

    settings = dict(cfg.hardware)
    if "progress" in settings or not isinstance(settings.get("name"), str):
        return settings  # a missing name is reported by the callback
    with_progress = {**settings, "progress": cfg.trainer.progress_bar}
    name = with_progress.pop("name")
    try:
        create_target(name, **with_progress)
    except (TypeError, ValueError):  # no progress setting (or bad settings: the callback reports those)
        return settings
    return {"name": name, **with_progress}


def _runtime(cfg: JobConfig) -> str:
    return cfg.eval.runtime or str(cfg.hardware.get("runtime") or "onnxruntime")


def _threads(cfg: JobConfig) -> int:
    return int(cfg.eval.threads or cfg.hardware.get("threads") or 1)


def _calibration_batches(data: ImageData, count: int) -> list[torch.Tensor]:
    return [x for x, _ in islice(data.train_loader(), count)]


def run_job(cfg: JobConfig | DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run the whole job and write ``report.json``, ``report.md``, ``plan.json`` and plots to ``output_dir``.

    Returns the report (what ``report.json`` holds).
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    assert isinstance(cfg, JobConfig)
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
    _quiet_lightning()
    if cfg.trainer.threads:
        set_threads(cfg.trainer.threads)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    pl.seed_everything(cfg.seed, verbose=False)
    data = build_data(
        cfg.data.name,
        root=cfg.data.root,
        image_size=cfg.data.image_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        max_eval_samples=cfg.data.max_eval_samples,
        seed=cfg.data.seed,
    )
    network = build_model(
        cfg.model.name, num_classes=data.num_classes, checkpoint=cfg.model.checkpoint, pretrained=cfg.model.pretrained
    )
    float_module = classifier(network, cfg.train)
    trained_here = cfg.model.checkpoint is None and cfg.train.epochs > 0
    if trained_here:
        _log.info("training the float model for %d epochs on %s", cfg.train.epochs, data.name)
        _trainer(cfg, root, "float", cfg.train.epochs, []).fit(float_module, data.train_loader())
        torch.save(float_module.model.state_dict(), root / "float_model.pt")
    seconds["float_training"] = time.perf_counter() - started

    from ohq_lightning.callback import OHQCallback

    started = time.perf_counter()
    finetune = cfg.ohq.qat_epochs > 0
    callback = OHQCallback(
        hardware=_hardware_settings(cfg),
        options=cfg.ohq.options,
        sensitivity=cfg.ohq.sensitivity,
        synthetic=cfg.ohq.synthetic,
        num_samples=cfg.ohq.num_samples,
        distill_steps=cfg.ohq.distill_steps,
        plan=cfg.ohq.plan,
        calibration=cfg.ohq.calibration,
        calibration_batches=cfg.ohq.calibration_batches,
        finetune=finetune,
        seed=cfg.ohq.seed,
        progress=cfg.trainer.progress_bar,
        **objective(cfg.ohq),
    )
    qat_module = classifier(
        copy.deepcopy(float_module.model), cfg.train, lr=cfg.ohq.qat_lr, epochs=max(cfg.ohq.qat_epochs, 1)
    )
    qat_module.train()
    _trainer(cfg, root, "qat", max(cfg.ohq.qat_epochs, 1), [callback]).fit(qat_module, data.train_loader())
    plan = callback.plan
    assert plan is not None
    seconds["search_and_qat"] = time.perf_counter() - started

    started = time.perf_counter()
    runtime, threads = _runtime(cfg), _threads(cfg)
    results = evaluate_plan(
        float_module.eval(),
        qat_module.eval(),
        plan,
        example=data.example_input(),
        test_loader=data.test_loader(),
        calibration=_calibration_batches(data, cfg.ohq.calibration_batches),
        num_classes=data.num_classes,
        runtime=runtime,
        threads=threads,
        timing=TimingSettings(max_seconds=cfg.eval.max_seconds, min_repeats=15),
        rounds=cfg.eval.timing_rounds,
        progress=cfg.trainer.progress_bar,
    )
    seconds["evaluation"] = time.perf_counter() - started
    report = {
        "model": cfg.model.name,
        "weights": cfg.model.checkpoint
        or ("timm pretrained" if cfg.model.pretrained else f"trained here ({cfg.train.epochs} epochs)"),
        "data": data.describe(),
        "hardware": dict(cfg.hardware),
        "cost_source": plan.meta.get("cost_source", ""),
        "objective": objective(cfg.ohq),
        "runtime": runtime,
        "threads": threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        **results,
        "ratios": _ratios(results),
        "plan": {
            "option_counts": plan.option_counts(),
            "predicted": plan.predicted,
            "budgets": plan.budgets,
            "measured_during_search": plan.meta.get("plan_measured"),
            "refinement_settled": plan.meta.get("refinement_settled"),
        },
        "seconds": {**{k: round(v, 2) for k, v in seconds.items()}, "search": plan.meta.get("timings_s", {})},
        "config": asdict(cfg),
    }
    write_reports(report, plan, root, plots=cfg.eval.plots)
    return report


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    ohq, int8, fp32 = (results[key]["latency_ms"] for key in ("ohq", "int8", "fp32"))
    return {
        "ohq_over_int8": ohq / int8,
        "ohq_over_fp32": ohq / fp32,
        "ohq_over_best_uniform": ohq / min(int8, fp32),
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
        from ohq_lightning.plots import plot_accuracy_latency, plot_plan

        plot_plan(plan, root / "plan.png", title=f"OHQ plan for {report['model']}")
        points = {key.upper(): report[key] for key in ("fp32", "int8", "ohq")}
        plot_accuracy_latency(points, root / "accuracy_latency.png", title=f"{report['model']} on {data['name']}")
        lines[8:8] = ["![plan](plan.png) ![accuracy vs latency](accuracy_latency.png)", ""]
    (root / "report.md").write_text("\n".join(lines) + "\n")
