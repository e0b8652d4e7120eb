"""The Hydra job: train (if needed), search + quantization-aware fine-tuning, deploy and measure, report.

:func:`run_job` runs the stages in order, each a short step below. The ``ohq`` settings become
:class:`~ohq_lightning.config.Budgets` and :class:`~ohq_lightning.config.SearchConfig` first, so a bad
value fails with its one-line message before any training. What is written is
:mod:`~ohq_lightning.cli.job_report`'s.
"""

from __future__ import annotations

import copy
import logging
import warnings
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from ohq_lightning._util.timing import TimingSettings, set_threads, stage_seconds
from ohq_lightning.cli.config import JobConfig, OHQConfig
from ohq_lightning.cli.data import ImageData, build_data
from ohq_lightning.cli.evaluate import evaluate_plan
from ohq_lightning.cli.job_report import build_report, write_reports
from ohq_lightning.cli.model import Classifier, build_model, classifier
from ohq_lightning.config import Budgets, SearchConfig
from ohq_lightning.hardware import create_target
from ohq_lightning.lightning import OHQCallback
from ohq_lightning.plan import QuantPlan

__all__ = ["objective_record", "run_job", "search_settings"]

_log = logging.getLogger(__name__)


def search_settings(ohq: OHQConfig) -> tuple[Budgets, SearchConfig]:
    """The ``ohq`` config as the budgets and search settings :class:`~ohq_lightning.OHQCallback` takes.

    Every value is checked here (a ``ValueError`` with a one-line message), and so is the objective
    (``minimize: sensitivity`` without a resource budget is refused), before any training starts.
    With a ``plan`` the search is skipped: the plan file must exist, and a budget or ``options`` given
    beside it (which it would ignore) is refused, as the callback refuses the same pair.
    """
    budgets, search = ohq.budgets(), ohq.search_config()
    if ohq.plan is None:
        search.objective(budgets)
        return budgets, search
    if not Path(ohq.plan).is_file():
        raise ValueError(f"ohq.plan={ohq.plan!r} is not a file: expected a plan.json written by a search")
    ignored = [f"ohq.{name}" for name in budgets.given()] + (["ohq.options"] if ohq.options is not None else [])
    if ignored:
        raise ValueError(
            f"ohq.plan skips the search, so {', '.join(ignored)} would be ignored: give either ohq.plan or budgets"
        )
    return Budgets(), search


def objective_record(ohq: OHQConfig) -> dict[str, Any]:
    """What ``report.json`` records as the objective: ``minimize`` resolved, then the budgets; ``{}`` with a plan.

    ``minimize: auto`` and the default accuracy bound are resolved by
    :meth:`SearchConfig.objective <ohq_lightning.config.SearchConfig.objective>`.

    Example:
        >>> objective_record(OHQConfig())
        {'minimize': 'latency', 'sensitivity_budget': 'w8a8'}
        >>> objective_record(OHQConfig(compression_ratio=0.5))
        {'minimize': 'sensitivity', 'compression_ratio': 0.5}
    """
    if ohq.plan is not None:
        return {}
    minimize, budgets = ohq.search_config().objective(ohq.budgets())
    return {"minimize": minimize, **budgets.given()}


def run_job(cfg: JobConfig | DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run the whole job and write ``report.json``, ``report.md``, ``plan.json`` and plots to ``output_dir``.

    Returns the report (what ``report.json`` holds).
    """
    cfg = _job_config(cfg)
    budgets, search = search_settings(cfg.ohq)
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _prepare_process(cfg)
    seconds: dict[str, float] = {}
    with stage_seconds(seconds, "float_training"):
        pl.seed_everything(cfg.seed, verbose=False)
        data = _build_data(cfg)
        float_module = _float_model(cfg, data, root)
    with stage_seconds(seconds, "search_and_qat"):
        qat_module, plan = _search_and_finetune(cfg, data, float_module, root, budgets=budgets, search=search)
    runtime, threads = _runtime(cfg), _threads(cfg)
    with stage_seconds(seconds, "evaluation"):
        results = _evaluate(cfg, data, float_module, qat_module, plan, runtime=runtime, threads=threads)
    report = build_report(
        cfg,
        data=data.describe(),
        plan=plan,
        results=results,
        objective=objective_record(cfg.ohq),
        runtime=runtime,
        threads=threads,
        seconds=seconds,
    )
    write_reports(report, plan, root, plots=cfg.eval.plots)
    return report


def _job_config(cfg: JobConfig | DictConfig) -> JobConfig:
    """The schema object of a composed config (Hydra passes a ``DictConfig``)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    assert isinstance(cfg, JobConfig)
    return cfg


def _prepare_process(cfg: JobConfig) -> None:
    """Quiet the known harmless warnings and Lightning's duplicate messages; set the thread count."""
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
    _quiet_lightning()
    if cfg.trainer.threads:
        set_threads(cfg.trainer.threads)


def _build_data(cfg: JobConfig) -> ImageData:
    return build_data(
        cfg.data.name,
        root=cfg.data.root,
        image_size=cfg.data.image_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        max_eval_samples=cfg.data.max_eval_samples,
        seed=cfg.data.seed,
    )


def _float_model(cfg: JobConfig, data: ImageData, root: Path) -> Classifier:
    """The float network, trained here (and saved as ``float_model.pt``) when no checkpoint is given."""
    network = build_model(
        cfg.model.name, num_classes=data.num_classes, checkpoint=cfg.model.checkpoint, pretrained=cfg.model.pretrained
    )
    float_module = classifier(network, cfg.train)
    if cfg.model.checkpoint is None and cfg.train.epochs > 0:
        _log.info("training the float model for %d epochs on %s", cfg.train.epochs, data.name)
        _trainer(cfg, root, "float", cfg.train.epochs, []).fit(float_module, data.train_loader())
        torch.save(float_module.model.state_dict(), root / "float_model.pt")
    return float_module


def _search_and_finetune(
    cfg: JobConfig,
    data: ImageData,
    float_module: Classifier,
    root: Path,
    *,
    budgets: Budgets,
    search: SearchConfig,
) -> tuple[Classifier, QuantPlan]:
    """Fit a copy of the float model with :class:`~ohq_lightning.OHQCallback`: search, then fine-tune with QAT.

    With ``ohq.qat_epochs: 0`` the fit stops after the search and calibration (post-training quantization).
    """
    callback = OHQCallback(
        target=_hardware_settings(cfg),
        budgets=budgets,
        search=search,
        plan=cfg.ohq.plan,
        calibration=cfg.ohq.calibration,
        calibration_batches=cfg.ohq.calibration_batches,
        finetune=cfg.ohq.qat_epochs > 0,
        progress=cfg.trainer.progress_bar,
    )
    epochs = max(cfg.ohq.qat_epochs, 1)
    qat_module = classifier(copy.deepcopy(float_module.model), cfg.train, lr=cfg.ohq.qat_lr, epochs=epochs)
    qat_module.train()
    _trainer(cfg, root, "qat", epochs, [callback]).fit(qat_module, data.train_loader())
    plan = callback.plan
    assert plan is not None
    return qat_module, plan


def _evaluate(
    cfg: JobConfig,
    data: ImageData,
    float_module: Classifier,
    qat_module: Classifier,
    plan: QuantPlan,
    *,
    runtime: str,
    threads: int,
) -> dict[str, dict[str, Any]]:
    """FP32, uniform INT8 and the plan, deployed in ``runtime`` and measured the same way."""
    return evaluate_plan(
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


def _trainer(cfg: JobConfig, root: Path, name: str, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
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
    """Each Lightning message once on the console and once in the job's log file (the plan table among them).

    Lightning prints through its own handler; letting its messages reach Hydra's root handlers too
    would print them twice, so they stop at Lightning's loggers, which are given the root's file
    handlers (Hydra's ``ohq_lightning.log``). A ``-m`` sweep runs its jobs in one process: the file
    handlers of an earlier job are taken off.
    """
    files = [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.FileHandler)]
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.propagate = False
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler) and handler not in files:
                logger.removeHandler(handler)
        for handler in files:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        for handler in logger.handlers:
            if not any(isinstance(f, _NoTips) for f in handler.filters):
                handler.addFilter(_NoTips())


def _hardware_settings(cfg: JobConfig) -> dict[str, Any]:
    """The hardware config, with the job's progress-bar setting for targets that show one."""
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
