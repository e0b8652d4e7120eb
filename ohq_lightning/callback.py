"""``OHQCallback``: hardware-aware mixed-precision quantization as a Lightning callback.

A thin shell over the core: :func:`~ohq_lightning.api.search` chooses the plan,
:func:`~ohq_lightning.quant.apply_plan` swaps in the fake-quant layers,
:func:`~ohq_lightning.quant.calibrate` sets the activation step sizes, and the fit that follows is
quantization-aware fine-tuning (QAT). The plan travels in the checkpoint, so a resumed fit, or a
``validate``/``test``/``predict`` from a checkpoint, rebuilds the same quantized model before the
weights load.

Two Lightning facts shape it (Lightning 2.6):

* ``Callback.setup(stage="fit")`` runs before ``configure_optimizers``, before the model moves to
  its device and before DDP wraps it, so the swap done there is what the optimizer and DDP see.
* On resume the model weights load *before* any callback's ``load_state_dict``, and
  ``trainer.ckpt_path`` is only set after ``setup`` (when the checkpoint is read). The callback
  therefore reads the plan from the checkpoint file itself in ``setup``; it finds the path that
  ``fit``/``validate``/``test``/``predict`` is about to load from the running ``Trainer._run``
  call (see :func:`_pending_checkpoint`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.utils import prune

from ohq_lightning.api import SYNTHETIC_KINDS, search, validate_budgets
from ohq_lightning.hardware import HardwareTarget, create_target
from ohq_lightning.plan import Option, QuantPlan, parse_options
from ohq_lightning.quant import ActivationFakeQuant, WeightFakeQuant, apply_plan, calibrate, quantized_layers
from ohq_lightning.quant.swap import deployable_copy
from ohq_lightning.report import format_plan_table
from ohq_lightning.sensitivity import METHODS
from ohq_lightning.solver import MINIMIZE
from ohq_lightning.synthetic import synthetic_inputs

__all__ = ["CALIBRATION_SOURCES", "OHQCallback", "QATDivergedError", "default_input_fn", "plan_from_checkpoint"]

CALIBRATION_SOURCES = ("train", "synthetic")
"""Where :class:`OHQCallback` takes its calibration batches from (``None`` skips calibration)."""

_UNSUPPORTED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
_QUANT_STATE_SUFFIXES = (
    ".weight_quantizer.log_scale",
    ".input_quantizer.log_scale",
    ".input_quantizer.calibrated",
    ".weight_quantizer.scale",  # checkpoints written before step sizes were learned in log space
    ".input_quantizer.scale",
)
_WEIGHTS_ONLY_MESSAGE = (
    "the checkpoint holds fake-quant weights but no OHQ plan (was it saved with save_weights_only=True? that drops "
    "callback states): pass the plan itself, OHQCallback(plan='plan.json') (the plan.json the callback wrote to the "
    "log dir)"
)


class QATDivergedError(RuntimeError):
    """Quantization-aware fine-tuning produced a non-finite loss."""


def default_input_fn(batch: Any) -> Any:
    """The model input of a training batch: the batch itself if it is a tensor, else its first element.

    * a tensor: the batch;
    * a tuple or list (``(x, y)``): its first element;
    * a mapping (``{"image": x, "label": y}``): its first value.

    What it returns is what the model is called with: a tensor (``model(x)``), a tuple or list of
    arguments (``model(*x)``) or a dict of keywords (``model(**x)``). Give ``OHQCallback`` an
    ``input_fn`` for batches this rule does not fit.

    Example:
        >>> default_input_fn((torch.zeros(2, 3), torch.zeros(2))).shape
        torch.Size([2, 3])
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return batch[0]
    if isinstance(batch, Mapping) and len(batch) > 0:
        return next(iter(batch.values()))
    raise ValueError(
        f"cannot tell the model input in a batch of type {type(batch).__name__}: pass "
        "OHQCallback(input_fn=...) (batch -> model input) or OHQCallback(example_input=...)"
    )


def _load_checkpoint(path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
    """Read a checkpoint onto the CPU (memory-mapped when it is a local file)."""
    if os.path.isfile(path):
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
        except RuntimeError:  # e.g. a legacy (non-zip) file cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    from lightning.fabric.utilities.cloud_io import _load  # remote paths (s3://, http...), as Lightning reads them

    return _load(path, map_location="cpu", weights_only=weights_only)


def plan_from_checkpoint(
    checkpoint: str | Path | Mapping[str, Any], *, weights_only: bool | None = None
) -> QuantPlan | None:
    """The OHQ plan stored in a Lightning checkpoint by :class:`OHQCallback`, or ``None`` for a float checkpoint.

    Use it to rebuild a quantized module without a ``Trainer``::

        plan = plan_from_checkpoint("last.ckpt")
        model = MyModule()
        apply_plan(model, plan)
        model.load_state_dict(torch.load("last.ckpt", weights_only=True)["state_dict"])

    Args:
        checkpoint: a path (or URL) to a ``.ckpt`` file, or a checkpoint dict already loaded.
        weights_only: passed to :func:`torch.load` (``None``: torch's default, as Lightning does; that
            is ``True`` since torch 2.6, so no pickled object is unpickled unless you pass ``False``).

    Raises:
        ValueError: the file does not exist, or the checkpoint holds fake-quant weights but no plan
            (it was saved with ``save_weights_only=True``, which drops callback states).
    """
    info = _inspect_checkpoint(checkpoint, weights_only)
    if info.plan is None and info.quantized:
        raise ValueError(_WEIGHTS_ONLY_MESSAGE)
    return info.plan


class _CheckpointInfo(NamedTuple):
    """What :class:`OHQCallback` needs to know of a checkpoint before its weights load."""

    plan: QuantPlan | None
    """The stored plan, if any."""
    quantized: bool
    """Whether the weights hold fake-quant layers."""
    pruned: list[str]
    """Tensors saved pruned (``<name>_orig`` and ``<name>_mask``), e.g. ``"features.0.module.weight"``."""


def _pruned_tensors(weights: Mapping[str, Any]) -> list[str]:
    """The tensors a state dict holds in :mod:`torch.nn.utils.prune`'s form, ``<name>_orig`` + ``<name>_mask``."""
    keys = {str(key) for key in weights}
    names = (key.removesuffix("_mask") for key in keys if key.endswith("_mask"))
    return sorted(name for name in names if f"{name}_orig" in keys)


def _inspect_checkpoint(checkpoint: str | Path | Mapping[str, Any], weights_only: bool | None) -> _CheckpointInfo:
    """The stored plan, whether the weights hold fake-quant layers, and which tensors were saved pruned."""
    if isinstance(checkpoint, Mapping):
        data = checkpoint
    else:
        if not (os.path.isfile(checkpoint) or "://" in str(checkpoint)):
            raise ValueError(f"checkpoint file {str(checkpoint)!r} does not exist")
        data = _load_checkpoint(checkpoint, weights_only)
    states = data.get("callbacks") or {}
    preferred = [state for key, state in states.items() if key == OHQCallback.__qualname__]
    others = [state for key, state in states.items() if key != OHQCallback.__qualname__]
    weights = data.get("state_dict") or {}
    quantized = any(str(key).endswith(_QUANT_STATE_SUFFIXES) for key in weights)
    pruned = _pruned_tensors(weights)
    for state in preferred + others:
        if isinstance(state, Mapping) and isinstance(state.get("plan"), Mapping) and "assignment" in state["plan"]:
            return _CheckpointInfo(QuantPlan.from_dict(dict(state["plan"])), quantized, pruned)
    return _CheckpointInfo(None, quantized, pruned)


def _restore_pruning(module: nn.Module, pruned: Sequence[str]) -> list[str]:
    """Re-parametrise, as :mod:`torch.nn.utils.prune` does, the tensors a checkpoint saved pruned; returns them.

    A checkpoint saved while pruning was not permanent (``ModelPruning(make_pruning_permanent=False)``)
    holds ``<name>_orig`` and ``<name>_mask`` where a fresh module has ``<name>``. Each such parameter
    gets an identity pruning (a mask of ones, which the checkpoint then overwrites), and
    ``<name>_orig`` takes ``<name>``'s place among the module's parameters, so an optimizer built
    next lists the parameters in the order the checkpoint's optimizer state was saved in (pruning
    applied during a fit comes after ``configure_optimizers``). Modules already pruned and names the
    module does not have are left alone (a strict load then reports them).
    """
    restored = []
    for path in pruned:
        prefix, _, name = path.rpartition(".")
        try:
            owner = module.get_submodule(prefix)
        except AttributeError:
            continue
        if f"{name}_orig" in owner._parameters or not isinstance(owner._parameters.get(name), nn.Parameter):
            continue
        order = list(owner._parameters)
        with torch.no_grad():  # the masked value the hook leaves on the module stays a leaf (deepcopy works)
            prune.identity(owner, name)
        parameters = owner._parameters
        reordered = {key: parameters[key] for key in (f"{name}_orig" if key == name else key for key in order)}
        parameters.clear()
        parameters.update(reordered)
        restored.append(path)
    return restored


def _pending_checkpoint(trainer: pl.Trainer) -> tuple[Any, bool | None]:
    """The checkpoint path (and ``weights_only``) the running fit/validate/test/predict will load, if any.

    Lightning resolves ``ckpt_path`` (``"last"``, ``"best"``, a path) before ``Trainer._run`` and
    passes it as an argument, but only stores it in ``trainer.ckpt_path`` after the ``setup`` hooks.
    During ``setup`` the one place that holds it is that ``_run`` call, so look it up on the stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_run" and frame.f_locals.get("self") is trainer:
            return frame.f_locals.get("ckpt_path"), frame.f_locals.get("weights_only")
        frame = frame.f_back
    rank_zero_warn("OHQCallback could not find the checkpoint path this run loads; assuming none")
    return None, None


def _integer_assignment(assignment: Mapping[str, str]) -> dict[str, str]:
    """The layers a plan swaps (everything but ``fp32``), with canonical option names."""
    parsed = {name: Option.parse(option) for name, option in assignment.items()}
    return {name: option.name for name, option in parsed.items() if option.float_format != "fp32"}


def _applied_assignment(module: torch.nn.Module) -> dict[str, str]:
    """Layer name -> option of the fake-quant layers ``module`` holds now."""
    return {name: layer.option for name, layer in quantized_layers(module).items()}


def _module_device(module: torch.nn.Module) -> torch.device:
    """Where the module's parameters are (``LightningModule.device`` is faked during ``setup``)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _first_sample(example: Any) -> Any:
    """The first sample of a batch tensor (other inputs as they are): the search traces batch 1."""
    if isinstance(example, torch.Tensor) and example.dim() > 0 and example.shape[0] > 1:
        return example[:1]
    return example


def _loss_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
        return loss if isinstance(loss, torch.Tensor) else None
    return None


def _non_finite_layers(module: torch.nn.Module) -> list[str]:
    """``name (what)`` for every fake-quant layer whose step sizes or weights hold a NaN or an infinity."""
    found = []
    for name, layer in quantized_layers(module).items():
        parts = []
        if isinstance(layer.input_quantizer, ActivationFakeQuant) and not torch.isfinite(layer.input_quantizer.scale):
            parts.append("input step size")
        if isinstance(layer.weight_quantizer, WeightFakeQuant) and not bool(
            torch.isfinite(layer.weight_quantizer.scale).all()
        ):
            parts.append("weight step sizes")
        if not bool(torch.isfinite(layer.weight.detach()).all()):
            parts.append("weight")
        bias = getattr(layer.module, "bias", None)
        if isinstance(bias, torch.Tensor) and not bool(torch.isfinite(bias).all()):
            parts.append("bias")
        if parts:
            found.append(f"{name} ({', '.join(parts)})")
    return found


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _build_target(hardware: Any) -> HardwareTarget:
    if isinstance(hardware, Mapping):
        settings = dict(hardware)
        name = settings.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"a hardware config must name its target under 'name' (e.g. 'cpu'), got {hardware!r}")
        try:
            return create_target(name, **settings)
        except TypeError as error:
            raise ValueError(f"bad settings for hardware target {name!r}: {error}") from error
    if isinstance(hardware, (str, HardwareTarget)):
        return create_target(hardware)
    raise ValueError(
        "hardware must be a target name such as 'analytical' or 'cpu', a config dict with a 'name' key, "
        f"or a HardwareTarget; got {hardware!r}"
    )


def _read_plan(plan: Any) -> QuantPlan | None:
    if plan is None or isinstance(plan, QuantPlan):
        return plan
    if isinstance(plan, Mapping):
        if plan and all(isinstance(key, str) and isinstance(value, str) for key, value in plan.items()):
            return QuantPlan(assignment=dict(plan), predicted={})  # layer name -> option
        try:
            return QuantPlan.from_dict(dict(plan))
        except TypeError as error:
            raise ValueError(
                f"plan dict is neither a QuantPlan dict nor a mapping of layer name to option: {error}"
            ) from error
    if isinstance(plan, (str, Path)):
        path = Path(plan)
        if not path.is_file():
            raise ValueError(f"plan file {str(plan)!r} does not exist")
        try:
            return QuantPlan.from_json(path)
        except (ValueError, TypeError) as error:
            raise ValueError(f"plan file {str(plan)!r} is not a QuantPlan JSON file: {error}") from error
    raise ValueError(
        "plan must be a QuantPlan, a plan dict, a mapping of layer name to option, or a path to a plan.json file, "
        f"got {type(plan).__name__}"
    )


class OHQCallback(Callback):
    r"""Search a mixed-precision plan for the target hardware, quantize the model, and fine-tune it.

    At the start of ``fit`` (in :meth:`setup`, before ``configure_optimizers`` and before DDP wraps
    the model) the callback:

    1. finds the plan: the ``plan`` given, else the one stored in the checkpoint being resumed,
       else it runs :func:`~ohq_lightning.api.search` on global rank 0 (the module in eval mode, on
       the device it is on, usually the CPU) and broadcasts the plan to every rank;
    2. swaps the planned layers for fake-quant twins
       (:func:`~ohq_lightning.quant.apply_plan`: same weight ``Parameter``\ s, the module's
       ``forward`` untouched), so the optimizer and DDP see the fake-quant step sizes too;
    3. calibrates the activation step sizes on ``calibration_batches`` batches (skipped on resume:
       the checkpoint holds them);
    4. on rank 0, logs the plan as a per-layer table, logs its predicted totals (``ohq/size_ratio``,
       ``ohq/latency_ms``, ``ohq/energy_mj``...) to every logger at step 0, and writes ``plan.json``
       and ``plan.md`` to ``trainer.log_dir`` (``default_root_dir`` without a logger).

    The fit then fine-tunes the quantized model (``finetune=True``) or stops before the first step
    (``finetune=False``: post-training quantization). The plan is the callback's checkpoint state,
    so ``fit(ckpt_path=...)`` and ``validate/test/predict(ckpt_path=...)`` rebuild the same quantized
    model before the weights load, with no new search, also with a new ``OHQCallback()`` in a new
    process. Without a checkpoint, ``validate/test/predict`` apply a known plan (``plan=``, or the
    one of an earlier ``fit``) to a float module and never search.

    During fine-tuning a non-finite loss stops the fit with :class:`QATDivergedError`, naming the
    fake-quant layers whose step sizes or weights are non-finite.

    Args:
        hardware: the target: a name (``"analytical"``, ``"cpu"``...), a config dict with a
            ``"name"`` key and the target's settings (``{"name": "cpu", "threads": 1}``), or a
            :class:`~ohq_lightning.hardware.HardwareTarget`.
        compression_ratio: plan weight bytes / weight bytes at uniform 8 bits, in (0, 1]. A fit
            that has to search (no ``plan``, no plan in its checkpoint) needs at least one budget.
        latency_budget: predicted latency budget, ms.
        energy_budget: predicted energy budget, mJ.
        bops_budget: bit-operations budget.
        sensitivity_budget: bound on the total MQE sensitivity (>= 0).
        minimize: ``"sensitivity"`` or ``"latency"`` (needs a budget).
        options: candidate options (default: the target's), e.g. ``["w8a8", "w4a8", "w2a8"]``.
        sensitivity: MQE reading, ``"quantize"`` or ``"random_mask"``.
        synthetic: data-free inputs of the search, ``"distilled"`` or ``"gaussian"``.
        num_samples: synthetic inputs used by the search (and by ``calibration="synthetic"``).
        distill_steps: optimisation steps of the distilled inputs (more rank layers better and cost
            more: see ``BENCHMARKS.md``).
        plan: a :class:`~ohq_lightning.plan.QuantPlan`, its dict, a mapping of layer name to option
            (``{"features.0": "w4a8"}``), or a path to a ``plan.json``: use it and skip the search
            (then give no budget and no ``options``).
        example_input: the input the search traces the model with (a tensor, a tuple of
            arguments or a dict of keywords). Default: the first sample of the first batch of the
            train dataloader, as ``input_fn`` extracts it.
        input_fn: batch -> model input, for the example input and the calibration batches.
            Default :func:`default_input_fn`: the batch if it is a tensor, the first element of a
            tuple or list, the first value of a dict. Must pickle for ``ddp_spawn`` (no lambda).
        calibration: ``"train"`` (batches of the train dataloader), ``"synthetic"`` (the search's
            kind of synthetic inputs, ``num_samples`` of them split into ``calibration_batches``
            batches), or ``None`` (each activation quantizer initialises from its first batch).
        calibration_batches: how many batches calibrate the activation step sizes.
        finetune: ``True``: the fit is quantization-aware fine-tuning. ``False``: calibrate, then stop
            the fit before its first step (``trainer.should_stop``; a ``min_epochs``/``min_steps``
            the Trainer must reach still runs).
        export_onnx: at the end of fit, deploy the plan to ONNX Runtime's int8 kernels and write the
            QDQ graph here (a relative path lands in the log dir); its latency is measured beside
            uniform FP32 and INT8 and logged (see :meth:`on_fit_end`). Models called with one tensor.
        seed: seed of everything random in the search.
        progress: show progress bars (search, calibration).

    Example::

        from lightning.pytorch import Trainer
        from ohq_lightning.callback import OHQCallback

        # quantization-aware fine-tuning under a size budget, planned for this CPU
        trainer = Trainer(callbacks=[OHQCallback(hardware="cpu", compression_ratio=0.6)], max_epochs=3)
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
        hardware: str | Mapping[str, Any] | HardwareTarget = "analytical",
        compression_ratio: float | None = None,
        latency_budget: float | None = None,
        energy_budget: float | None = None,
        bops_budget: float | None = None,
        sensitivity_budget: float | None = None,
        minimize: str = "sensitivity",
        options: Sequence[str] | None = None,
        sensitivity: str = "quantize",
        synthetic: str = "distilled",
        num_samples: int = 8,
        distill_steps: int = 20,
        plan: QuantPlan | Mapping[str, Any] | str | Path | None = None,
        example_input: Any = None,
        input_fn: Callable[[Any], Any] | None = None,
        calibration: str | None = "train",
        calibration_batches: int = 4,
        finetune: bool = True,
        export_onnx: str | Path | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.hardware = _build_target(hardware)
        self.budgets = validate_budgets(
            compression_ratio=compression_ratio,
            latency_budget=latency_budget,
            energy_budget=energy_budget,
            bops_budget=bops_budget,
            sensitivity_budget=sensitivity_budget,
        )
        if minimize not in MINIMIZE:
            raise ValueError(f"minimize must be one of {list(MINIMIZE)}, got {minimize!r}")
        self.minimize = minimize
        self.options = None if options is None else [option.name for option in parse_options(options)]
        if sensitivity not in METHODS:
            raise ValueError(f"unknown sensitivity method {sensitivity!r}; use one of {list(METHODS)}")
        self.sensitivity = sensitivity
        if synthetic not in SYNTHETIC_KINDS:
            raise ValueError(f"unknown synthetic input kind {synthetic!r}; use one of {list(SYNTHETIC_KINDS)}")
        self.synthetic = synthetic
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.distill_steps = _check_int("distill_steps", distill_steps, 1)
        self._plan = _read_plan(plan)
        if self._plan is not None and (self.budgets or self.options is not None):
            raise ValueError(
                "plan= skips the search, so budgets and options would be ignored: give either a plan or budgets"
            )
        if example_input is not None and not isinstance(example_input, (torch.Tensor, tuple, list, Mapping)):
            raise ValueError(
                "example_input must be a tensor, a tuple/list of arguments or a dict of keywords, "
                f"got {type(example_input).__name__}"
            )
        self.example_input = example_input
        if input_fn is not None and not callable(input_fn):
            raise ValueError(f"input_fn must be a callable batch -> model input, got {input_fn!r}")
        self.input_fn = input_fn or default_input_fn
        if calibration is not None and calibration not in CALIBRATION_SOURCES:
            raise ValueError(f"calibration must be one of {list(CALIBRATION_SOURCES)} or None, got {calibration!r}")
        self.calibration = calibration
        self.calibration_batches = _check_int("calibration_batches", calibration_batches, 1)
        self.finetune = _check_bool("finetune", finetune)
        if export_onnx is not None and not isinstance(export_onnx, (str, Path)):
            raise ValueError(f"export_onnx must be a file path or None, got {export_onnx!r}")
        self.export_onnx = None if export_onnx is None else Path(export_onnx)
        self.seed = _check_int("seed", seed, 0)
        self.progress = _check_bool("progress", progress)

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
        if self._plan is not None and _integer_assignment(self._plan.assignment) != _integer_assignment(
            plan.assignment
        ):
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
        ckpt_path, weights_only = _pending_checkpoint(trainer)
        if not fitting and ckpt_path is None and self._plan is None:
            return  # evaluate the module as it is: only fit searches
        checkpoint = None if ckpt_path is None else _inspect_checkpoint(ckpt_path, weights_only)
        with torch.random.fork_rng(devices=[]):  # leave the global RNG (shuffling, dropout...) as it was
            plan, source = self._resolve_plan(trainer, pl_module, fitting, ckpt_path, checkpoint)
            if plan is None:
                return
            synthetic = None
            will_calibrate = (
                fitting and ckpt_path is None and self.calibration is not None and not quantized_layers(pl_module)
            )
            if will_calibrate and self.calibration == "synthetic":
                synthetic = self._synthetic_batches(trainer, pl_module)
            swapped = self._install(pl_module, plan)
            if checkpoint is not None and checkpoint.pruned:
                restored = _restore_pruning(pl_module, checkpoint.pruned)
                if restored:
                    rank_zero_info(
                        f"OHQCallback: the checkpoint holds {len(restored)} pruned tensors (weight_orig/weight_mask); "
                        "restored their pruning re-parametrisation before the weights load"
                    )
            if swapped and will_calibrate:
                self._calibrate(trainer, pl_module, synthetic)
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

        The deployed model's end-to-end latency is timed beside uniform FP32 and uniform INT8 builds
        of the same model, call by call in turn, and logged as ``ohq/onnx_ms``, ``ohq/onnx_fp32_ms``
        and ``ohq/onnx_int8_ms``: the plan's speed measured, not assumed. A pruned model deploys its
        masked weights (:func:`~ohq_lightning.quant.swap.deployable_copy`).
        """
        if self.export_onnx is None or self._plan is None:
            return
        log_dir = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        example = self._example_input(trainer, pl_module)
        if not isinstance(example, torch.Tensor):
            rank_zero_warn("OHQCallback(export_onnx=...) deploys models called with one tensor; not exported")
            return
        from ohq_lightning.deploy import convert, measure_latency, uniform

        model = deployable_copy(pl_module).cpu()  # pruning made permanent: pruned weights hold their masked values
        example = example.detach().cpu()
        batches = [batch.detach().cpu() for batch in self._model_inputs(trainer, torch.device("cpu"), 4)]
        batches = [b for b in batches if isinstance(b, torch.Tensor)] or [example]
        deployed = convert(model, self._plan, example, calibration_inputs=batches)
        path = self.export_onnx if self.export_onnx.is_absolute() else Path(log_dir) / self.export_onnx
        deployed.save(path)
        baselines = [uniform(model, "fp32", example), uniform(model, "w8a8", example, calibration_inputs=batches)]
        ohq_ms, fp32_ms, int8_ms = (t.median_ms for t in measure_latency([deployed, *baselines], example))
        rank_zero_info(
            f"OHQ plan deployed to {path}: ONNX Runtime {ohq_ms:.3f} ms (uniform FP32 {fp32_ms:.3f} ms, "
            f"uniform INT8 {int8_ms:.3f} ms)"
        )
        metrics = {"ohq/onnx_ms": ohq_ms, "ohq/onnx_fp32_ms": fp32_ms, "ohq/onnx_int8_ms": int8_ms}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Stop with :class:`QATDivergedError` when the loss is non-finite (before the step spreads NaNs).

        Checked before ``backward``, so the weights and step sizes inspected are those that produced
        the loss. With several processes every rank stops together.
        """
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        layers = _non_finite_layers(pl_module)
        if layers:
            where = "fake-quant layers with non-finite step sizes or weights: " + "; ".join(layers)
        elif quantized_layers(pl_module):
            where = (
                "no fake-quant layer has a non-finite step size or weight, so the forward pass itself overflowed"
                + ("" if bad else " on another process")
            )
        else:
            where = "the model holds no fake-quant layer"
        raise QATDivergedError(
            f"the training loss became non-finite (loss={loss.detach().float().mean().item()}) at global step "
            f"{trainer.global_step} of quantization-aware fine-tuning; {where}. Try a lower learning rate, gradient "
            "clipping (Trainer(gradient_clip_val=...)), or a plan with more bits (a higher compression_ratio)."
        )

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
        checkpoint: _CheckpointInfo | None,
    ) -> tuple[QuantPlan | None, str]:
        """The plan to apply and where it came from (``None``: leave the module as it is)."""
        if checkpoint is not None:
            stored, quantized = checkpoint.plan, checkpoint.quantized
            if stored is None and quantized:
                if self._plan is None:
                    raise ValueError(_WEIGHTS_ONLY_MESSAGE)
                return self._plan, "given"  # a weights-only checkpoint of a quantized model
            if stored is not None:
                if self._plan is not None and _integer_assignment(self._plan.assignment) != _integer_assignment(
                    stored.assignment
                ):
                    raise ValueError(
                        f"the checkpoint {str(ckpt_path)!r} was quantized with a different plan than this "
                        "OHQCallback's: drop plan= (the checkpoint carries its own) or use another checkpoint"
                    )
                self._plan = stored
                return stored, f"checkpoint {ckpt_path}"
            if fitting:
                raise ValueError(
                    f"the checkpoint {str(ckpt_path)!r} holds no OHQ plan (a float model): quantization-aware "
                    "training cannot resume from it. Load its weights first (MyModule.load_from_checkpoint) and "
                    "call fit without ckpt_path"
                )
            if self._plan is not None:
                rank_zero_warn(f"the checkpoint {str(ckpt_path)!r} is a float model: the OHQ plan is not applied")
            return None, ""
        if self._plan is not None:
            return self._plan, "given"
        self._plan = self._search(trainer, pl_module)
        return self._plan, "search"

    def _search(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantPlan:
        """Search on global rank 0 and give every rank the same plan (all ranks must build one model)."""
        if not self.budgets:
            raise ValueError(
                "OHQCallback has no plan to apply (none given, none in a checkpoint) and no budget to search under: "
                "pass a budget (compression_ratio, latency_budget, energy_budget, bops_budget or sensitivity_budget) "
                "or plan="
            )
        payload: dict[str, Any] = {}
        failure: BaseException | None = None
        if trainer.is_global_zero:
            try:
                if quantized_layers(pl_module):
                    raise ValueError(
                        "the module already holds fake-quant layers but OHQCallback has no plan: pass plan= "
                        "(or strip_plan(module) first)"
                    )
                example = self._example_input(trainer, pl_module)
                plan = search(
                    pl_module,
                    example,
                    target=self.hardware,
                    minimize=self.minimize,
                    options=self.options,
                    sensitivity=self.sensitivity,
                    synthetic=self.synthetic,
                    num_samples=self.num_samples,
                    distill_steps=self.distill_steps,
                    seed=self.seed,
                    progress=self.progress,
                    **self.budgets,
                )
                payload = {"plan": plan.to_dict()}
            except Exception as error:  # tell the other ranks rather than leave them waiting in broadcast
                failure = error
                payload = {"error": f"{type(error).__name__}: {error}"}
        payload = trainer.strategy.broadcast(payload, src=0)
        if failure is not None:
            raise failure
        if "error" in payload:
            raise RuntimeError(f"the OHQ search failed on global rank 0: {payload['error']}")
        return QuantPlan.from_dict(payload["plan"])

    def _train_loader(self, trainer: pl.Trainer) -> Iterable[Any]:
        source = getattr(trainer.fit_loop, "_data_source", None)
        if source is None or not source.is_defined():
            raise ValueError(
                "OHQCallback found no train dataloader to take inputs from: pass example_input= "
                "(and calibration='synthetic' or None)"
            )
        loader = source.dataloader()
        if isinstance(loader, Mapping) and loader:
            loader = next(iter(loader.values()))
        elif isinstance(loader, (list, tuple)) and loader and not isinstance(loader[0], torch.Tensor):
            loader = loader[0]
        return loader

    def _model_inputs(self, trainer: pl.Trainer, device: torch.device, count: int) -> Iterator[Any]:
        """The model inputs of the first ``count`` train batches, on ``device``."""
        for batch in islice(iter(self._train_loader(trainer)), count):
            yield move_data_to_device(self.input_fn(batch), device)

    def _example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        device = _module_device(pl_module)
        if self.example_input is not None:
            return move_data_to_device(self.example_input, device)
        first = next(self._model_inputs(trainer, device, 1), None)
        if first is None:
            raise ValueError("the train dataloader is empty: OHQCallback needs a batch (or example_input=)")
        return _first_sample(first)

    def _synthetic_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[torch.Tensor]:
        """The search's kind of synthetic inputs, from the float module, split into calibration batches."""
        inputs = synthetic_inputs(
            pl_module,
            self._example_input(trainer, pl_module),
            kind=self.synthetic,
            num_samples=self.num_samples,
            seed=self.seed,
            steps=self.distill_steps,
            progress=self.progress,
        )
        return list(inputs.chunk(self.calibration_batches))

    def _install(self, pl_module: pl.LightningModule, plan: QuantPlan) -> bool:
        """Apply ``plan`` unless the module already holds it; True when layers were swapped now."""
        wanted = _integer_assignment(plan.assignment)
        applied = _applied_assignment(pl_module)
        if applied == wanted:
            return False
        if applied:
            raise ValueError(
                "the module already holds fake-quant layers of another plan: call strip_plan(module) first, "
                "or give the callback that plan"
            )
        apply_plan(pl_module, plan)
        return bool(wanted)

    def _calibrate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, synthetic: list[torch.Tensor] | None
    ) -> None:
        if synthetic is not None:
            batches: Iterable[Any] = synthetic
        else:
            batches = self._model_inputs(trainer, _module_device(pl_module), self.calibration_batches)
        calibrate(pl_module, batches, progress=self.progress)

    def _report(self, trainer: pl.Trainer, plan: QuantPlan, source: str) -> None:
        """Table, metrics and files on rank 0 (``trainer.log_dir`` is collective: every rank reads it)."""
        log_dir = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        table = format_plan_table(plan)
        rank_zero_info(f"OHQ plan ({source}, target {plan.target or self.hardware.name}):\n{table}")
        metrics = {
            f"ohq/{key}": float(value)
            for key, value in plan.predicted.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for logger in trainer.loggers if metrics else ():
            logger.log_metrics(metrics, step=0)
        directory = Path(log_dir)
        directory.mkdir(parents=True, exist_ok=True)
        plan.save(directory / "plan.json")
        (directory / "plan.md").write_text(f"# OHQ plan\n\n{table}\n")
