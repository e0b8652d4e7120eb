"""``OHQCallback``: hardware-aware mixed-precision quantization as a Lightning callback.

Short hooks; the work is in methods a subclass may override, and in the package's modules: what a
checkpoint holds before its weights load, the example and calibration inputs, the plan's fake-quant layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ohq_lightning.config import Budgets, SearchConfig, check_int, settings_from
from ohq_lightning.hardware import HardwareTarget, create_target
from ohq_lightning.lightning import inputs
from ohq_lightning.lightning._arguments import (
    check_bool,
    check_callable,
    check_choice,
    check_example_inputs,
    optional_path,
    read_plan,
    renamed_arguments,
)
from ohq_lightning.lightning._distributed import from_rank_zero
from ohq_lightning.lightning.checkpoint import (
    CheckpointInfo,
    checkpoint_plan,
    inspect_checkpoint,
    pending_checkpoint,
    restore_pruning,
)
from ohq_lightning.lightning.export import deploy_and_measure
from ohq_lightning.lightning.qat import diverged_error, install_plan, swapped_assignment
from ohq_lightning.pipeline import search
from ohq_lightning.plan import QuantPlan
from ohq_lightning.quant import calibrate, quantized_layers
from ohq_lightning.report import format_plan_table

__all__ = ["OHQCallback"]

_UNSUPPORTED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


class OHQCallback(Callback):
    r"""Search a mixed-precision plan for the target hardware, quantize the model, and fine-tune it.

    At the start of ``fit`` (in :meth:`setup`, before ``configure_optimizers`` and before DDP wraps
    the model) the callback:

    1. finds the plan: the ``plan`` given, else the one stored in the checkpoint being resumed,
       else it runs :func:`~ohq_lightning.pipeline.search` on global rank 0 (the module in eval
       mode, on the device it is on, usually the CPU) and broadcasts the plan to every rank;
    2. swaps the planned layers for fake-quant twins
       (:func:`~ohq_lightning.quant.apply_plan`: same weight ``Parameter``\ s, the module's
       ``forward`` untouched), so the optimizer and DDP see the fake-quant step sizes too;
    3. calibrates the activation step sizes on ``calibration_batches`` batches (skipped on resume:
       the checkpoint holds them);
    4. on rank 0, logs the plan as a per-layer table, logs its predicted totals (``ohq/size_ratio``,
       ``ohq/latency_ms``, ``ohq/energy_mj``...) to every logger at step 0, and writes ``plan.json``
       and ``plan.md`` to ``dirpath``.

    The fit then fine-tunes the quantized model (``finetune=True``) or stops before the first step
    (``finetune=False``: post-training quantization). The plan is the callback's checkpoint state,
    so ``fit(ckpt_path=...)`` and ``validate/test/predict(ckpt_path=...)`` rebuild the same quantized
    model before the weights load, with no new search, also with a new ``OHQCallback()`` in a new
    process. Without a checkpoint, ``validate/test/predict`` apply a known plan (``plan=``, or the
    one of an earlier ``fit``) to a float module and never search.

    During fine-tuning a non-finite loss stops the fit with :class:`QATDivergedError`, naming the
    fake-quant layers whose step sizes or weights are non-finite.

    Args:
        target: the hardware: a name (``"analytical"``, the default, ``"cpu"``...), a config dict
            with a ``"name"`` key and the target's settings (``{"name": "cpu", "threads": 1}``), or
            a :class:`~ohq_lightning.hardware.HardwareTarget`. (``hardware=`` is its deprecated name.)
        budgets: a :class:`~ohq_lightning.config.Budgets`, or its fields as keywords
            (``compression_ratio=0.6``, ``latency_budget``, ``energy_budget``, ``bops_budget``,
            ``sensitivity_budget``: a number, or an option name such as ``"w8a8"``).
        search: a :class:`~ohq_lightning.config.SearchConfig`, or its fields as keywords
            (``minimize``, ``options``, ``sensitivity``, ``synthetic``, ``num_samples``,
            ``distill_steps``, ``tie_groups``, ``cost_weight``, ``refine_rounds``, ``seed``). With the
            default ``minimize="auto"``, a resource budget means "least sensitivity under it" and no
            budget "the fastest plan no more sensitive than uniform INT8". ``num_samples``,
            ``distill_steps`` and ``seed`` also shape ``calibration="synthetic"``.
        plan: a :class:`~ohq_lightning.plan.QuantPlan`, its dict, a mapping of layer name to option
            (``{"features.0": "w4a8"}``), or a path to a ``plan.json``: use it and skip the search
            (then give no budget and no ``options``).
        example_inputs: the input the search traces the model with (a tensor, a tuple of arguments
            or a dict of keywords). Default: the module's ``example_input_array`` if set, else the
            first sample of the first train batch, as ``input_fn`` extracts it. (``example_input=``
            is its deprecated name.)
        input_fn: batch -> model input, for the example input and the calibration batches.
            Default :func:`~ohq_lightning.lightning.default_input_fn`: the batch if it is a tensor,
            the first element of a tuple or list, the first value of a dict. Must pickle for
            ``ddp_spawn`` (no lambda).
        calibration: ``"train"`` (batches of the train dataloader), ``"synthetic"`` (the search's
            kind of synthetic inputs, ``num_samples`` of them split into ``calibration_batches``
            batches), or ``None`` (each activation quantizer initialises from its first batch).
        calibration_batches: how many batches calibrate the activation step sizes.
        finetune: ``True``: the fit is quantization-aware fine-tuning. ``False``: calibrate, then stop
            the fit before its first step (``trainer.should_stop``; a ``min_epochs``/``min_steps``
            the Trainer must reach still runs).
        export_onnx: at the end of fit, deploy the plan to ONNX Runtime's int8 kernels and write the
            QDQ graph here (a relative path lands in ``dirpath``); its latency is measured beside
            uniform FP32 and INT8 and logged (see :meth:`on_fit_end`). Models called with one tensor.
        dirpath: where ``plan.json``, ``plan.md`` and the ONNX export go. Default: ``trainer.log_dir``
            (the first logger's directory; ``trainer.default_root_dir`` with ``logger=False``).
        progress: show progress bars (search, calibration) unless the Trainer has none
            (``Trainer(enable_progress_bar=False)``).

    Example::

        from lightning.pytorch import Trainer
        from ohq_lightning.lightning import OHQCallback

        # quantization-aware fine-tuning under a size budget, planned for this CPU
        trainer = Trainer(callbacks=[OHQCallback(target="cpu", compression_ratio=0.6)], max_epochs=3)
        trainer.fit(model, train_loader, val_loader)

        # later, in a new process: the checkpoint carries the plan
        trainer = Trainer(callbacks=[OHQCallback()])
        trainer.test(MyModule(), test_loader, ckpt_path="last.ckpt")

    Beside Lightning's ``ModelPruning`` (``torch.nn.utils.prune``): with its default
    ``parameters_to_prune=None`` it prunes the conv/linear ``weight`` (and ``bias``) inside each
    fake-quant layer, never the wrapper or the quantizers' step sizes, whichever callback comes first
    (to choose by hand, name the wrapped modules: ``(layer.module, "weight")``). The fake-quant
    forward quantizes the pruned weight ``weight_orig * weight_mask``, so pruned weights stay
    exactly zero and get no gradient. Checkpoints load either way: with ``make_pruning_permanent=True``
    (the default) they hold plain masked weights, so ``test(ckpt_path=...)`` needs no
    ``ModelPruning``; with ``False`` they hold ``weight_orig``/``weight_mask``, and the callback
    restores that re-parametrisation on the fresh module before the weights load. A resumed fit
    that should keep pruning such restored layers needs ``ModelPruning`` listed before
    ``OHQCallback`` (its default choice skips weights already pruned when it sets up). The ONNX
    export at the end of fit deploys the masked weights. Note that ``ModelPruning``'s default
    ``use_lottery_ticket_hypothesis=True`` resets the unpruned weights to their values at setup
    after every pruning, undoing the fine-tuned weights (not the learned step sizes): pass ``False``
    to keep them.

    Not supported: FSDP, DeepSpeed and ModelParallel strategies; layers a ``LightningModule``
    creates in its own ``setup`` (it runs after the callbacks' ``setup``). With ``ddp_spawn`` the
    module in the main process is not quantized after ``fit`` (Lightning copies the workers'
    weights back non-strictly): evaluate from a checkpoint instead.
    """

    def __init__(
        self,
        *,
        target: str | Mapping[str, Any] | HardwareTarget | None = None,
        budgets: Budgets | None = None,
        search: SearchConfig | None = None,
        plan: QuantPlan | Mapping[str, Any] | str | Path | None = None,
        example_inputs: Any = None,
        input_fn: Callable[[Any], Any] | None = None,
        calibration: str | None = "train",
        calibration_batches: int = 4,
        finetune: bool = True,
        export_onnx: str | Path | None = None,
        dirpath: str | Path | None = None,
        progress: bool = True,
        **keywords: Any,
    ) -> None:
        super().__init__()
        renamed, keywords = renamed_arguments({"target": target, "example_inputs": example_inputs}, keywords)
        self.target = create_target("analytical" if renamed["target"] is None else renamed["target"])
        self.budgets, self.search_config = settings_from(
            budgets, search, keywords, caller="OHQCallback", config_keyword="search"
        )
        self._plan = read_plan(plan)
        if self._plan is not None and (self.budgets.given() or self.search_config.options is not None):
            raise ValueError(
                "plan= skips the search, so budgets and options would be ignored: give either a plan or budgets"
            )
        self.example_inputs = check_example_inputs(renamed["example_inputs"])
        self.input_fn = check_callable("input_fn", input_fn, inputs.default_input_fn)
        self.calibration = check_choice("calibration", calibration, inputs.CALIBRATION_SOURCES)
        self.calibration_batches = check_int("calibration_batches", calibration_batches, 1)
        self.finetune = check_bool("finetune", finetune)
        self.export_onnx = optional_path("export_onnx", export_onnx)
        self.dirpath = optional_path("dirpath", dirpath)
        self.progress = check_bool("progress", progress)

    # ------------------------------------------------------------------ public state

    @property
    def plan(self) -> QuantPlan | None:
        """The plan in use (given, restored from a checkpoint, or found by the search); ``None`` before ``fit``."""
        return self._plan

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint state: ``{"plan": <the plan as a JSON-able dict, or None>}``."""
        return {"plan": None if self._plan is None else self._plan.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the plan; it must be the one :meth:`setup` applied (it read the same checkpoint)."""
        data = state_dict.get("plan")
        if data is None:
            return
        plan = QuantPlan.from_dict(dict(data))
        if self._plan is not None and swapped_assignment(self._plan.assignment) != swapped_assignment(plan.assignment):
            raise ValueError(
                "the checkpoint's OHQ plan differs from the plan the model was quantized with in setup; "
                "pass the checkpoint's plan (OHQCallback(plan=...)) or start from a float model"
            )
        self._plan = plan

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the plan, quantize ``pl_module`` and calibrate it (``fit``), or rebuild it from a checkpoint."""
        self._check_trainer(trainer)
        fitting = stage == "fit"
        ckpt_path, weights_only = pending_checkpoint(trainer)
        if not fitting and ckpt_path is None and self._plan is None:
            return  # evaluate the module as it is: only fit searches
        checkpoint = None if ckpt_path is None else inspect_checkpoint(ckpt_path, weights_only, self.state_key)
        with torch.random.fork_rng(devices=[]):  # leave the global RNG (shuffling, dropout...) as it was
            plan, source = self._resolve_plan(trainer, pl_module, fitting, ckpt_path, checkpoint)
            if plan is None:
                return
            fresh = fitting and ckpt_path is None  # a checkpoint holds the calibrated step sizes
            pruned = [] if checkpoint is None else checkpoint.pruned
            self._quantize(trainer, pl_module, plan, calibrate_now=fresh, pruned=pruned)
        if fitting:
            self._report(trainer, plan, source)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``finetune=False``, stop the fit before its first step: the calibrated model is the result.

        With ``finetune=True``, warn when the module is in eval mode (QAT in eval mode diverged in trials).
        """
        if not self.finetune:
            rank_zero_info("OHQCallback(finetune=False): quantized and calibrated; stopping before training")
            trainer.should_stop = True
        elif not pl_module.training:
            rank_zero_warn(
                "OHQCallback: the module is in eval mode at the start of quantization-aware fine-tuning "
                "(Lightning keeps the mode it is given); QAT in eval mode diverged in our trials: call "
                "module.train() before fit"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``export_onnx``: deploy the plan to ONNX Runtime's kernels, write it, and measure it (rank 0).

        See :func:`~ohq_lightning.lightning.export.deploy_and_measure`; its latencies are logged as
        ``ohq/onnx_ms``, ``ohq/onnx_fp32_ms`` and ``ohq/onnx_int8_ms``.
        """
        if self.export_onnx is None or self._plan is None:
            return
        directory = self._output_dir(trainer)
        if not trainer.is_global_zero:
            return
        example = self._example_inputs(trainer, pl_module)
        if not isinstance(example, torch.Tensor):
            rank_zero_warn("OHQCallback(export_onnx=...) deploys models called with one tensor; not exported")
            return
        path = directory / self.export_onnx
        inputs = self._model_inputs(trainer, torch.device("cpu"), 4)
        metrics = deploy_and_measure(pl_module, self._plan, example, inputs, path)
        rank_zero_info(
            f"OHQ plan deployed to {path}: ONNX Runtime {metrics['ohq/onnx_ms']:.3f} ms (uniform FP32 "
            f"{metrics['ohq/onnx_fp32_ms']:.3f} ms, uniform INT8 {metrics['ohq/onnx_int8_ms']:.3f} ms)"
        )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Stop with :class:`QATDivergedError` when the loss is non-finite (before the step spreads NaNs).

        Checked before ``backward``, so the weights and step sizes inspected are those that produced
        the loss. With several processes every rank stops together.
        """
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise diverged_error(pl_module, loss, trainer.global_step, here=bad)

    # ------------------------------------------------------------------ steps of setup

    def _check_trainer(self, trainer: pl.Trainer) -> None:
        if isinstance(trainer.strategy, _UNSUPPORTED_STRATEGIES):
            raise ValueError(
                f"OHQCallback does not support the {type(trainer.strategy).__name__} strategy (it shards or "
                "re-wraps the model's layers): use a single device, 'ddp' or 'ddp_spawn'"
            )

    def _resolve_plan(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        fitting: bool,
        ckpt_path: Any,
        checkpoint: CheckpointInfo | None,
    ) -> tuple[QuantPlan | None, str]:
        """The plan to apply and where it came from (``None``: leave the module as it is)."""
        if checkpoint is not None:
            plan, source = checkpoint_plan(checkpoint, ckpt_path, given=self._plan, fitting=fitting)
            if plan is not None:
                self._plan = plan
            return plan, source
        if self._plan is not None:
            return self._plan, "given"
        self._plan = self._search(trainer, pl_module)
        return self._plan, "search"

    def _search(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantPlan:
        """Search on global rank 0 and give every rank the same plan (all ranks must build one model)."""
        self.search_config.objective(self.budgets)  # on every rank, before any work: is there anything to solve?
        found = from_rank_zero(trainer, lambda: self._search_plan(trainer, pl_module).to_dict(), "the OHQ search")
        return QuantPlan.from_dict(found)

    def _search_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantPlan:
        """The search itself (on global rank 0), on the float module."""
        if quantized_layers(pl_module):
            raise ValueError(
                "the module already holds fake-quant layers but OHQCallback has no plan: pass plan= "
                "(or strip_plan(module) first)"
            )
        return search(
            pl_module,
            self._example_inputs(trainer, pl_module),
            target=self.target,
            budgets=self.budgets,
            config=self.search_config,
            progress=self._progress(trainer),
        )

    def _quantize(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        plan: QuantPlan,
        *,
        calibrate_now: bool,
        pruned: Sequence[str],
    ) -> None:
        """Swap in the plan's fake-quant layers, restore saved pruning, and calibrate a fresh fit."""
        calibrate_now = calibrate_now and self.calibration is not None and not quantized_layers(pl_module)
        batches = self._calibration_inputs(trainer, pl_module) if calibrate_now else ()  # before the swap
        swapped = install_plan(pl_module, plan)
        restored = restore_pruning(pl_module, pruned)  # before the weights load
        if restored:
            rank_zero_info(f"OHQCallback: restored the pruning (weight_orig/weight_mask) of {len(restored)} tensors")
        if swapped and calibrate_now:
            calibrate(pl_module, batches, progress=self._progress(trainer))

    def _calibration_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable[Any]:
        """The calibration batches, taken before the swap: synthetic inputs come from the float module.

        Train batches are read lazily, when calibration iterates them.
        """
        if self.calibration == "synthetic":
            example = self._example_inputs(trainer, pl_module)
            config, progress = self.search_config, self._progress(trainer)
            return inputs.synthetic_batches(pl_module, example, config, self.calibration_batches, progress=progress)
        return self._model_inputs(trainer, inputs.module_device(pl_module), self.calibration_batches)

    def _report(self, trainer: pl.Trainer, plan: QuantPlan, source: str) -> None:
        """Table, metrics and files on rank 0."""
        directory = self._output_dir(trainer)
        if not trainer.is_global_zero:
            return
        table = format_plan_table(plan)
        rank_zero_info(f"OHQ plan ({source}, target {plan.target or self.target.name}):\n{table}")
        metrics = {
            f"ohq/{key}": float(value)
            for key, value in plan.predicted.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for logger in trainer.loggers if metrics else ():
            logger.log_metrics(metrics, step=0)
        directory.mkdir(parents=True, exist_ok=True)
        plan.save(directory / "plan.json")
        (directory / "plan.md").write_text(f"# OHQ plan\n\n{table}\n")

    # ------------------------------------------------------------------ small helpers

    def _output_dir(self, trainer: pl.Trainer) -> Path:
        """``dirpath``, else ``trainer.log_dir`` (collective: every rank must ask), else the root dir."""
        if self.dirpath is not None:
            return self.dirpath
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _progress(self, trainer: pl.Trainer) -> bool:
        """Progress bars only where the Trainer shows its own (``enable_progress_bar=True``)."""
        return self.progress and trainer.progress_bar_callback is not None

    def _example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        return inputs.example_inputs_of(trainer, pl_module, self.example_inputs, self.input_fn)

    def _model_inputs(self, trainer: pl.Trainer, device: torch.device, count: int) -> Iterator[Any]:
        return inputs.model_inputs(trainer, self.input_fn, device, count)
