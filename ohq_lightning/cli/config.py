"""Structured-config schemas of the Hydra app: a typo or a wrong type fails before the job starts.

The YAML files in ``conf/`` fill these dataclasses; :func:`register_configs` stores the schema in
Hydra's ``ConfigStore`` as ``job_schema``, which the primary config lists first in its defaults,
so every group file and every command-line override is checked against it (an unknown key or a
value of the wrong type is refused by OmegaConf with the key named). The ``hardware`` group is a
free mapping: each target takes its own settings, and :func:`ohq_lightning.hardware.create_target`
checks them with a message naming the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from ohq_lightning.cli.help import register_help
from ohq_lightning.config import Budgets, SearchConfig

__all__ = [
    "DataConfig",
    "EvalConfig",
    "JobConfig",
    "ModelConfig",
    "OHQConfig",
    "TrainConfig",
    "TrainerConfig",
    "register_configs",
]


@dataclass
class ModelConfig:
    """The network: a timm model by name, with weights from a checkpoint, timm's local cache, or trained here."""

    name: str = "mobilenetv3_large_100"
    checkpoint: str | None = None
    pretrained: bool = False


@dataclass
class DataConfig:
    """The dataset: ``digits`` (built in, offline), ``imagefolder`` or ``cifar10`` (from ``root``)."""

    name: str = "digits"
    root: str | None = None
    image_size: int = 32
    batch_size: int = 64
    num_workers: int = 0
    max_eval_samples: int | None = None
    seed: int = 0


@dataclass
class TrainConfig:
    """Float training before quantization, when no ``model.checkpoint`` is given (``epochs: 0`` skips it)."""

    epochs: int = 3
    lr: float = 0.05
    weight_decay: float = 5e-4
    optimizer: str = "sgd"


@dataclass
class OHQConfig:
    """The search and quantization-aware fine-tuning (the settings of :class:`~ohq_lightning.OHQCallback`).

    ``minimize: auto`` picks the objective from the budgets given: with a resource budget
    (``compression_ratio``, ``latency_budget``, ``energy_budget``, ``bops_budget``) it minimises the
    total sensitivity under it; with none it minimises latency with total sensitivity no worse than
    uniform INT8's (``sensitivity_budget: w8a8``). That rule is :meth:`SearchConfig.objective
    <ohq_lightning.config.SearchConfig.objective>`'s: the flat fields here (the names of the Hydra
    overrides, e.g. ``ohq.compression_ratio=0.5``) become a :class:`~ohq_lightning.config.Budgets`
    (:meth:`budgets`) and a :class:`~ohq_lightning.config.SearchConfig` (:meth:`search_config`), which
    check every value with a one-line ``ValueError``.
    """

    compression_ratio: float | None = None
    latency_budget: float | None = None
    energy_budget: float | None = None
    bops_budget: float | None = None
    sensitivity_budget: Any = None
    minimize: str = "auto"
    options: list[str] | None = None
    sensitivity: str = "quantize"
    synthetic: str = "distilled"
    num_samples: int = 8
    distill_steps: int = 20
    tie_groups: list[list[str]] = field(default_factory=list)
    cost_weight: float = 0.0
    refine_rounds: int = 6
    calibration: str | None = "train"
    calibration_batches: int = 4
    plan: str | None = None
    qat_epochs: int = 1
    qat_lr: float = 0.005
    seed: int = 0

    def budgets(self) -> Budgets:
        """The budget fields as a checked :class:`~ohq_lightning.config.Budgets` (``ValueError`` on a bad value).

        Example:
            >>> OHQConfig(compression_ratio=0.5).budgets().given()
            {'compression_ratio': 0.5}
        """
        return Budgets(
            compression_ratio=self.compression_ratio,
            latency_budget=self.latency_budget,
            energy_budget=self.energy_budget,
            bops_budget=self.bops_budget,
            sensitivity_budget=self.sensitivity_budget,
        )

    def search_config(self) -> SearchConfig:
        """The search fields as a checked :class:`~ohq_lightning.config.SearchConfig` (``ValueError`` on a bad value).

        Example:
            >>> minimize, budgets = OHQConfig().search_config().objective(OHQConfig().budgets())
            >>> minimize, budgets.given()
            ('latency', {'sensitivity_budget': 'w8a8'})
        """
        return SearchConfig(
            options=None if self.options is None else tuple(self.options),
            sensitivity=self.sensitivity,
            synthetic=self.synthetic,
            num_samples=self.num_samples,
            distill_steps=self.distill_steps,
            minimize=self.minimize,
            tie_groups=tuple(tuple(group) for group in self.tie_groups),
            cost_weight=self.cost_weight,
            refine_rounds=self.refine_rounds,
            seed=self.seed,
        )


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` settings shared by float training and fine-tuning."""

    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: Any = "32-true"
    threads: int | None = None
    progress_bar: bool = True


@dataclass
class EvalConfig:
    """Evaluation of FP32, uniform INT8 and the plan, deployed on this device's real kernels."""

    runtime: str | None = None
    threads: int | None = None
    timing_rounds: int = 3
    max_seconds: float = 2.0
    plots: bool = True


@dataclass
class JobConfig:
    """The whole job (``python -m ohq_lightning``): one field per config group."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hardware: dict[str, Any] = field(default_factory=dict)
    ohq: OHQConfig = field(default_factory=OHQConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0


def register_configs() -> None:
    """Store the schema (as ``job_schema``) and the app's ``--help`` in Hydra's ``ConfigStore``; safe to repeat."""
    ConfigStore.instance().store(name="job_schema", node=JobConfig)
    register_help()
